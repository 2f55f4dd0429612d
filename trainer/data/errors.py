"""The one error the data raises: what to change, and why."""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot serve this run: ``key`` names the setting to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message
