"""``python -m trainer.cache`` then ``teacher.placement=cache``: the cached run equals the live teacher's.

k = V equals full KD against the live teacher; k < V equals the live teacher with ``distill.top_k=k``. An
interrupted build resumes; a cache for another run, or with a shard missing, is refused before training. A
garbled row stops training with one line (and a rerun of the build rewrites it); a garbled or old manifest, and
a ``teacher.cache_dir`` that cannot be written, are refused with one line before anything starts; Ctrl-C while
caching is one line, and the same command finishes the cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.conftest import FAST, read_metrics, run_cli, slow, train_small_teacher
from tests.e2e.test_signals import start
from trainer import cache, checkpoint, files
from trainer.cli.cache import INTERRUPTED
from trainer.cli.train import CONF_DIR
from trainer.config import ConfigError, RunConfig, register_configs
from trainer.failure import INTERRUPTED_EXIT
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
BATCH, POSITIONS, K = 8, 16, 8  # the layout of the top-8 cache (train.batch_size, student.block_size, top_k)
CACHED = ["distill.top_k=8", "teacher.placement=cache"]
# fp32 storage: the cached run is the live one up to float rounding, not bit for bit (k = V reads the vocabulary in the
# teacher's sorted order, so the log-softmax sums regroup; grad_accum=2 splits the batch). Losses of size 1-4 then
# agree to a few ulp (measured <= 2 ulp); 1e-5 relative is ~80 ulp.
FP32_VALUES = 1e-5
# distill/kd is T**2 times a mean of per-token KLs, p-weighted sums of differences of fp32 log-probabilities of size
# ~log V: one rounding of each log-probability moves it by up to ~T**2 * eps * log V (1.6e-6) absolute, however small
# kd is (~0.04 here), so kd also gets that absolute allowance (measured <= 1e-7 on all three kernel paths).
KD_ROUNDING = 2.0**2 * 2.0**-23 * math.log(VOCAB)  # T = 2; 2**-23 = fp32 eps
FP16_VALUES = 1e-3  # the loss with fp16-stored logits (measured: 8.5e-5 relative at most)
COMPACT_VALUES = 1e-2  # the loss with 6-bit codes of the logits (measured: 3.2e-3 relative at most)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with a small teacher (``t/final``) trained by the CLI."""
    root = tmp_path_factory.mktemp("cache")
    train_small_teacher(root)
    return root


@pytest.fixture(scope="module")
def top8(root) -> Path:
    """A complete top-8 cache (``root/top8``), built once; tests that change it copy it first."""
    run(root, "build_top8", "distill.top_k=8", "teacher.cache_dir=top8", module="trainer.cache")
    return root / "top8"


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


@pytest.mark.parametrize("k", [slow(None, id="None"), 8])  # k = V reads the same rows as the top-8 in full
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


@pytest.mark.slow  # fp32 caches equal the live teacher in the default tier (the test above)
@pytest.mark.parametrize("dtype, rel", [("fp16", FP16_VALUES), ("compact", COMPACT_VALUES)])
def test_fp16_and_compact_values_are_close(root, dtype, rel):
    """fp16 storage halves the values file, compact storage (6-bit codes, Elias-Fano ids) takes 18 of fp32's 68 bytes
    a position here; distill/kd moves by up to ``rel`` relative (fp32 storage: 1e-7)."""
    run(
        root,
        f"build_{dtype}",
        "distill.top_k=8",
        f"teacher.cache_dir=k8_{dtype}",
        f"teacher.cache_dtype={dtype}",
        module="trainer.cache",
    )
    run(root, f"live_{dtype}", "distill.top_k=8")
    run(root, f"cached_{dtype}", "distill.top_k=8", "teacher.placement=cache", f"teacher.cache_dir=k8_{dtype}")
    worst = assert_same_losses(root / f"cached_{dtype}", root / f"live_{dtype}", rel)
    print(f"{dtype} values: largest relative distill/kd difference {worst:.2e}")


def test_interrupted_build_resumes_to_the_same_bytes(root, top8):
    shutil.copytree(top8, root / "partial")
    shard = root / "partial" / "shard_00000"
    (shard / "progress.json").write_text(json.dumps({"done": 2}))  # as if killed after step 2 was flushed
    values = np.memmap(shard / "values.bin", dtype=np.float32, mode="r+")
    values[len(values) // 2 :] = np.nan  # the unfinished steps hold garbage
    values.flush()
    del values
    run(root, "build_resume", "distill.top_k=8", "teacher.cache_dir=partial", module="trainer.cache")
    for name in (*cache.ROW_FILES, cache.CHECKSUMS, "progress.json"):
        assert (shard / name).read_bytes() == (top8 / "shard_00000" / name).read_bytes(), name


def config(root: Path, *overrides: str) -> RunConfig:
    """The run's typed config, composed as the CLI does (paths relative to ``root``)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[*RUN, *overrides]))
    cfg.teacher.checkpoint = str(root / cfg.teacher.checkpoint)
    cfg.teacher.cache_dir = str(root / cfg.teacher.cache_dir)
    return cfg


def test_mismatched_or_incomplete_cache_is_refused(root, top8):
    shutil.copytree(top8, root / "refuse")
    cached = ["teacher.checkpoint=t/final", "distill.top_k=8", "teacher.placement=cache", "teacher.cache_dir=refuse"]
    validate(config(root, *cached))
    shutil.copytree(root / "t" / "final", root / "t2")  # another teacher: the same with one weight changed
    weights = load_file(root / "t2" / "model.safetensors")
    weights["ln_f.weight"][0] += 1e-3
    save_file(weights, root / "t2" / "model.safetensors")
    files.write_manifest(root / "t2")  # a teacher of its own, not a damaged copy
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


def one_line(proc, exit_code: int) -> str:
    """The one line a failed CLI run printed on stderr (no traceback), having exited with ``exit_code``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == exit_code and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def flip_bit(path: Path, step: int, row: int, itemsize: int) -> None:
    """Flip the lowest bit of one byte inside sample ``row`` of step ``step`` of a ``[steps, batch, positions, k]``
    shard file: a change the loss alone would hardly show."""
    data = bytearray(path.read_bytes())
    data[((step * BATCH + row) * POSITIONS * K + 5) * itemsize] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, itemsize", [("values.bin", 4), slow("indices.bin", 2, id="indices.bin-2")])
def test_a_garbled_row_stops_training_with_one_line(root, top8, name, itemsize):
    """A bit flipped in step 3, row 5: steps 1-3 train (step 2 is checkpointed), the 4th stops with one line
    naming the file, step and row, exit 1, the checkpoint kept; a rerun of the build rewrites the row."""
    garbled = f"garbled_{name[:-4]}"
    shutil.copytree(top8, root / garbled)
    flip_bit(root / garbled / "shard_00000" / name, step=3, row=5, itemsize=itemsize)
    proc = run(root, f"run_{garbled}", *CACHED, f"teacher.cache_dir={garbled}", "train.ckpt_every=2", check=False)
    assert one_line(proc, 1) == (
        f"error: {root / garbled / 'shard_00000' / name} is garbled at step 3, row 5 (its CRC32 differs from the "
        "one written); rebuild it with python -m trainer.cache and this run's overrides (it rewrites the garbled steps)"
    )
    assert [p.name for p in checkpoint.list_complete(root / f"run_{garbled}" / "ckpt")] == ["step_0000002"]
    rebuilt = run(root, f"rebuild_{garbled}", "distill.top_k=8", f"teacher.cache_dir={garbled}", module="trainer.cache")
    assert f"{name} is garbled at step 3, row 5 (its CRC32 differs from the one written); writing shard 0 again" in (
        rebuilt.stderr
    )
    for file in (*cache.ROW_FILES, cache.CHECKSUMS, "progress.json"):
        assert (root / garbled / "shard_00000" / file).read_bytes() == (top8 / "shard_00000" / file).read_bytes()


def manifest_text(top8: Path, form: str) -> str:
    """The top-8 cache's manifest, garbled as ``form`` says."""
    raw = json.loads((top8 / "manifest.json").read_text())
    if form == "missing field":
        del raw["key"]["seed"]
    elif form == "wrong type":
        raw["shards"] = "all"
    elif form == "format 1":
        raw["format"] = "stillroom-teacher-cache/1"
    cut = '{"format": "stillroom-teacher-cache/2", "steps": 6,'  # as a write cut short would leave it
    return {"not JSON": cut, "not an object": '"manifest"'}.get(form, json.dumps(raw))


@pytest.mark.parametrize(
    "form, module, why",
    [
        ("not JSON", "trainer", "Expecting property name enclosed in double quotes: line 1 column 52 (char 51)"),
        ("not an object", "trainer.cache", '"manifest" is not a JSON object'),
        slow("missing field", "trainer", "key.seed is missing", id="missing field-trainer-key.seed is missing"),
        ("wrong type", "trainer.cache", 'shards is "all", not an array'),
    ],
)
def test_a_garbled_manifest_is_one_line(root, top8, form, module, why):
    """Training (preflight) and the build both name the file; exit 2, before anything starts."""
    folder = root / f"manifest_{form.replace(' ', '_')}_{module}"
    folder.mkdir()
    (folder / "manifest.json").write_text(manifest_text(top8, form))
    proc = run(root, f"run_{folder.name}", *CACHED, f"teacher.cache_dir={folder.name}", module=module, check=False)
    assert one_line(proc, 2) == (
        f"config error: teacher.cache_dir: {folder.name}/manifest.json is garbled ({why}); remove the cache and "
        "rebuild it with python -m trainer.cache"
    )
    assert not (root / f"run_{folder.name}").exists()


@pytest.mark.parametrize("module", ["trainer", slow("trainer.cache", id="trainer.cache")])
def test_a_cache_of_the_old_format_is_refused(root, top8, module):
    folder = root / f"format1_{module}"
    folder.mkdir()
    (folder / "manifest.json").write_text(manifest_text(top8, "format 1"))
    proc = run(root, f"run_{folder.name}", *CACHED, f"teacher.cache_dir={folder.name}", module=module, check=False)
    assert one_line(proc, 2) == (
        f"config error: teacher.cache_dir: {folder.name} holds a cache of format 'stillroom-teacher-cache/1', not "
        "'stillroom-teacher-cache/3' (format 1 had no checksums): remove it and rebuild it with python -m trainer.cache"
    )


@pytest.mark.parametrize(
    "case",
    [
        "file",
        "inside a file",
        pytest.param(
            "read-only",
            marks=pytest.mark.skipif(
                os.geteuid() == 0,
                reason="root writes in a read-only folder (its mode bits do not stop root), so there is nothing to "
                "refuse; check_writable asks os.access, which says so too",
            ),
        ),
        "top_k above the vocabulary",
    ],
)
def test_a_cache_dir_that_cannot_be_written_is_refused(root, case):
    """``python -m trainer.cache``: one line, exit 2, before the teacher is loaded; nothing written."""
    folder = root / f"unwritable_{case.replace(' ', '_')}"
    folder.mkdir()
    (folder / "file").write_text("a file")
    folder.chmod(0o555)
    target, why, overrides = {
        "file": ("file", "teacher.cache_dir: {dir}/file is a file, not a folder", []),
        "inside a file": (
            "file/cache",
            "teacher.cache_dir: cannot create {dir}/file/cache: {abs}/file is a file, not a folder",
            [],
        ),
        "read-only": (".", "teacher.cache_dir: {dir} is read-only for this user", []),
        "top_k above the vocabulary": (
            "new",
            "distill.top_k: 64 is more than the vocabulary (32 tokens, data=synthetic)",
            ["distill.top_k=64"],
        ),
    }[case]
    cache_dir = f"{folder.name}/{target}" if target != "." else folder.name
    proc = run(
        root, f"run_{folder.name}", f"teacher.cache_dir={cache_dir}", *overrides, module="trainer.cache", check=False
    )
    folder.chmod(0o755)
    assert one_line(proc, 2) == f"config error: {why.format(dir=folder.name, abs=folder)}"
    assert sorted(p.name for p in folder.iterdir()) == ["file"] and (folder / "file").read_text() == "a file"
    assert not (root / f"run_{folder.name}").exists()


@pytest.mark.slow  # a cache build resumed after a kill: test_interrupted_build_resumes_to_the_same_bytes
def test_ctrl_c_while_caching_is_one_line_and_the_same_command_finishes_the_same_bytes(root):
    """Ctrl-C in ``python -m trainer.cache`` is one line saying what is kept, exit 130, no traceback; the same command
    then finishes the cache, byte for byte the cache an uninterrupted build writes."""
    long = [*RUN, "teacher.checkpoint=t/final", "distill.top_k=8", "train.max_steps=3000"]
    run_cli(root, *long, "teacher.cache_dir=whole3000", "hydra.run.dir=whole3000", module="trainer.cache")
    proc = start(root, sys.executable, "-m", "trainer.cache", *long, "teacher.cache_dir=cut3000", "hydra.run.dir=c")
    progress = root / "cut3000" / "shard_00000" / "progress.json"
    deadline = time.monotonic() + 120
    while not (progress.is_file() and json.loads(progress.read_text())["done"] > 0):  # writing has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in stderr
    assert json.loads(progress.read_text())["done"] < 3000  # stopped part way
    run_cli(root, *long, "teacher.cache_dir=cut3000", "hydra.run.dir=c", module="trainer.cache")
    for name in (*cache.ROW_FILES, cache.CHECKSUMS, "progress.json"):
        assert (progress.parent / name).read_bytes() == (root / "whole3000" / "shard_00000" / name).read_bytes(), name
