"""On-policy distillation through the CLI: ``distill.lmbda=0`` is today's KD run at every step, a run with samples
trains and logs its generation metrics and completions, and bad inputs stop before anything starts (one line,
exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, preflight_in_process, read_metrics, run_cli
from trainer import export, models

pytestmark = pytest.mark.e2e

STEPS = 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random GPT teacher of the synthetic data's 32 tokens, exported."""
    import torch

    root = tmp_path_factory.mktemp("on_policy")
    torch.manual_seed(0)
    model = models.build("gpt", vocab_size=32, n_layer=2, n_head=2, n_embd=32, block_size=16)
    staging = export.staging_dir(root / "teacher")
    models.save_dense(model, staging)
    export.publish(staging, root / "teacher")
    return root / "teacher"


def run(tmp_path: Path, teacher: Path, name: str, *overrides: str) -> dict[int, dict]:
    run_cli(
        tmp_path,
        *FAST,
        "teacher=path",
        f"teacher.checkpoint={teacher}",
        f"train.max_steps={STEPS}",
        "logger.log_every=1",
        "train.eval_every=3",
        *overrides,
        f"hydra.run.dir={name}",
        timeout=300,
    )
    return {row["step"]: row for row in read_metrics(tmp_path / name)}


def test_lmbda_zero_is_the_kd_run_at_every_step(tmp_path, teacher):
    """distill=on_policy with lmbda=0 against distill=kd with the same divergence, alpha and temperature: every
    logged loss equal to 1e-6 at every step (no on-policy code runs)."""
    on_policy = run(tmp_path, teacher, "lmbda0", "distill=on_policy", "distill.lmbda=0", "distill.alpha=0.5")
    kd = run(tmp_path, teacher, "kd", "distill=kd", "distill.loss=reverse_kl", "distill.temperature=1.0")
    assert sorted(on_policy) == sorted(kd) == list(range(1, STEPS + 1))
    for step, expected in kd.items():
        for key in ("train/loss", "train/ce", "distill/kd", "eval/val_loss"):
            if key in expected:
                assert on_policy[step][key] == pytest.approx(expected[key], rel=1e-6), (step, key)
        assert not any(key.startswith("gen/") for key in on_policy[step])


def test_an_on_policy_run_logs_generation_and_its_samples(tmp_path, teacher):
    rows = run(
        tmp_path,
        teacher,
        "op",
        "distill=on_policy",
        "distill.lmbda=0.5",
        "distill.prompt_tokens=4",
        "distill.max_new_tokens=8",
        "distill.top_p=0.9",
    )
    for row in rows.values():
        assert row["gen/mean_length"] == 8.0 and row["gen/eos_fraction"] == 0.0  # no end-of-text token here
        assert row["distill/on_policy_kl"] > 0 and row["distill/teacher_logprob"] < 0 and row["gen/tokens_per_s"] > 0
    assert rows[STEPS]["train/loss"] < rows[1]["train/loss"]
    lines = (tmp_path / "op" / "metrics.jsonl").read_text().splitlines()
    tables = [line for line in lines if '"gen/samples"' in line]
    assert len(tables) == 2  # one per evaluation (steps 3 and 6)
    assert "## On-policy samples" in (tmp_path / "op" / "report.md").read_text()


# name: (overrides, the start of the line after "config error: ")
CASES = {
    "lmbda above one": (["distill=on_policy", "distill.lmbda=1.5"], "distill.lmbda: must be in [0, 1] (got 1.5)"),
    "lmbda negative": (["distill=on_policy", "distill.lmbda=-0.1"], "distill.lmbda: must be in [0, 1] (got -0.1)"),
    "no new tokens": (["distill=on_policy", "distill.max_new_tokens=0"], "distill.max_new_tokens: must be >= 1"),
    "prompt and completion longer than the sequence": (
        ["distill=on_policy", "distill.prompt_tokens=8", "distill.max_new_tokens=9"],
        "distill.prompt_tokens: a prompt of 8 tokens and distill.max_new_tokens=9 are longer than the sequence of 16",
    ),
    "the cache placement": (
        ["distill=on_policy", "teacher.placement=cache", "teacher.cache_dir=c"],
        "teacher.placement: cache holds the teacher's logits of the data set's samples",
    ),
    "digits": (
        ["data=digits", "student=mlp_small", "distill=on_policy"],
        "distill.lmbda: on-policy distillation samples text from the student: data=digits is not a language-model",
    ),
    "no divergence": (["distill=on_policy", "distill.loss=none"], "distill.lmbda: on-policy samples are graded"),
}


def command_line(name: str, teacher: Path) -> tuple[list[str], str]:
    overrides, expected = CASES[name]
    base = [] if "data=digits" in overrides else [*FAST, "distill.prompt_tokens=4", "distill.max_new_tokens=4"]
    return [*base, "teacher=path", f"teacher.checkpoint={teacher}", *overrides, "hydra.run.dir=run"], expected


@pytest.mark.parametrize("name", list(CASES))
def test_bad_on_policy_input_is_one_line_exit_2(tmp_path, teacher, name, monkeypatch):
    overrides, expected = command_line(name, teacher)
    code, lines = preflight_in_process(tmp_path, monkeypatch, *overrides)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {expected}"), lines[0]
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


def test_bad_on_policy_input_through_the_cli(tmp_path, teacher):
    overrides, expected = command_line("the cache placement", teacher)
    proc = run_cli(tmp_path, *overrides, check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"config error: {expected}"), lines[0]
    assert not (tmp_path / "run").exists()


def test_chat_prompts_are_the_conversation_up_to_the_last_assistant_turn(tmp_path):
    """data=chat with a Llama student (its key/value cache) and teacher: each sample's prompt is its conversation
    rendered up to the assistant's turn (generation prompt included); the completion is at most max_new_tokens."""
    pytest.importorskip("transformers")
    from tests.data_files import conversations, save_llama, save_tokenizer, write_jsonl

    tokenizer = save_tokenizer(tmp_path / "tok")
    save_llama(tmp_path / "llama_teacher", 300, seed=1, tokenizer=tokenizer)
    save_llama(tmp_path / "student", 300, seed=0)
    write_jsonl(tmp_path / "chat.jsonl", conversations(60))
    run_cli(
        tmp_path,
        "data=chat",
        "data.files=[chat.jsonl]",
        "student=hf",
        "student.path=student",
        "student.block_size=48",
        "distill=on_policy",
        "distill.max_new_tokens=6",
        "teacher=hf",
        "teacher.checkpoint=llama_teacher",
        "logger=console",
        "logger.progress=false",
        "logger.log_every=1",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.eval_every=2",
        "hydra.run.dir=chat",
    )
    rows = {row["step"]: row for row in read_metrics(tmp_path / "chat")}
    assert rows[2]["gen/eos_fraction"] in (0.0, 0.5, 1.0)  # of the step's 2 completions
    lines = (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()
    (table,) = [json.loads(line) for line in lines if '"gen/samples"' in line]
    assert len(table["rows"]) == 2  # lmbda 0.5 of 4 samples
    for _, _, prompt, _, length in table["rows"]:
        assert prompt.startswith("<|im_start|>user") and prompt.endswith("<|im_start|>assistant\n")
        assert 1 <= length <= 6
    assert rows[2]["gen/mean_length"] == sum(row[-1] for row in table["rows"]) / 2  # the same step's completions
