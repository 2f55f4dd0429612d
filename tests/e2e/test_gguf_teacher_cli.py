"""``python -m trainer distill=kd teacher.checkpoint=FILE.gguf``: a small Llama written as a GGUF file by the test
teaches a Stillroom student on the synthetic data (its vocabulary), dequantized in fp32 or bf16; a GGUF file
transformers cannot load, a damaged one or a folder of two is one config-error line, and nothing is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import FAST, preflight_in_process, read_metrics, run_cli, slow
from tests.gguf_files import save_llama_pair, tiny_llama, write_gguf

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="GGUF teachers need the `hf` extra")
pytest.importorskip("gguf", reason="GGUF teachers need the `hf` extra")

STEPS = 3
RUN = [*FAST, "distill=kd", "distill.alpha=0.5", f"train.max_steps={STEPS}", "logger.log_every=1"]


TEACHER = ["teacher=gguf", "teacher.checkpoint=gguf/llama.gguf"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``gguf/llama.gguf`` (and the same model as the Hugging Face folder ``hf``)."""
    root = tmp_path_factory.mktemp("gguf_teacher")
    save_llama_pair(root)
    return root


def distill(root: Path, dtype: str) -> list[dict]:
    """The metrics of a KD run taught by the GGUF teacher in ``dtype``, in ``root/dtype``."""
    run_cli(root, *RUN, *TEACHER, f"teacher.param_dtype={dtype}", f"hydra.run.dir={dtype}")
    return read_metrics(root / dtype)


@pytest.fixture(scope="module")
def live(root) -> list[dict]:
    return distill(root, "fp32")


def kd_by_step(rows: list[dict]) -> dict[int, float]:
    return {row["step"]: row["distill/kd"] for row in rows if "distill/kd" in row}


@pytest.mark.parametrize("dtype", ["fp32", slow("bf16", id="bf16")])
def test_gguf_teacher_distills_a_student(root, live, dtype):
    rows = live if dtype == "fp32" else distill(root, dtype)
    kd = kd_by_step(rows)
    assert sorted(kd) == list(range(1, STEPS + 1)) and all(value > 0 for value in kd.values())
    n_params = sum(p.numel() for p in tiny_llama().parameters())
    assert rows[-1]["distill/teacher_param_bytes"] == {"fp32": 4, "bf16": 2}[dtype] * n_params
    report = json.loads((root / dtype / "report.json").read_text())
    assert next(row for row in report["models"] if row["model"] == "teacher")["val_loss"] > 0


@pytest.mark.slow  # a cache of a Hugging Face teacher equals it live in the default tier (test_hf_teacher_cli.py)
def test_cache_of_a_gguf_teacher_equals_it_live(root, live):
    """The cache keys on the file's bytes and gives the live teacher's losses (to float rounding: the cache holds
    the vocabulary in sorted top-k order)."""
    run_cli(root, *RUN, *TEACHER, "teacher.cache_dir=cache", "hydra.run.dir=build", module="trainer.cache")
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["key"]["teacher"] == hashlib.sha256((root / "gguf" / "llama.gguf").read_bytes()).hexdigest()[:16]
    run_cli(root, *RUN, *TEACHER, "teacher.cache_dir=cache", "teacher.placement=cache", "hydra.run.dir=cached")
    got, want = kd_by_step(read_metrics(root / "cached")), kd_by_step(live)
    assert sorted(got) == sorted(want)
    for step, expected in want.items():
        assert got[step] == pytest.approx(expected, rel=0, abs=1e-6), step


def test_bad_inputs_are_one_config_error_line(root, tmp_path, monkeypatch):
    whole = (root / "gguf" / "llama.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(whole)
    write_gguf(tiny_llama(), tmp_path / "unsupported.gguf", architecture="stillroom-unknown")
    expected = {
        "unsupported.gguf": "transformers cannot load a GGUF model of architecture 'stillroom-unknown' "
        "(GGUF model with architecture stillroom-unknown is not supported yet.)",
        "truncated.gguf": "is not a readable GGUF file: truncated or damaged",
        "two": "holds 2 GGUF files (a.gguf, b.gguf): name one of them",
    }
    before = sorted(tmp_path.rglob("*"))
    for name, message in expected.items():  # the first as a real process, the others in this one
        overrides = [*RUN, f"teacher.checkpoint={name}", f"hydra.run.dir=run_{name}"]
        if name == "unsupported.gguf":
            proc = run_cli(tmp_path, *overrides, check=False)
            code, lines = proc.returncode, proc.stderr.strip().splitlines()
        else:
            code, lines = preflight_in_process(tmp_path, monkeypatch, *overrides)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"config error: teacher.checkpoint: {name}") and message in lines[0]
    assert sorted(tmp_path.rglob("*")) == before
