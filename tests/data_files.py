"""Small corpora, chat sets and a byte-level BPE tokenizer with a ChatML template, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold crypts".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of pseudo-random words (lengths vary; deterministic)."""
    out = []
    for i in range(n):
        words = [WORDS[(seed + i * 7 + j * j) % len(WORDS)] for j in range(20 + (i * 13) % 40)]
        out.append(f"# doc {i}\n" + " ".join(words) + "\n")
    return out


def save_tokenizer(folder: Path, vocab_size: int = 300, template: bool = True, other: bool = False) -> Path:
    """A byte-level BPE tokenizer trained on ``documents(50)`` (``other``: on them in upper case, which gives
    another tokenizer of the same size), saved as a transformers fast tokenizer folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([d.upper() if other else d for d in documents(50)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    if template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def conversations(n: int) -> list[dict]:
    """``n`` chat rows: system/user/assistant turns (some with two assistant turns), and prompt/completion pairs."""
    rows: list[dict] = []
    for i, text in enumerate(documents(n, seed=3)):
        words = text.split()
        if i % 3 == 2:
            rows.append({"prompt": " ".join(words[:5]), "completion": " ".join(words[5:12])})
            continue
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " ".join(words[:6])}]
        messages.append({"role": "assistant", "content": " ".join(words[6:14])})
        if i % 3 == 1:
            messages += [{"role": "user", "content": "more"}, {"role": "assistant", "content": words[-1]}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def save_llama(folder: Path, vocab_size: int, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A small random Llama (``tests.conftest.small_hf_config``'s, with ``vocab_size`` tokens) saved in ``folder``,
    with the tokenizer folder ``tokenizer``'s files beside it when given."""
    import shutil

    import torch
    import transformers

    from tests.conftest import small_hf_config

    config = small_hf_config("llama")
    config.vocab_size = vocab_size
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for file in tokenizer.iterdir() if tokenizer else ():
        shutil.copy(file, folder / file.name)
    return folder


def save_eos_happy_llama(folder: Path, vocab_size: int, eos: int, seed: int = 0) -> Path:
    """``save_llama``'s model made to end its text early: every embedding row gets 0.1 on channel 0 and the
    end-of-text token ``eos`` 2.0, so after any prefix the (tied) head gives ``eos`` about one chance in four to one
    in a hundred (an 8-token completion ends early about 4 times in 5, at lengths that vary from row to row)."""
    import torch
    import transformers

    save_llama(folder, vocab_size, seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 0] = 0.1
        embedding[eos, 0] = 2.0
    model.save_pretrained(folder)
    return folder


def save_recipe_files(root: Path, corpus: str = "corpus") -> Path:
    """What a test of ``experiment=smollm2`` (or a benchmark's quick mode) runs on: ``root/llama``, a small random
    Llama of a 300-token BPE, and 30 Python files in ``root/corpus``; returns ``root``."""
    save_llama(root / "llama", 300, seed=1, tokenizer=save_tokenizer(root / "tok"))
    (root / corpus).mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(documents(30)):
        (root / corpus / f"m{i:02d}.py").write_text(text * 3)
    return root
