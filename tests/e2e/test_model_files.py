"""Real model files are verified before anything starts: a Hugging Face folder missing a weight, of another
``model_type`` than its weights, with weights of other shapes, or with a garbled or truncated weight file stops the
run with one line naming the file or the weight and exit 2, for a teacher, a student (``student=hf``) and a
``student=from_teacher`` source alike, and nothing is written. Letting weights start at random is asked for by name
(``student.allow_missing``) or whole (``student.init=random``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, preflight_in_process, run_cli, save_hf_student

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")
from safetensors.torch import load_file, save_file  # noqa: E402  (after the importorskip)

from trainer.models.hf import HFConfig, read_config, weights  # noqa: E402

GPT_FREE = [arg for arg in FAST if not arg.startswith("student.")]  # FAST's student fields are GPT's
AS_TEACHER = [*FAST, "distill=kd", "teacher=hf", "teacher.checkpoint={folder}"]
AS_STUDENT = [*GPT_FREE, "student=hf", "student.path={folder}", "student.block_size=16"]
AS_CUT_SOURCE = [*GPT_FREE, "student=from_teacher", "student.block_size=16", "student.layers=2", "teacher=hf",
                 "teacher.checkpoint={folder}", "distill=kd"]  # fmt: skip
LOADERS = {"teacher": (AS_TEACHER, "teacher.checkpoint"), "student": (AS_STUDENT, "student.path"),
           "from_teacher": (AS_CUT_SOURCE, "teacher.checkpoint")}  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_hf_student(tmp_path_factory.mktemp("llama") / "llama", "llama")


def damaged(llama: Path, folder: Path, change) -> Path:
    """A copy of ``llama`` in ``folder`` with ``change(folder)`` applied."""
    shutil.copytree(llama, folder)
    change(folder)
    return folder


def without(*names: str):
    def change(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in state.items() if k not in names}, folder / "model.safetensors", {"format": "pt"})

    return change


def truncated(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x07" * 5000)


def junk_bin(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle" * 100)


def another_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "model_type": "bert", "architectures": ["BertLMHeadModel"]})
    )


def wider_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))


# name: (change, what the line says after "config error: KEY: FOLDER")
DAMAGE = {
    "a layer's weight missing": (
        without("model.layers.1.mlp.down_proj.weight"),
        ": 1 of the 38 weights of its llama config are not stored (model.layers.1.mlp.down_proj.weight); "
        "transformers would start them at random",
    ),
    "the final norm missing": (without("model.norm.weight"), ": 1 of the 38 weights"),
    "truncated weights": (truncated, "/model.safetensors: truncated or padded"),
    "garbage weights": (garbage, "/model.safetensors: not a safetensors file"),
    "a junk pytorch_model.bin": (junk_bin, "/pytorch_model.bin: not a PyTorch weights file"),
    "another model_type": (another_model_type, ": none of the"),
    "weights of other shapes": (
        wider_config,
        ": model.layers.0.mlp.gate_proj.weight is [128, 64] in model.safetensors",
    ),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_folder_is_one_line_naming_it_and_nothing_starts(llama, tmp_path, monkeypatch, loader, name):
    change, says = DAMAGE[name]
    folder = damaged(llama, tmp_path / "model", change)
    overrides, key = LOADERS[loader]
    code, lines = preflight_in_process(tmp_path, monkeypatch, *(o.format(folder=folder) for o in overrides))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {key}: ") and f"{folder}{says}" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


def test_every_missing_weight_is_named(llama, tmp_path):
    """Each of the folder's 38 stored weights, removed alone, is the one the line names (the tied head is not
    stored)."""
    stored = sorted(load_file(llama / "model.safetensors"))
    assert len(stored) == 38 and "lm_head.weight" not in stored
    config = read_config(llama)
    for name in stored:
        folder = damaged(llama, tmp_path / name, without(name))
        with pytest.raises(weights.WeightsError, match=f"weights of its llama config are not stored \\({name}\\)"):
            weights.check(folder, config)
        shutil.rmtree(folder)
    weights.check(llama, config)  # the whole folder passes


def test_a_mixture_of_experts_folder_stores_each_expert_apart_and_each_is_checked(tmp_path):
    """transformers saves a Qwen3-MoE's stacked experts one expert's projections at a time and stacks them on load:
    the whole folder passes, and one expert's projection missing names the stacked weight it belongs to."""
    folder = save_hf_student(tmp_path / "moe", "qwen3_moe")
    config = read_config(folder)
    weights.check(folder, config)
    stored = sorted(load_file(folder / "model.safetensors"))
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in stored
    damaged(folder, tmp_path / "gap", without("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(weights.WeightsError, match="are not stored \\(model.layers.2.mlp.experts.gate_up_proj\\)"):
        weights.check(tmp_path / "gap", config)


def test_missing_weights_start_at_random_only_when_asked(llama, tmp_path, monkeypatch):
    """``student.allow_missing`` names the weights that may start at random; ``student.init=random`` ignores the
    folder's weights; either way the run trains (as a real process: the check runs again at build)."""
    folder = damaged(llama, tmp_path / "model", without("model.norm.weight", "model.layers.0.mlp.up_proj.weight"))
    run = [o.format(folder=folder) for o in AS_STUDENT] + ["train.max_steps=2", "logger=console"]
    code, lines = preflight_in_process(tmp_path, monkeypatch, *run)
    assert code == 2 and "2 of the 38 weights" in lines[-1], lines
    code, lines = preflight_in_process(tmp_path, monkeypatch, *run, "student.allow_missing=[model.norm.weight]")
    assert code == 2 and "(model.layers.0.mlp.up_proj.weight)" in lines[-1], lines
    monkeypatch.undo()
    both = "student.allow_missing=[model.norm.weight,model.layers.*.mlp.*]"
    run_cli(tmp_path, *run, both, "hydra.run.dir=allowed")
    assert (tmp_path / "allowed" / "final").is_dir()
    config = HFConfig(path=str(folder), init="random", vocab_size=32)  # what student.init=random builds from
    assert not config.loads_weights


def test_a_garbled_header_is_named(llama, tmp_path):
    folder = damaged(llama, tmp_path / "model", lambda f: None)
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    first = next(name for name in header if name != "__metadata__")
    assert header[first]["dtype"] == "F32"
    header[first]["dtype"] = "F16"  # as long as before: the header keeps its size, and no longer fits the data
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    file.write_bytes(bytes(data[:8]) + text.ljust(length) + bytes(data[8 + length :]))
    with pytest.raises(weights.WeightsError, match=f"model.safetensors: garbled header \\(tensor {first} has"):
        weights.stored_tensors(folder)


DISK_FULL_AT_BUILD = """
import errno
import trainer.build

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "data_cache/train.tokens.bin")

trainer.build.build_student = disk_full
"""


def torchrun(tmp_path: Path, *overrides: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = cli_env(tmp_path)
    if pythonpath is not None:  # a sitecustomize.py there runs in every rank before the trainer
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env["PYTHONPATH"]])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer"]
    return subprocess.run([*command, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_named_by_torchrun(proc: subprocess.CompletedProcess, line: str, exitcode: int) -> None:
    """Exactly one line of the ranks' starts like ``line``, and torchrun's summary names it as the root cause."""
    assert proc.returncode != 0
    ours = [text for text in proc.stderr.splitlines() if text.startswith(line.split(":")[0] + ":")]
    assert len(ours) == 1 and ours[0].startswith(line), proc.stderr[-3000:]
    summary = proc.stderr[proc.stderr.index("Root Cause") :]
    assert f"exitcode  : {exitcode}" in summary and ours[0] in summary, summary


def test_under_torchrun_a_truncated_student_folder_is_one_line_the_summary_names(llama, tmp_path):
    folder = damaged(llama, tmp_path / "model", truncated)
    proc = torchrun(tmp_path, *(o.format(folder=folder) for o in AS_STUDENT), "parallel=ddp")
    assert_one_line_named_by_torchrun(proc, f"config error: student.path: {folder}/model.safetensors: truncated", 2)


def test_under_torchrun_a_failure_after_the_preflight_is_one_line_the_summary_names(tmp_path):
    """A disk that fills while the ranks build the run (after the preflight passed): exit 1 and one line naming the
    file, not a traceback per rank."""
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(DISK_FULL_AT_BUILD)
    proc = torchrun(tmp_path, *FAST, "parallel=ddp", "train.max_steps=2", pythonpath=tmp_path / "fault")
    line = "error: No space left on device: data_cache/train.tokens.bin (rank 0)"
    assert_one_line_named_by_torchrun(proc, line, 1)
    assert "sitecustomize.py" not in proc.stderr  # no rank's traceback (torchrun prints its own, of the agent)
