"""``python -m trainer student=hf student.path=DIR``: a small Llama saved by transformers is distilled from a
Stillroom GPT teacher, and its ``final/`` is a Hugging Face folder that transformers loads in a fresh process
(without Stillroom) with the trained student's logits; a folder with only a config.json trains from random init
with ``student.config_overrides``; bad inputs are one config-error line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, HF_VOCAB, read_metrics, run_cli, save_hf_student, train_small_teacher
from tests.dist.equality import final_weights
from trainer import checkpoint, models
from trainer.report import folder_bytes

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers", reason="Hugging Face students need the `hf` extra")

STEPS = 6
HF_RUN = [
    *(arg for arg in FAST if not arg.startswith("student.")),  # FAST's student fields are GPT's
    "student=hf",
    "student.block_size=16",
    "logger.log_every=1",
    "train.eval_every=3",
]
# Loads final/ with transformers alone and writes its logits on the saved tokens (argv: folder, tokens, out).
TRANSFORMERS_ONLY = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
assert not any(name == "trainer" or name.startswith(("trainer.", "parallel")) for name in sys.modules)
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A GPT teacher on the synthetic data (``t/final``), a Llama with weights (``llama``) and a GPT-2 config alone
    (``gpt2``), both on the synthetic data's vocabulary."""
    root = tmp_path_factory.mktemp("hf_student")
    train_small_teacher(root)
    save_hf_student(root / "llama", "llama")
    save_hf_student(root / "gpt2", "gpt2", weights=False)
    return root


@pytest.fixture(scope="module")
def distilled(root) -> Path:
    run_cli(root, *HF_RUN, "student.path=llama", "distill=kd", "teacher=path", "teacher.checkpoint=t/final",
            f"train.max_steps={STEPS}", "hydra.run.dir=distilled")  # fmt: skip
    return root / "distilled"


def test_a_hugging_face_student_is_distilled(distilled):
    rows = read_metrics(distilled)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(row["distill/kd"] > 0 for row in rows) and rows[-1]["eval/val_loss"] > 0
    spec = checkpoint.read_model_spec(checkpoint.latest(distilled / "ckpt"))
    assert spec["arch"] == "hf_llama" and spec["config"]["hf_config"]["num_key_value_heads"] == 2


def test_transformers_loads_the_export_in_a_fresh_process_with_the_students_logits(distilled, tmp_path):
    final = distilled / "final"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {f.name for f in final.iterdir()}
    student = models.build_from_spec(checkpoint.read_model_spec(checkpoint.latest(distilled / "ckpt")))
    models.load_weights(student, final_weights(distilled))
    x = torch.randint(0, HF_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ONLY, str(final), str(tmp_path / "x.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with torch.no_grad():
        want = student.eval()(x)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), want, rtol=0, atol=1e-5)


@pytest.mark.slow  # a config-only folder's random init and overrides: tests/unit/test_hf_models.py; thinning above
def test_a_config_only_folder_trains_from_random_init_with_overrides_and_is_thinned(root):
    """GPT-2 from its config.json alone, cut to 2 layers by ``+student.config_overrides.num_hidden_layers`` (its
    config calls it n_layer) with an MLP of 96; plain training with channel pruning to half the units: the export
    is a Hugging Face folder of the thinned model (48 MLP channels; all 4 heads, which GPT-2's config cannot
    thin, the pruned ones zero), and transformers loads it."""
    run_cli(root, *HF_RUN, "student.path=gpt2", "+student.config_overrides.num_hidden_layers=2",
            "+student.config_overrides.n_inner=96", "train.max_steps=2", "compress=prune_channel",
            "compress.modifiers.0.targets=[transformer.h.*]", "compress.modifiers.0.schedule=constant",
            "compress.modifiers.0.start_step=1", "hydra.run.dir=scratch")  # fmt: skip
    final = root / "scratch" / "final"
    config = json.loads((final / "config.json").read_text())
    assert (config["model_type"], config["n_layer"], config["n_inner"], config["n_head"]) == ("gpt2", 2, 48, 4)
    heads = transformers.AutoModelForCausalLM.from_pretrained(final).transformer.h[0].attn.c_attn.weight
    assert int((heads.abs().sum(0) == 0).sum()) == 2 * 3 * 16  # 2 of 4 heads of 16: their q, k and v columns


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["student.path=llama", "data.synthetic_vocab=40"],
            "config error: student.path: llama: the model's vocabulary of 32 tokens differs from the data's 40: the "
            "student reads the data's token ids",
        ),
        (
            ["student.path=llama", "student.block_size=128"],
            "config error: student.block_size: 128 is longer than the model's 64 positions (llama)",
        ),
        (["student.path=t/final"], "config error: student.path: t/final/config.json: transformers cannot read it"),
    ],
    ids=["vocabulary", "block_size", "not_hf"],
)
def test_bad_inputs_are_one_line_and_write_nothing(root, overrides, line):
    proc = run_cli(root, *HF_RUN, *overrides, "hydra.run.dir=refused", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line)
    assert not (root / "refused").exists()


def test_a_qat_student_is_exported_in_the_compressed_tensors_format_and_reported_as_transformers_runs_it(root):
    """int4 QAT on the decoder layers: ``final/`` is a compressed-tensors folder (see
    tests/unit/test_compressed_tensors.py for its logits and bytes), and the report's export row is the model
    transformers loads: the trained fake-quant student's val loss (the same function), the folder's bytes."""
    run_cli(root, *HF_RUN, "student.path=llama", "train.max_steps=3", "compress=qat_int4",
            "compress.modifiers.0.targets=[model.layers.*]", "compress.modifiers.0.start_step=1",
            "hydra.run.dir=qat")  # fmt: skip
    final = root / "qat" / "final"
    quantization = json.loads((final / "config.json").read_text())["quantization_config"]
    assert (quantization["quant_method"], quantization["format"]) == ("compressed-tensors", "pack-quantized")
    rows = {row["model"]: row for row in json.loads((root / "qat" / "report.json").read_text())["models"]}
    dense, export = rows["student (fp32 dense)"], rows["student (export)"]
    assert export["val_loss"] == pytest.approx(read_metrics(root / "qat")[-1]["eval/val_loss"], abs=1e-5)
    assert export["bytes"] == folder_bytes(final) and export["bytes"] < dense["bytes"] / 3


@pytest.mark.slow  # a stopped run resumes to the uninterrupted one in the default tier: tests/e2e/test_signals.py
def test_a_stopped_hugging_face_student_resumes_to_the_uninterrupted_run(root, distilled):
    """Resuming used to be refused: the preflight compared the config's family (hf) with the checkpoint's
    (hf_llama)."""
    run = [*HF_RUN, "student.path=llama", "distill=kd", "teacher=path", "teacher.checkpoint=t/final",
           f"train.max_steps={STEPS}", "train.ckpt_every=3", "hydra.run.dir=resumed"]  # fmt: skip
    run_cli(root, *run, "train.stop_at_step=3")
    proc = run_cli(root, *run)
    assert f"resumed from {root / 'resumed' / 'ckpt' / 'step_0000003'} at step 3" in proc.stderr
    got, want = read_metrics(root / "resumed"), read_metrics(distilled)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got[-1]["train/loss"] == pytest.approx(want[-1]["train/loss"], rel=1e-6)
