"""``python -m trainer.data`` prepares a data=text corpus (the teacher's tokenizer) and prints one JSON line; a
rerun reuses the shards; ``python -m trainer.cache`` over the same data names the token shards in its manifest."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.data_files import documents, save_llama, save_tokenizer

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")


@pytest.mark.slow  # a cache equals its live teacher in the default tier (test_teacher_cache.py); text shards:
# tests/unit/test_text_data.py
def test_prepare_then_cache_the_teacher_over_text(tmp_path):
    save_llama(tmp_path / "llama_teacher", 300, seed=1, tokenizer=save_tokenizer(tmp_path / "tok"))
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(documents(80)):
        (tmp_path / "corpus" / f"{i:03d}.md").write_text(text)
    overrides = [
        "data=text", "data.files=[corpus/*.md]", "data.num_proc=2", "teacher=hf", "teacher.checkpoint=llama_teacher",
        "distill=kd", "student.block_size=16", "logger=console", "train.batch_size=4", "train.max_steps=3",
    ]  # fmt: skip
    line = json.loads(run_cli(tmp_path, *overrides, module="trainer.data").stdout)
    assert line["documents"] == 80 and line["tokens"]["val"] > 0 and line["trained_tokens"] == line["tokens"]
    shards = Path(tmp_path / line["cache"])
    assert json.loads(run_cli(tmp_path, *overrides, module="trainer.data").stdout) == line  # reused
    run_cli(tmp_path, *overrides, "teacher.cache_dir=cache", module="trainer.cache")
    named = json.loads((tmp_path / "cache" / "manifest.json").read_text())["data_files"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert {Path(p).name: h for p, h in named.items()} == {n: e["sha256"] for n, e in manifest["files"].items()}
    assert "train.tokens.bin" in {Path(p).name for p in named}


@pytest.mark.slow  # tokenizes a corpus large enough to be interrupted
def test_ctrl_c_while_tokenizing_is_one_line_and_the_same_command_finishes(tmp_path):
    """Ctrl-C in ``python -m trainer.data`` used to end in a KeyboardInterrupt traceback: now one line saying what
    is kept, exit 130, no half-written part; the same command then finishes the shards."""
    from tests.e2e.test_signals import start
    from trainer.failure import INTERRUPTED_EXIT

    save_tokenizer(tmp_path / "tok")
    (tmp_path / "corpus").mkdir()
    text = "".join(documents(400))
    for i in range(150):  # 150 long documents (a file is one), tokenized over seconds
        (tmp_path / "corpus" / f"{i:03d}.md").write_text(text * 4)
    overrides = ["data=text", "data.files=[corpus/*.md]", "data.tokenizer=tok", "student.block_size=16"]
    proc = start(tmp_path, sys.executable, "-m", "trainer.data", *overrides)
    parts = tmp_path / "data_cache"
    deadline = time.monotonic() + 120
    while not list(parts.glob("*/parts/*.json")):  # the first chunk is written: tokenizing has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        "interrupted by Ctrl-C; the chunks tokenized so far are kept: the same command finishes the shards"
    ), stderr[-2000:]
    assert "Traceback" not in stderr and not list(parts.rglob("*.tmp"))
    line = json.loads(run_cli(tmp_path, *overrides, module="trainer.data").stdout)
    assert line["documents"] == 150  # a file is a document
