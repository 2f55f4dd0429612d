"""``python -m trainer.cache`` then ``teacher.placement=cache``: the cached run equals the live teacher's.

k = V equals full KD against the live teacher; k < V equals the live teacher with ``distill.top_k=k``. An
interrupted build resumes; a cache for another run, or with a shard missing, is refused before training.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.conftest import FAST, read_metrics, run_cli, train_small_teacher
from trainer.__main__ import CONF_DIR
from trainer.config import ConfigError, RunConfig, register_configs
from trainer.preflight import validate

pytestmark = pytest.mark.e2e
STEPS = 6
RUN = [
    *FAST,
    "distill=kd",
    "teacher=path",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=3",
    "distill.temperature=2.0",
]
VOCAB = 32  # data=synthetic
# fp32 storage: the cached run is the live one up to float rounding, not bit for bit (k = V reads the vocabulary in the
# teacher's sorted order, so the log-softmax sums regroup; grad_accum=2 splits the batch). Losses of size 1-4 then
# agree to a few ulp (measured <= 2 ulp); 1e-5 relative is ~80 ulp.
FP32_VALUES = 1e-5
# distill/kd is T**2 times a mean of per-token KLs, p-weighted sums of differences of fp32 log-probabilities of size
# ~log V: one rounding of each log-probability moves it by up to ~T**2 * eps * log V (1.6e-6) absolute, however small
# kd is (~0.04 here), so kd also gets that absolute allowance (measured <= 1e-7 on all three kernel paths).
KD_ROUNDING = 2.0**2 * 2.0**-23 * math.log(VOCAB)  # T = 2; 2**-23 = fp32 eps
FP16_VALUES = 1e-3  # the loss with fp16-stored logits (measured: 8.5e-5 relative at most)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with a small teacher (``t/final``) trained by the CLI."""
    root = tmp_path_factory.mktemp("cache")
    train_small_teacher(root)
    return root


def run(root: Path, name: str, *overrides: str, module: str = "trainer", check: bool = True):
    return run_cli(
        root, *RUN, "teacher.checkpoint=t/final", *overrides, f"hydra.run.dir={name}", module=module, check=check
    )


def kd_by_step(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir)}


def assert_same_losses(got_dir: Path, want_dir: Path, rel: float) -> float:
    """Loss terms within ``rel`` (kd: or KD_ROUNDING) at every step; returns the largest relative kd difference."""
    got, want = kd_by_step(got_dir), kd_by_step(want_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = 0.0
    for step, expected in want.items():
        for key in ("train/loss", "train/ce", "distill/kd"):
            allowance = KD_ROUNDING if key == "distill/kd" else 1e-7
            assert got[step][key] == pytest.approx(expected[key], rel=rel, abs=allowance), (step, key)
        worst = max(worst, abs(got[step]["distill/kd"] / expected["distill/kd"] - 1))
    return worst


@pytest.mark.parametrize("k", [None, 8])
def test_cached_run_equals_live_teacher(root, k):
    """k = V (32, no top_k) against full KD; k = 8 against the live teacher with distill.top_k=8. The cached
    run also accumulates 2 micro-batches, so rows are read by (step, sample index), not by call order."""
    top_k = [f"distill.top_k={k}"] if k else []
    name = f"k{k or 'V'}"
    run(root, f"build_{name}", *top_k, f"teacher.cache_dir={name}", module="trainer.cache")
    manifest = json.loads((root / name / "manifest.json").read_text())
    assert manifest["key"]["k"] == (k or VOCAB) and manifest["values_dtype"] == "fp32"
    run(root, f"live_{name}", *top_k)
    run(root, f"cached_{name}", *top_k, "teacher.placement=cache", f"teacher.cache_dir={name}", "train.grad_accum=2")
    assert_same_losses(root / f"cached_{name}", root / f"live_{name}", FP32_VALUES)
    cached = kd_by_step(root / f"cached_{name}")
    assert cached[STEPS]["distill/teacher_param_bytes"] == 0  # no teacher in memory
    assert kd_by_step(root / f"live_{name}")[STEPS]["distill/teacher_param_bytes"] > 0


def test_fp16_values_are_close(root):
    """fp16 storage halves the values file; distill/kd moves by up to ~1e-4 relative (fp32 storage: 1e-7)."""
    run(
        root,
        "build_fp16",
        "distill.top_k=8",
        "teacher.cache_dir=k8_fp16",
        "teacher.cache_dtype=fp16",
        module="trainer.cache",
    )
    run(root, "live_fp16", "distill.top_k=8")
    run(root, "cached_fp16", "distill.top_k=8", "teacher.placement=cache", "teacher.cache_dir=k8_fp16")
    worst = assert_same_losses(root / "cached_fp16", root / "live_fp16", FP16_VALUES)
    print(f"fp16 values: largest relative distill/kd difference {worst:.2e}")


def test_interrupted_build_resumes_to_the_same_bytes(root):
    run(root, "build_full", "distill.top_k=8", "teacher.cache_dir=full", module="trainer.cache")
    shutil.copytree(root / "full", root / "partial")
    shard = root / "partial" / "shard_00000"
    (shard / "progress.json").write_text(json.dumps({"done": 2}))  # as if killed after step 2 was flushed
    values = np.memmap(shard / "values.bin", dtype=np.float32, mode="r+")
    values[len(values) // 2 :] = np.nan  # the unfinished steps hold garbage
    values.flush()
    del values
    run(root, "build_resume", "distill.top_k=8", "teacher.cache_dir=partial", module="trainer.cache")
    for name in ("values.bin", "indices.bin", "lse.bin", "progress.json"):
        assert (shard / name).read_bytes() == (root / "full" / "shard_00000" / name).read_bytes(), name


def config(root: Path, *overrides: str) -> RunConfig:
    """The run's typed config, composed as the CLI does (paths relative to ``root``)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[*RUN, *overrides]))
    cfg.teacher.checkpoint = str(root / cfg.teacher.checkpoint)
    cfg.teacher.cache_dir = str(root / cfg.teacher.cache_dir)
    return cfg


def test_mismatched_or_incomplete_cache_is_refused(root):
    run(root, "build_refuse", "distill.top_k=8", "teacher.cache_dir=refuse", module="trainer.cache")
    cached = ["teacher.checkpoint=t/final", "distill.top_k=8", "teacher.placement=cache", "teacher.cache_dir=refuse"]
    validate(config(root, *cached))
    shutil.copytree(root / "t" / "final", root / "t2")  # another teacher: the same with one weight changed
    weights = load_file(root / "t2" / "model.safetensors")
    weights["ln_f.weight"][0] += 1e-3
    save_file(weights, root / "t2" / "model.safetensors")
    cases = [
        (["train.seed=1"], "seed 1337 != 1"),
        (["distill.top_k=4"], "k 8 != 4"),
        (["train.batch_size=4"], "batch_size 8 != 4"),
        (["student.block_size=8"], "block_size 16 != 8"),
        (["data.synthetic_tokens=30000"], "data 'synthetic-32-20000' != 'synthetic-32-30000'"),
        (["teacher.checkpoint=t2"], "cache vs this run: teacher "),
        ([f"train.max_steps={STEPS + 1}"], f"holds {STEPS} steps"),
        (["distill=kd_features", "distill.features.0.teacher_layer=1"], "distill.features: feature distillation"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(config(root, *cached, *overrides))
    (root / "refuse" / "shard_00000" / "lse.bin").unlink()
    proc = run(root, "refused", *cached[1:], check=False)  # the CLI: one line, before anything starts
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "config error: teacher.cache_dir: refuse is incomplete: shards [0] of 1 are missing or unfinished "
        "(run python -m trainer.cache again to finish them)"
    ]
