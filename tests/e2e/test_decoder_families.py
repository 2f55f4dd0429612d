"""Each decoder family with a structure spec beyond Llama's (Qwen3, Phi-3, OLMo 2, Gemma 3, and the mixtures of
experts Qwen3-MoE and Mixtral): a student cut from a teacher of the family (``student=from_teacher``: 2 of its 4
layers, half its key/value heads and MLP channels, and 2 of the 4 experts of each mixture-of-experts layer) takes
3 KD steps from it, and its export, loaded by transformers alone in a fresh process, gives the logits of the trained
model (the last checkpoint, built and run by Stillroom) within 1e-5. FSDP2 and pipeline runs of these families
against one process: tests/dist/test_hf_students.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import FAST, HF_VOCAB, cli_env, read_metrics, run_cli, save_hf_student, slow
from trainer import checkpoint, models

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

CUT_RUN = [
    *(arg for arg in FAST if not arg.startswith("student.")),  # FAST's student fields are GPT's
    "student=from_teacher",
    "student.block_size=16",
    "student.layers=2",
    "student.width=0.5",
    "distill=kd",
    "train.max_steps=3",
    "logger.log_every=1",
]
# Gemma 3's sliding layers and soft-capped logits in the default tier (each family's logits, masks, thinning and
# export in one process: tests/unit/test_hf_models.py; the experts' cut: tests/unit/test_cut.py)
KINDS = [
    slow("qwen3", id="qwen3"),
    slow("phi3", id="phi3"),
    slow("olmo2", id="olmo2"),
    "gemma3",
    slow("qwen3_moe", id="qwen3_moe"),
    slow("mixtral", id="mixtral"),
]
# The cut's sizes: layers, key/value heads, query heads, dense MLP channels (the experts keep theirs), experts
SIZES = ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "intermediate_size")
CUT_SIZES = {"qwen3_moe": [2, 1, 2, 128, 2], "mixtral": [2, 1, 2, 128, 2]}  # layers 0 and 3: experts only
EXPERTS = {"qwen3_moe": "num_local_experts", "mixtral": "num_local_experts"}  # transformers writes Mixtral's name
TRANSFORMERS_LOGITS = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
"""


@pytest.mark.parametrize("kind", KINDS)
def test_a_cut_is_distilled_and_its_export_gives_the_trained_logits_in_transformers(tmp_path, kind):
    save_hf_student(tmp_path / "teacher", kind)
    experts = ["student.experts=2"] if kind in EXPERTS else []
    run_cli(tmp_path, *CUT_RUN, *experts, "teacher=hf", "teacher.checkpoint=teacher", "hydra.run.dir=cut")
    rows = read_metrics(tmp_path / "cut")
    assert [row["step"] for row in rows] == [1, 2, 3] and all(math.isfinite(row["distill/kd"]) for row in rows)
    final = tmp_path / "cut" / "final"
    config = json.loads((final / "config.json").read_text())
    sizes = [config[key] for key in (*SIZES, *([EXPERTS[kind]] if kind in EXPERTS else []))]
    assert sizes == CUT_SIZES.get(kind, [2, 1, 2, 64])
    assert config["model_type"] == {"gemma3": "gemma3_text"}.get(kind, kind)
    newest = checkpoint.latest(tmp_path / "cut" / "ckpt")
    assert newest is not None
    trained = models.build_from_spec(checkpoint.read_model_spec(newest))
    checkpoint.load_model_weights(newest, trained)
    x = torch.randint(0, HF_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    command = [sys.executable, "-c", TRANSFORMERS_LOGITS, str(final), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    subprocess.run(command, check=True, env=cli_env(tmp_path), capture_output=True, timeout=300)
    with torch.no_grad():
        logits = torch.load(tmp_path / "y.pt", weights_only=True)  # what transformers computed
        torch.testing.assert_close(logits, trained.eval()(x), rtol=0, atol=1e-5)
