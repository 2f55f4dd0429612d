"""``python -m trainer`` with a teacher of another tokenizer (``distill.align``): a small Llama whose byte-level BPE
has 380 tokens (its head has 420 rows: 40 of padding) teaches a Llama student of a 300-token BPE over text files.
``auto`` chooses ``span`` and says so in one line (with how many tokens the vocabularies share); ``span`` and ``uld``
train, and on-policy distillation too, logging what the alignment kept (``distill/aligned_fraction``,
``distill/shared_mass``) and the validation loss in bits per byte; ``exact``, and what a teacher of another
tokenizer cannot do yet, are refused in one line before anything starts; an ensemble of a teacher of each tokenizer
trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import preflight_in_process, read_metrics, run_cli, stopped_and_resumed
from tests.data_files import documents, save_llama, save_tokenizer

pytestmark = pytest.mark.e2e
pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")

RUN = [
    "data=text",
    "data.files=[corpus/*.md]",
    "data.tokenizer=student",
    "student=hf",
    "student.path=student",
    "student.block_size=16",
    "teacher=hf",
    "teacher.checkpoint=teacher",
    "distill=kd",
    "train.batch_size=4",
    "train.max_steps=3",
    "train.eval_every=3",
    "logger=console",
    "logger.progress=false",
    "logger.log_every=1",
    "report.side_by_side=false",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cross_tokenizer")
    save_llama(root / "teacher", 420, seed=1, tokenizer=save_tokenizer(root / "tok420", 420))  # the BPE stops at 380
    save_llama(root / "student", 300, seed=0, tokenizer=save_tokenizer(root / "tok300", 300))
    save_llama(root / "teacher300", 300, seed=2, tokenizer=root / "tok300")  # a teacher of the student's tokenizer
    (root / "corpus").mkdir()
    for i, text in enumerate(documents(40)):
        (root / "corpus" / f"{i:03d}.md").write_text(text)
    return root


@pytest.mark.parametrize("align, how", [("auto", "span"), ("uld", "uld")])
def test_a_teacher_of_another_tokenizer_teaches_at_the_aligned_positions(root, align, how):
    proc = run_cli(root, *RUN, f"distill.align={align}", f"hydra.run.dir={align}")
    said = [line for line in proc.stderr.splitlines() if line.startswith("distill.align=")]
    assert said and said[0].startswith(f"distill.align={align}: {how} (the teacher's tokenizer has 380 tokens, the "
                                       "student's 300; "), said  # fmt: skip
    shared = int(said[0].split("; ")[1].split()[0])
    assert 250 <= shared <= 300
    rows = read_metrics(root / align)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert 0.3 < row["distill/aligned_fraction"] <= 1 and 0 < row["distill/shared_mass"] <= 1
        assert math.isfinite(row["distill/kd"]) and row["distill/kd"] > 0
    assert (root / align / "final" / "config.json").is_file()
    (last,) = [row for row in rows if "eval/val_loss" in row]
    # the validation loss over the text's UTF-8 bytes (what students of other tokenizers compare by): a token of
    # this BPE is 1-4 bytes of the corpus's ASCII words
    bits = last["eval/bits_per_byte"] * math.log(2)
    assert last["eval/val_loss"] / 4 < bits < last["eval/val_loss"]


ENSEMBLE = [*(arg for arg in RUN if not arg.startswith("teacher")), "teacher=ensemble",
            "teacher.members=[{checkpoint: teacher, weight: 0.4}, {checkpoint: teacher300, weight: 0.6}]"]  # fmt: skip


@pytest.mark.slow  # three runs each; resuming a run of the student's tokenizer is exact in the default tier
# (tests/e2e/test_training_run.py): the alignment is a function of the batch, and holds no state of its own
@pytest.mark.parametrize(
    "name, overrides, keys",
    [
        ("span", [*RUN, "distill.align=span"], ("distill/aligned_fraction", "distill/shared_mass")),
        ("ensemble", ENSEMBLE, ("distill/kd/member0", "distill/kd/member1", "distill/aligned_fraction/member0")),
    ],
)
def test_a_run_with_a_teacher_of_another_tokenizer_resumes_exactly(root, name, overrides, keys):
    resumed, whole = stopped_and_resumed(root, f"resume_{name}", *overrides)
    assert [row["step"] for row in resumed] == [row["step"] for row in whole] == [1, 2, 3]
    for got, want in zip(resumed, whole, strict=True):
        for key in ("train/loss", "distill/kd", *keys):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)


def test_an_ensemble_of_teachers_of_two_tokenizers_trains(root):
    """One member of another tokenizer (aligned by span), one of the student's (exact): each member's KD term is
    logged, and what the alignment kept for the first; the KD is their weighted sum."""
    run_cli(root, *ENSEMBLE, "hydra.run.dir=ensemble")
    rows = read_metrics(root / "ensemble")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        weighted = 0.4 * row["distill/kd/member0"] + 0.6 * row["distill/kd/member1"]
        assert row["distill/kd"] == pytest.approx(weighted, rel=1e-6)
        assert 0.3 < row["distill/aligned_fraction/member0"] <= 1 and "distill/aligned_fraction/member1" not in row


def test_a_teacher_of_another_tokenizer_grades_the_students_own_completions(root):
    """On-policy distillation across tokenizers: the student's completions are decoded with its rows, the teacher
    reads the text in its own tokens, and the divergence is taken at the completions' aligned positions;
    ``distill/teacher_logprob`` is the teacher's log-probability of the completions' text (its tokens wholly in it)
    per student token."""
    run_cli(root, *RUN, "distill=on_policy", "distill.prompt_tokens=4", "distill.max_new_tokens=8",
            "hydra.run.dir=on_policy")  # fmt: skip
    rows = read_metrics(root / "on_policy")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert row["distill/on_policy_kl"] > 0 and row["distill/teacher_logprob"] < 0 and row["gen/mean_length"] > 0
        assert 0.3 < row["distill/aligned_fraction"] <= 1 and math.isfinite(row["distill/kd"])
    # the random teacher spreads its probability over 380 tokens: a text token costs it about log(380) nats, and a
    # student token is one to a few of its tokens
    assert all(-6 * math.log(380) < row["distill/teacher_logprob"] < -0.5 * math.log(380) for row in rows)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["distill.align=exact"], "config error: data.tokenizer: student (300 tokens) is not the teacher's tokenizer "
         "(teacher, 380 tokens): distill.align=exact needs one (auto, span or uld align them)"),
        (["distill.top_k=8"], "config error: distill.top_k: distill.align=span: compares the shared tokens whole"),
        (["distill.align=nearest"], "config error: distill.align: must be one of auto, exact, span, uld"),
        (["teacher.placement=cache", "teacher.cache_dir=nowhere"], "config error: teacher.placement: "
         "distill.align=span: a teacher of another tokenizer is cached by document (teacher.cache_layout=documents"),
        (["teacher.placement=shard"], "config error: teacher.placement: shard needs more than one data-parallel "
         "rank"),
    ],
)  # fmt: skip
def test_what_a_teacher_of_another_tokenizer_cannot_do_is_one_line(root, monkeypatch, overrides, line):
    code, lines = preflight_in_process(root, monkeypatch, *RUN, *overrides, "hydra.run.dir=refused")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(line), lines
    assert not (root / "refused").exists()


def test_a_row_longer_than_the_teachers_context_in_its_tokens_stops_the_run_in_one_line(root):
    """The teacher reads the student's rows re-tokenized: a row of 16 student tokens is more teacher tokens than a
    teacher of 8 positions has (checked as the batch is aligned; the preflight cannot know the lengths)."""
    import json
    import shutil

    shutil.copytree(root / "teacher", root / "short_teacher", dirs_exist_ok=True)
    config = json.loads((root / "short_teacher" / "config.json").read_text())
    (root / "short_teacher" / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8}))
    proc = run_cli(root, *RUN, "teacher.checkpoint=short_teacher", "hydra.run.dir=short", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: student.block_size: a row of 16 student tokens is ")
    assert errors[0].endswith(" tokens of the teacher's tokenizer, more than its 8 positions (at step 0): lower "
                              "student.block_size")  # fmt: skip
    assert "Traceback" not in proc.stderr
