"""Chat samples: a row's conversation (``messages``, or a ``prompt``/``completion`` pair), rendered with the
tokenizer's chat template, as token ids and which of them the model is trained to say (the assistant's turns, each
with its end-of-turn tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.data.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def conversation(path: Path, number: int, row: dict) -> list[dict[str, str]]:
    """The messages of row ``number`` of ``path``; DataError naming the row when it has none or an unknown role."""
    where = f"{path} row {number}"
    row = {k: v for k, v in row.items() if v is not None}  # datasets gives a row the fields of other rows as None
    if "messages" not in row:
        if "prompt" in row and "completion" in row:
            return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        raise DataError("data.files", f"{where} has no `messages` (nor `prompt` and `completion`): {sorted(row)}")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError("data.files", f"{where}: `messages` is not a list of role/content messages")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError("data.files", f"{where}: a message without role and content ({message!r:.80})")
        if message["role"] not in ROLES:
            raise DataError("data.files", f"{where}: unknown role {message['role']!r} (roles: {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_template(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.tokenizer", f"{name} has no chat template (data=chat renders conversations with it)")


def render(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, for each, whether it is assistant output. An assistant turn is the text
    between the conversation rendered up to it (with the generation prompt) and rendered through it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                "data.tokenizer", "its chat template does not render a conversation's turns as prefixes of it"
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    trained = [any(start <= a < end for start, end in spans) for a, _ in encoding.offsets]
    return encoding.ids, trained
