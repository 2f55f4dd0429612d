"""``python -m trainer distill=kd teacher.checkpoint=<Hugging Face folder>``: a GPT-2 saved by transformers
teaches a Stillroom student; a padded vocabulary is aligned by itself (one info line) and gives the losses of the
unpadded teacher up to float rounding (live and through the cache); a broken folder, or a teacher whose tokenizer
is not the student's, is one config-error line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import FAST, read_metrics, run_cli, save_hf_teachers, save_tokenizer

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers", reason="Hugging Face teachers need the `hf` extra")

STEPS = 4
VOCAB = 65  # Tiny Shakespeare's characters
RUN = [
    *(arg for arg in FAST if not arg.startswith("data=")),
    "data=shakespeare",
    "distill=kd",
    "distill.alpha=0.5",
    "distill.temperature=2.0",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=2",
]
# The cut and cached teachers regroup float sums (the head's matmul over 80 columns instead of 65, whose blocking
# is the BLAS's choice per CPU; the cache's vocabulary in sorted top-k order), so distill/kd matches to rounding, not
# bit for bit. kd is T**2 times a mean of per-token KLs, p-weighted sums of differences of fp32 log-probabilities of
# size ~log V: one rounding of each moves it by up to ~T**2 * eps * log V (2e-6) absolute, however small kd is
# (~0.012 with this random-init teacher; measured <= 8e-8 apart, 0 for the cut head on this CPU).
KD_ROUNDING = 2.0**2 * 2.0**-23 * math.log(VOCAB)  # T = 2; 2**-23 = fp32 eps


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``hf65``: a 2-layer GPT-2 on the student's vocabulary; ``hf80``: the same model, embeddings padded to 80."""
    root = tmp_path_factory.mktemp("hf_teacher")
    save_hf_teachers(root, VOCAB, 80, n_embd=32)
    return root


@pytest.fixture(scope="module")
def live65(root) -> list[dict]:
    run_cli(root, *RUN, "teacher.checkpoint=hf65", "hydra.run.dir=live65")
    return read_metrics(root / "live65")


def kd_by_step(rows: list[dict]) -> dict[int, float]:
    return {row["step"]: row["distill/kd"] for row in rows if "distill/kd" in row}


def test_hf_teacher_distills_a_student(root, live65):
    kd = kd_by_step(live65)
    assert sorted(kd) == list(range(1, STEPS + 1)) and all(value > 0 for value in kd.values())
    n_params = transformers.GPT2LMHeadModel.from_pretrained(root / "hf65").num_parameters()
    assert live65[-1]["distill/teacher_param_bytes"] == 4 * n_params
    report = json.loads((root / "live65" / "report.json").read_text())
    teacher_row = next(row for row in report["models"] if row["model"] == "teacher")
    assert teacher_row["params"] == n_params and teacher_row["val_loss"] > 0


def test_padded_teacher_is_aligned_and_equals_the_unpadded_one(root, live65):
    proc = run_cli(root, *RUN, "teacher.checkpoint=hf80", "hydra.run.dir=aligned")
    infos = [line for line in proc.stderr.splitlines() if line.startswith("info: ")]
    assert infos == [
        "info: the teacher's 80 logits and the student's 65 are aligned to the student's 65 tokens "
        "(the rows past them are padding)"
    ]
    got, want = kd_by_step(read_metrics(root / "aligned")), kd_by_step(live65)
    assert sorted(got) == sorted(want)
    for step, expected in want.items():
        assert got[step] == pytest.approx(expected, rel=0, abs=KD_ROUNDING), step


@pytest.mark.slow  # the padded teacher live equals the unpadded one (above); a cache equals its live teacher in
# tests/e2e/test_teacher_cache.py
def test_cache_of_a_padded_teacher_equals_the_unpadded_one(root, live65):
    cache = [*RUN, "teacher.checkpoint=hf80", "teacher.cache_dir=cache80"]
    run_cli(root, *cache, "hydra.run.dir=build", module="trainer.cache")
    assert json.loads((root / "cache80" / "manifest.json").read_text())["key"]["vocab"] == VOCAB
    run_cli(root, *cache, "teacher.placement=cache", "hydra.run.dir=cached")
    got, want = kd_by_step(read_metrics(root / "cached")), kd_by_step(live65)
    for step, expected in want.items():
        assert got[step] == pytest.approx(expected, rel=0, abs=KD_ROUNDING), step


def test_broken_folder_is_one_config_error_line(root, tmp_path):
    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "config.json").write_text((root / "hf65" / "config.json").read_text())
    proc = run_cli(tmp_path, *RUN, f"teacher.checkpoint={broken}", "hydra.run.dir=run", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (
            f"config error: teacher.checkpoint: {broken} has a Hugging Face config.json but no weights "
            "(model.safetensors or pytorch_model.bin)"
        )
    ]
    assert not (tmp_path / "run").exists() and sorted(p.name for p in broken.iterdir()) == ["config.json"]


def test_a_teacher_with_another_tokenizer_is_one_config_error_line(root, tmp_path):
    """A GPT-2 student and teacher on 32 ids whose tokenizers give id 3 different tokens."""
    for name, third in (("student", "c"), ("teacher", "z")):
        save_hf_teachers(tmp_path / name, 32, 32, n_embd=32)
        save_tokenizer(tmp_path / name / "hf32", ["a", "b", third, *(f"t{i}" for i in range(3, 32))])
    proc = run_cli(
        tmp_path,
        *(arg for arg in RUN if not arg.startswith("data=") and not arg.startswith("student.")),
        "data=synthetic",
        "student=hf",
        f"student.path={tmp_path / 'student' / 'hf32'}",
        "student.block_size=16",
        f"teacher.checkpoint={tmp_path / 'teacher' / 'hf32'}",
        "hydra.run.dir=run",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "config error: teacher.checkpoint: the teacher's vocabulary of 32 and the student's of 32 are different "
        "tokenizers: id 2 is 'z' for the teacher and 'c' for the student (data=synthetic)"
    ]
    assert not (tmp_path / "run").exists()
