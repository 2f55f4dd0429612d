"""Bad inputs that used to start the run (and end in a traceback, or be silently ignored) now stop it before
anything starts: one line on stderr naming the key or file, exit 2, no traceback, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, preflight_in_process, read_metrics, run_cli, slow
from trainer import checkpoint, export, models

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    (root / "empty.txt").write_text("")
    (root / "tiny.txt").write_text("to be or not to be\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 500)
    (root / "a_folder").mkdir()
    teacher = models.build("gpt", vocab_size=32, n_layer=1, n_head=1, n_embd=16, block_size=16)
    staging = export.staging_dir(root / "teacher32")
    models.save_dense(teacher, staging)
    export.publish(staging, root / "teacher32")
    return {path.stem: path for path in root.iterdir()}


# name: (overrides, the start of the line after "config error: "); {stem} stands for that file's path.
CASES = {
    # Values whose validity depends on the data or the teacher.
    "top_k above the vocabulary": (
        ["distill=kd", "teacher=path", "teacher.checkpoint={teacher32}", "distill.top_k=33"],
        "distill.top_k: 33 is more than the vocabulary",
    ),
    "block longer than the data": (["data.synthetic_tokens=40", "student.block_size=32"], "student.block_size: 32"),
    "synthetic vocabulary zero": (["data.synthetic_vocab=0"], "data.synthetic_vocab: must be >= 2"),
    "empty corpus": (["data=shakespeare", "data.path={empty}"], "student.block_size: 16"),
    "tiny corpus": (["data=shakespeare", "data.path={tiny}"], "student.block_size: 16"),
    "binary corpus": (["data=shakespeare", "data.path={binary}"], "data.path: {binary} is not text"),
    "latin-1 corpus": (["data=shakespeare", "data.path={latin1}"], "data.path: {latin1} is not UTF-8"),
    "corpus is a folder": (["data=shakespeare", "data.path={a_folder}"], "data.path: {a_folder} is a folder"),
    "beta1 above one": (["train.beta1=1.5"], "train.beta1: must be in [0, 1)"),
    "beta2 negative": (["train.beta2=-0.1"], "train.beta2: must be in [0, 1)"),
    "negative weight decay": (["train.weight_decay=-5"], "train.weight_decay: must be >= 0"),
    # The project's own model-dependent checks, now run on a model built on the meta device before start-up.
    "targets match nothing": (
        ["compress=prune_agp", "compress.modifiers.0.targets=[nothing.*]"],
        "compress.modifiers.0.targets: pattern 'nothing.*' matches no Linear layer",
    ),
    "int4 group size does not divide": (
        ["compress=qat_int4", "compress.modifiers.0.group_size=48"],
        "compress.modifiers.0.targets: QAT target",
    ),
    "N:M with m=3": (["compress=prune_nm", "compress.modifiers.0.m=3"], "compress.modifiers.0.m: "),
    "channel pruning of an MLP": (
        ["data=digits", "student=mlp_small", "compress=prune_channel"],
        "compress.modifiers.0.kind: channel pruning needs a student with heads",
    ),
    # Unknown keys, whatever the prefix; unknown options and experiments, naming all the available ones.
    "unknown root key with ++": (["++foo=1"], "foo: not a key of the run config"),
    "unknown key with +": (["+train.nonsense=1"], "train.nonsense: not a key of the run config"),
    "misspelled key with ++": (["++distill.temprature=2"], "distill.temprature: not a key of the run config"),
    "unknown modifier field": (
        ["compress=prune_agp", "+compress.modifiers.0.bogus=3"],
        "compress.modifiers.0.bogus: not a key of the run config",
    ),
    "unknown student field": (["+student.n_layers=3"], "student.n_layers: Key 'n_layers' not in 'GPTConfig'"),
    "unknown student family": (["student.arch=transformer"], "student.arch: unknown model family 'transformer'"),
    "unknown experiment": (
        ["experiment=nope"],
        "experiment: no option 'nope' (available: quickstart, smollm2, teacher_shakespeare)",
    ),
    "unknown student option": (
        ["student=huge"],
        "student: no option 'huge' (available: from_teacher, hf, mlp_small, mlp_teacher, nano_cpu, nano_gpu, small, "
        "tiny)",
    ),
    "unknown distillation loss": (["distill=kd", "distill.loss=kl"], "distill.loss: must be one of none, forward_kl"),
    "unclosed list": (["train.lr=[1,2"], "train.lr=[1,2: not a valid override (no viable alternative"),
    "run dir inside a file": (
        ["hydra.run.dir={tiny}/run"],
        "hydra.run.dir: {tiny}/run cannot be made: {tiny} is a file",
    ),
}


# One case of each kind also runs as a real process (the rest run the same preflight in the test's process).
THROUGH_THE_CLI = [
    "beta1 above one",
    "latin-1 corpus",
    "targets match nothing",
    "unknown root key with ++",
    "unknown experiment",
    "unclosed list",
    "run dir inside a file",
]


def command_line(name: str, files: dict[str, Path]) -> tuple[list[str], str]:
    """The overrides of case ``name`` and the line it must print, with the files' paths filled in."""
    paths = {stem: str(path) for stem, path in files.items()}
    overrides = [o.format(**paths) if "={" in o else o for o in CASES[name][0]]
    expected = CASES[name][1].format(**paths) if ": {" in CASES[name][1] else CASES[name][1]
    base = [] if "data=digits" in overrides else FAST  # FAST sizes a GPT student
    run_dir = [] if any(o.startswith("hydra.run.dir=") for o in overrides) else ["hydra.run.dir=run"]
    return [*base, *overrides, *run_dir], f"config error: {expected}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(tmp_path, files, name, monkeypatch):
    overrides, expected = command_line(name, files)
    code, lines = preflight_in_process(tmp_path, monkeypatch, *overrides)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


@pytest.mark.parametrize("name", THROUGH_THE_CLI)
def test_bad_input_through_the_cli_is_one_line_exit_2_nothing_written(tmp_path, files, name):
    overrides, expected = command_line(name, files)
    proc = run_cli(tmp_path, *overrides, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(expected), lines[0]
    assert not (tmp_path / "run").exists(), "nothing may be written before the config is valid"


def test_a_sweep_is_checked_on_every_combination_before_the_first_job(tmp_path, files):
    """65 combinations (more than the old cap of 64): the bad value in the last one stops the sweep at once."""
    temperatures = ",".join(["1"] * 64 + ["0"])
    proc = run_cli(
        tmp_path,
        "-m",
        *FAST,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={files['teacher32']}",
        "train.max_steps=1",
        f"distill.temperature={temperatures}",
        "hydra.sweep.dir=sweep",
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("config error: distill.temperature: must be > 0"), line
    assert not (tmp_path / "sweep").exists()


def test_resume_never_in_a_run_dir_that_holds_a_run_refuses(tmp_path):
    run_cli(tmp_path, *FAST, "train.max_steps=2", "train.ckpt_every=2", "hydra.run.dir=run")
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    proc = run_cli(
        tmp_path, *FAST, "train.max_steps=2", "train.resume=never", "hydra.run.dir=run", check=False, timeout=120
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"config error: train.resume: never, but {tmp_path / 'run'} holds a run"), line
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("changes", "difference"),
    [
        (["train.seed=7"], "train.seed 1337 there, 7 here"),
        slow(["data.synthetic_tokens=30000"], "data synthetic-32-20000 there, synthetic-32-30000 here", id="data"),
        slow(
            ["train.max_steps=4", "train.lr=2e-3"],
            "train.lr 0.001 there, 0.002 here, train.max_steps 2 there, 4 here",
            id="two fields",
        ),
    ],
)
def test_resume_with_other_settings_refuses_naming_them(tmp_path, changes, difference):
    """A rerun in the run dir with another seed, data or schedule used to resume silently, mixing two runs."""
    run_cli(tmp_path, *FAST, "train.max_steps=2", "train.ckpt_every=2", "hydra.run.dir=run")
    before = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    proc = run_cli(tmp_path, *FAST, "train.max_steps=2", *changes, "hydra.run.dir=run", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    key = difference.split()[0]  # the first setting that differs is the key the line names
    assert line.startswith(f"config error: {key}: checkpoint step_0000002 differs ("), line
    assert difference in line and f"train.allow_resume_changes=[{key}" in line and len(line) <= 200, line
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == before


def test_allow_resume_changes_resumes_a_longer_run(tmp_path):
    run_cli(tmp_path, *FAST, "train.max_steps=2", "train.ckpt_every=2", "hydra.run.dir=run")
    longer = [*FAST, "train.max_steps=4", "train.ckpt_every=2", "hydra.run.dir=run"]
    proc = run_cli(tmp_path, *longer, "train.allow_resume_changes=true")
    assert f"resumed from {tmp_path / 'run' / 'ckpt' / 'step_0000002'} at step 2" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 4


def test_run_dir_that_is_a_file_refuses(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    proc = run_cli(tmp_path, *FAST, "hydra.run.dir=taken", check=False, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"config error: hydra.run.dir: {tmp_path / 'taken'} is a file, not a folder", line
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_export_never_writes_over_an_existing_folder(tmp_path):
    """``python -m trainer.export RUN quantize=... out=RUN/final`` used to replace the fp32 ``final/``."""
    run_cli(tmp_path, *FAST, "train.max_steps=2", "hydra.run.dir=run")
    final = tmp_path / "run" / "final"
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    proc = run_cli(
        tmp_path, str(tmp_path / "run"), "quantize=int8_weight", f"out={final}", module="trainer.export", check=False
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: out: {final} already exists"), line
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before


@pytest.mark.slow  # three runs; teacher paths of every other kind are checked in the default tier
def test_a_checkpoint_folder_is_a_teacher_and_an_export_source(tmp_path):
    """As docs/teachers.md says: a checkpoint folder (or a run without ``final/``) works as a teacher and as the
    source of a post-training export (it used to fail with ``Missing key ... model.tok_emb.weight``)."""
    run_cli(tmp_path, *FAST, "train.max_steps=4", "train.ckpt_every=2", "hydra.run.dir=t")
    step_2 = tmp_path / "t" / "ckpt" / "step_0000002"
    run_cli(
        tmp_path,
        *FAST,
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={step_2}",
        "train.max_steps=2",
        "hydra.run.dir=student",
    )
    assert (tmp_path / "student" / "final").is_dir()
    run_cli(tmp_path, str(step_2), "quantize=int8_weight", f"out={tmp_path / 'q2'}", module="trainer.export")
    shutil.rmtree(tmp_path / "t" / "final")
    run_cli(tmp_path, str(tmp_path / "t"), "quantize=int8_weight", f"out={tmp_path / 'q4'}", module="trainer.export")
    x = torch.randint(0, 32, (2, 16))
    two, four = export.load(tmp_path / "q2"), export.load(tmp_path / "q4")
    assert two(x).shape == four(x).shape == (2, 16, 32) and not torch.equal(two(x), four(x))  # steps 2 and 4


def test_periods_are_honoured_whatever_log_every_is(tmp_path):
    """``eval_every`` and ``ckpt_every`` that are not multiples of ``log_every`` used to act only at common
    multiples."""
    run_cli(
        tmp_path,
        *FAST,
        "train.max_steps=10",
        "logger.log_every=4",
        "train.eval_every=3",
        "train.ckpt_every=5",
        "train.keep_last=5",
        "hydra.run.dir=run",
    )
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "eval/val_loss" in r] == [3, 6, 9, 10]
    assert [p.name for p in checkpoint.list_complete(tmp_path / "run" / "ckpt")] == ["step_0000005", "step_0000010"]
    assert {4, 8} <= {r["step"] for r in rows}


def damaged_copy(source: Path, into: Path, file: str, damage) -> Path:
    """A copy of folder ``source`` in which ``file`` is damaged in place (same size for a flipped bit)."""
    shutil.copytree(source, into)
    target = into / file
    target.write_bytes(damage(target.read_bytes()))
    return target


def flip_one_bit(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return bytes(flipped)


def test_a_damaged_teacher_is_named_before_anything_starts(tmp_path, files):
    """A flipped bit in a teacher's weights (an export or a checkpoint) used to be loaded as is."""
    run_cli(tmp_path, *FAST, "train.max_steps=2", "train.ckpt_every=2", "data.synthetic_vocab=32", "hydra.run.dir=t")
    step = tmp_path / "t" / "ckpt" / "step_0000002"
    damaged = [
        damaged_copy(files["teacher32"], tmp_path / "export", "model.safetensors", flip_one_bit),
        damaged_copy(step, tmp_path / "step", "__0_0.distcp", flip_one_bit),
    ]
    for target in damaged:
        overrides = ["distill=kd", "teacher=path", f"teacher.checkpoint={target.parent}", "hydra.run.dir=student"]
        proc = run_cli(tmp_path, *FAST, *overrides, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = proc.stderr.strip().splitlines()
        assert (
            line == f"config error: teacher.checkpoint: {target} is garbled (its SHA-256 differs from the one written)"
        )
        assert not (tmp_path / "student").exists()


@pytest.mark.parametrize(
    ("file", "damage", "problem"),
    [
        ("model.safetensors", flip_one_bit, "is garbled (its SHA-256 differs from the one written)"),
        ("config.json", lambda data: data[:20], "is truncated: 20 bytes"),
    ],
)
def test_export_of_a_damaged_source_is_one_line(tmp_path, files, file, damage, problem):
    target = damaged_copy(files["teacher32"], tmp_path / "source", file, damage)
    proc = run_cli(
        tmp_path,
        str(target.parent),
        "quantize=int8_weight",
        f"out={tmp_path / 'q'}",
        module="trainer.export",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: SOURCE: {target} {problem}"), line
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".tmp-*"))


def test_an_export_without_a_manifest_that_does_not_load_is_one_line(tmp_path, files):
    """An export written before manifests existed (or by hand): what cannot be loaded is still one line."""
    source = tmp_path / "source"
    shutil.copytree(files["teacher32"], source)
    (source / "manifest.json").unlink()
    (source / "model.safetensors").write_bytes(b"\x07" * 64)
    overrides = ["distill=kd", "teacher=path", f"teacher.checkpoint={source}", "hydra.run.dir=student"]
    proc = run_cli(tmp_path, *FAST, *overrides, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"config error: teacher.checkpoint: {source} cannot be loaded (SafetensorError: "), line
    assert "Traceback" not in proc.stderr


def test_exports_follow_the_umask_and_are_sealed(tmp_path):
    """``final/model.safetensors`` used to be written with mode 0600 (safetensors' own temporary file)."""
    run_cli(tmp_path, *FAST, "train.max_steps=2", "hydra.run.dir=run")
    final = tmp_path / "run" / "final"
    modes = {p.name: p.stat().st_mode & 0o777 for p in final.iterdir()}
    assert set(modes) == {"config.json", "model.safetensors", "manifest.json"}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044, modes  # as any other file
    export.verify(final)
