"""Students of other decoder families: Qwen3 runs through the Llama family's structure spec (its q/k norms are per
head dimension, so heads and channels are cut as Llama's), and a model type no spec knows (StableLM) runs on the
generic path (transformers' own forward, its one list of decoder layers found from the model) with KD, pruning,
QAT, DDP and an export that transformers loads alone; what needs a spec is refused naming the model types that
have one. Tiny random models built from each config, no downloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, HF_VOCAB, cli_env, preflight_in_process, read_metrics, run_cli, save_hf_student
from trainer import export
from trainer.preflight import layout

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

GPT_FREE = [arg for arg in FAST if not arg.startswith("student.")]  # FAST's student fields are GPT's
SPECS = "the model types with one: gemma3_text, gpt2, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe"
FRESH_PROCESS_LOGITS = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=x).logits, sys.argv[3])
assert "trainer" not in sys.modules
print(type(model).__name__)
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decoders")
    for kind in ("llama", "qwen3", "stablelm"):
        save_hf_student(root / kind, kind)
    return root


def transformers_logits(root: Path, folder: Path, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The logits of ``x`` by the model in ``folder`` as transformers alone runs it, in a fresh process."""
    torch.save(x, root / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOGITS, str(folder), str(root / "x.pt"), str(root / "logits.pt")],
        capture_output=True, text=True, timeout=120, env=cli_env(root),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1], torch.load(root / "logits.pt")


@pytest.mark.slow  # a Llama cut in the default tier: test_from_teacher_cli.py
def test_a_qwen3_cut_by_depth_and_width_is_distilled_and_transformers_runs_its_export(root):
    run_cli(root, *GPT_FREE, "student=from_teacher", "student.block_size=16", "student.layers=2", "student.width=0.5",
            "teacher=hf", "teacher.checkpoint=qwen3", "distill=kd", "train.max_steps=3", "logger.log_every=1",
            "hydra.run.dir=qwen3_cut")  # fmt: skip
    rows = read_metrics(root / "qwen3_cut")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["distill/kd"] >= 0 for r in rows)
    final = root / "qwen3_cut" / "final"
    x = torch.randint(0, HF_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    name, theirs = transformers_logits(root, final, x)
    with torch.no_grad():
        ours = export.load(final)(x)
    assert name == "Qwen3ForCausalLM"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    config = json.loads((final / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 64)


@pytest.mark.slow  # the generic path in one process in the default tier (tests/unit/test_hf_models.py); DDP
# runs equal one process in test_parallel_runs.py
def test_a_model_type_without_a_spec_trains_under_ddp_with_kd_pruning_and_qat(root):
    """StableLM: magnitude pruning then int8 QAT on its decoder layers, KD from a Llama teacher, 2 DDP ranks; the
    compressed-tensors export runs in transformers alone as Stillroom runs it."""
    overrides = [
        *GPT_FREE, "student=hf", "student.path=stablelm", "student.block_size=16", "distill=kd", "teacher=hf",
        "teacher.checkpoint=llama", "train.max_steps=4", "parallel=ddp", "compress=prune_qat",
        "compress.modifiers.0.targets=[model.layers.*]", "compress.modifiers.0.start_step=0",
        "compress.modifiers.0.end_step=2", "compress.modifiers.0.every=1",
        "compress.modifiers.1.targets=[model.layers.*]", "compress.modifiers.1.start_step=2", "logger.log_every=1",
        "hydra.run.dir=stablelm_ddp",
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer"]
    proc = subprocess.run([*command, *overrides], cwd=root, env=cli_env(root), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distill: fused head + divergence" in proc.stdout + proc.stderr  # its head is a plain Linear
    rows = read_metrics(root / "stablelm_ddp")
    assert rows[-1]["compress/sparsity"] == pytest.approx(0.5, abs=0.01) and rows[-1]["compress/qat_active"] == 1
    final = root / "stablelm_ddp" / "final"
    x = torch.randint(0, HF_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    name, theirs = transformers_logits(root, final, x)
    with torch.no_grad():
        ours = export.load(final)(x)
    assert name == "StableLmForCausalLM"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            ["student=hf", "student.path={stablelm}", "parallel=pipeline", "parallel.pp=2"],
            "parallel.pp: pipeline parallelism splits a student into stages of decoder layers: the generic path",
        ),
        (
            ["student=hf", "student.path={stablelm}", "compress=prune_channel"],
            "compress.modifiers.0.kind: channel pruning needs a student with heads and MLP channels: the generic path",
        ),
        (
            ["student=from_teacher", "teacher=hf", "teacher.checkpoint={stablelm}", "distill=kd"],
            "student.arch: from_teacher cuts decoder layers and units: the generic path",
        ),
    ],
    ids=["pipeline", "channel pruning", "from_teacher"],
)
def test_what_needs_a_structure_spec_names_the_model_types_that_have_one(root, tmp_path, monkeypatch, overrides, says):
    args = [o.format(stablelm=root / "stablelm") for o in overrides]
    if "parallel=pipeline" in overrides:  # as under torchrun --nproc_per_node=2
        monkeypatch.setattr(layout, "world_size_from_env", lambda: 2)
    code, lines = preflight_in_process(tmp_path, monkeypatch, *GPT_FREE, "student.block_size=16", *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {says}"), lines
    assert lines[0].endswith(SPECS), lines[0]
