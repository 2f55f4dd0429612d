"""The teacher's and the student's vocabularies, aligned. A Hugging Face model's embeddings are often padded past
its tokenizer (Qwen2.5: 151,936 or 152,064 rows for 151,665 tokens); those rows are ids no text produces, so both
distributions are taken over the real vocabulary: the tokenizer's length when a folder has a tokenizer, else the
student's vocabulary (the data's ids, all of which it reads: without a tokenizer only the teacher's extra rows can be
padding). Vocabularies that differ beyond that, or tokenizers that give a common id different tokens, are different
tokenizers: refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.models.hf import first_line, import_transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class VocabError(ValueError):
    """Teacher and student vocabularies that do not align (one line, naming both sizes)."""


@dataclass(frozen=True)
class Alignment:
    """Both distributions are taken over the first ``real`` ids of the ``teacher``'s and ``student``'s logits."""

    teacher: int
    student: int
    real: int
    source: str  # what says the vocabulary is ``real`` tokens

    def info(self) -> str | None:
        """The line that says the vocabularies were aligned, None where there was nothing to align."""
        if self.teacher == self.student == self.real:
            return None
        return (
            f"info: the teacher's {self.teacher} logits and the student's {self.student} are aligned to {self.source} "
            f"{self.real} tokens (the rows past them are padding)"
        )


def tokens(folder: Path | None) -> list[str] | None:
    """The tokenizer in ``folder`` as its tokens by id (added tokens included), None where it has none."""
    if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    transformers = import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VocabError(f"{folder}: transformers cannot read its tokenizer ({first_line(e)})") from None
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    return [by_id.get(i, "") for i in range(len(tokenizer))]


def align(teacher: int, student: int, teacher_folder: Path | None, student_folder: Path | None) -> Alignment:
    """The teacher's ``teacher`` logits and the student's ``student`` aligned, given the folders that may hold their
    tokenizers; VocabError where they are different tokenizers."""
    sizes = f"the teacher's vocabulary of {teacher} and the student's of {student}"
    t_tokens, s_tokens = tokens(teacher_folder), tokens(student_folder)
    if t_tokens is not None and s_tokens is not None:
        common = range(min(len(t_tokens), len(s_tokens)))
        differ = next((i for i in common if t_tokens[i] != s_tokens[i]), None)
        if differ is not None:
            raise VocabError(
                f"{sizes} are different tokenizers: id {differ} is {t_tokens[differ]!r} for the teacher and "
                f"{s_tokens[differ]!r} for the student"
            )
    known = [len(t) for t in (t_tokens, s_tokens) if t is not None]
    if not known:  # the student reads all its ids in the data: only the teacher's extra rows can be padding
        if teacher < student:
            missing = f"{teacher}-{student - 1}"
            raise VocabError(f"{sizes} differ beyond padding: the teacher has no logits for ids {missing}")
        return Alignment(teacher, student, student, "the student's")
    real = min(known)
    if min(teacher, student) < real:
        raise VocabError(f"{sizes} differ beyond padding: the tokenizer has {real} tokens")
    return Alignment(teacher, student, real, "the tokenizer's")
