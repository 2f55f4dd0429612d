"""``python -m trainer student=from_teacher``: a student cut out of a small Hugging Face Llama teacher (2 of its 4
layers, half its key/value head groups and MLP channels) is distilled from it, and its ``final/`` is a Hugging Face
folder of the thinned sizes that transformers loads; bad cuts are one config-error line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, HF_VOCAB, read_metrics, run_cli, save_hf_student
from trainer import checkpoint

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

CUT_RUN = [
    *(arg for arg in FAST if not arg.startswith("student.")),  # FAST's student fields are GPT's
    "student=from_teacher",
    "student.block_size=16",
]
TEACHER = ["teacher=hf", "teacher.checkpoint=llama", "distill=kd"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A Llama teacher with weights (``llama``: 4 layers, 64 wide, 4 query and 2 key/value heads, MLP 128, tied head) on
    the synthetic data's vocabulary."""
    root = tmp_path_factory.mktemp("from_teacher")
    save_hf_student(root / "llama", "llama")
    return root


def test_a_student_cut_from_the_teacher_is_distilled_and_exported_thinned(root):
    run_cli(root, *CUT_RUN, *TEACHER, "student.layers=2", "student.width=0.5", "student.layer_select=importance",
            "student.calib_batches=2", "train.max_steps=3", "logger.log_every=1", "hydra.run.dir=cut")  # fmt: skip
    rows = read_metrics(root / "cut")
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["distill/kd"] >= 0 for row in rows)
    spec = checkpoint.read_model_spec(checkpoint.latest(root / "cut" / "ckpt"))
    assert spec["arch"] == "hf_llama" and spec["config"]["hf_config"]["num_hidden_layers"] == 2
    final = root / "cut" / "final"
    config = json.loads((final / "config.json").read_text())
    sizes = ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "intermediate_size", "hidden_size")
    assert [config[key] for key in sizes] == [2, 1, 2, 64, 64]
    model = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    assert len(model.model.layers) == 2 and model.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    with torch.no_grad():
        assert model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, HF_VOCAB)


@pytest.mark.parametrize(
    "overrides, line",
    [
        ([*TEACHER, "student.layers=5"], "config error: student.layers: 5 is more than the teacher's 4 decoder layers"),
        ([*TEACHER, "student.width=0"], "config error: student.width: must be in (0, 1] (got 0.0)"),
        ([*TEACHER, "student.hidden_width=1.5"], "config error: student.hidden_width: must be in (0, 1] (got 1.5)"),
        (
            [*TEACHER, "student.width=0.75"],
            "config error: student.width: 0.75 of 2 attention head groups (a key/value head with its query heads) is "
            "1.5, not a whole number: use one of 0.5, 1",
        ),
        (
            ["train.max_steps=1"],
            "config error: student.arch: from_teacher cuts the student out of the teacher: name one",
        ),
    ],
    ids=["layers", "width", "hidden_width", "head_groups", "no_teacher"],
)
def test_bad_cuts_are_one_line_and_write_nothing(root, overrides, line):
    proc = run_cli(root, *CUT_RUN, *overrides, "hydra.run.dir=refused", check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line), proc.stderr
    assert not (root / "refused").exists()


@pytest.mark.slow  # three runs; the resume identity it needs is checked in tests/unit/test_checkpoint_faults.py
def test_a_cut_student_stopped_by_sigterm_resumes_with_the_same_command_to_the_uninterrupted_run(root):
    """A teacher whose config.json says bfloat16, as released models' do: the checkpoint's model spec records the
    trained model's dtype (float32), the config's the teacher's, and resuming used to be refused as "another model".
    The same command resumes it, and the run ends as the uninterrupted one."""
    from tests.e2e.test_signals import stopped_by_sigterm_and_resumed

    if not (root / "llama_bf16").exists():
        shutil.copytree(root / "llama", root / "llama_bf16")
        config = json.loads((root / "llama_bf16" / "config.json").read_text())
        (root / "llama_bf16" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    teacher = ["teacher=hf", "teacher.checkpoint=llama_bf16", "distill=kd"]
    run = [*CUT_RUN, *teacher, "student.layers=2", "student.width=0.5", "train.max_steps=60", "train.ckpt_every=30",
           "train.eval_every=60", "logger.log_every=1"]  # fmt: skip
    stopped_by_sigterm_and_resumed(root, run, steps=60)
