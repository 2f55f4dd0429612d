"""Every bad input stops the run before anything starts: one line on stderr naming the key, exit code 2."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, preflight_in_process, run_cli
from trainer import models

pytestmark = pytest.mark.e2e


def make_teacher(path, vocab: int):
    model = models.build("gpt", vocab_size=vocab, n_layer=1, n_head=1, n_embd=16, block_size=16)
    return models.save_dense(model, path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    not_a_checkpoint = root / "junk"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "weights.bin").write_bytes(b"\x00" * 64)
    return {
        "vocab32": make_teacher(root / "v32", 32),
        "vocab65": make_teacher(root / "v65", 65),
        "junk": not_a_checkpoint,
    }


CASES = {
    "unknown key": (["train.nonsense=1"], "train.nonsense"),
    "unknown group key": (["distill.temprature=2"], "distill.temprature"),
    "wrong type": (["train.lr=fast"], "train.lr"),
    "wrong type int": (["train.max_steps=1.5"], "train.max_steps"),
    "temperature zero": (["distill=kd", "distill.temperature=0"], "distill.temperature"),
    "temperature negative": (["distill=kd", "distill.temperature=-1"], "distill.temperature"),
    "alpha above one": (["distill=kd", "distill.alpha=1.5"], "distill.alpha"),
    "alpha below zero": (["distill=kd", "distill.alpha=-0.1"], "distill.alpha"),
    "lr zero": (["train.lr=0"], "train.lr"),
    "max_steps zero": (["train.max_steps=0"], "train.max_steps"),
    "unknown option": (["data=imagenet"], "data"),
    "teacher missing": (["distill=kd", "teacher=path", "teacher.checkpoint=/does/not/exist"], "/does/not/exist"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_override_is_one_line_exit_2(tmp_path, name, monkeypatch):
    overrides, needle = CASES[name]
    code, lines = preflight_in_process(tmp_path, monkeypatch, *FAST, *overrides)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("config error: ") and needle in lines[0], lines[0]
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


@pytest.mark.parametrize("name", ["unknown key", "wrong type", "teacher missing"])
def test_bad_override_through_the_cli_is_one_line_exit_2(tmp_path, name):
    overrides, needle = CASES[name]
    proc = run_cli(tmp_path, *FAST, *overrides, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("config error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*")), "nothing may be written before the config is valid"


def test_teacher_that_is_not_a_checkpoint(tmp_path, teachers):
    proc = run_cli(
        tmp_path,
        *FAST,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teachers['junk']}",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (
            f"config error: teacher.checkpoint: {teachers['junk']} is not a Stillroom export, run folder or "
            "checkpoint, nor a Hugging Face causal-LM folder or GGUF file"
        )
    ]


def test_teacher_vocabulary_differs(tmp_path, teachers):
    proc = run_cli(
        tmp_path,
        *FAST,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teachers['vocab65']}",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("config error: teacher.checkpoint:") and "vocabulary 65" in line and "32" in line


def test_sweep_values_are_each_checked(tmp_path, teachers):
    proc = run_cli(
        tmp_path,
        "-m",
        *FAST,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teachers['vocab32']}",
        "distill.temperature=1,0",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "distill.temperature" in line
