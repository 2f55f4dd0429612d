"""On-policy distillation on several ranks (torchrun, gloo) against one process on the same global batch: DDP and
FSDP2 on 2 ranks write the same completions and reach the same losses at every step as one process whose
micro-batches are the ranks' slices (``train.grad_accum=2``), and, with completions of different lengths, as one
process that reads the whole batch at once; a remote teacher rank scores the samples as the replicated teacher does
(over a compact wire too, as its top-k); a 2-rank run SIGKILLed inside its last checkpoint write, resumed from the
checkpoint before, equals the uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, KILL_DURING_CHECKPOINT, cli_env, train_small_teacher
from tests.dist.equality import REASSOCIATION, by_step
from trainer.cache import compact
from trainer.distill.sampling import on_policy_rows

pytestmark = pytest.mark.dist

STEPS = 6
RUN = [
    *FAST,
    "distill=on_policy",
    "teacher=path",
    "teacher.checkpoint=t/final",
    "distill.lmbda=0.5",
    "distill.prompt_tokens=4",
    "distill.max_new_tokens=8",
    "distill.top_p=0.9",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=3",
    "train.ckpt_every=3",
]
KEYS = (
    "train/loss",
    "train/ce",
    "distill/kd",
    "distill/on_policy_kl",
    "distill/teacher_logprob",
    "gen/mean_length",
    "eval/val_loss",
)


def launch(
    root: Path, nproc: int, name: str, *overrides: str, base: list[str] = RUN, killed_at: int | None = None
) -> Path:
    """``python -m trainer`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m trainer`` into ``root/name`` (its
    stderr kept as ``root/name.stderr``); with ``killed_at``, every rank SIGKILLs itself inside checkpoint write
    ``killed_at`` (``kill_during_checkpoint.py``)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    entry = [str(KILL_DURING_CHECKPOINT), str(killed_at)] if killed_at else ["-m", "trainer"]
    command = [sys.executable, *torchrun, *entry, *base, *overrides, f"hydra.run.dir={name}"]
    env = cli_env(root) | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    (root / f"{name}.stderr").write_text(proc.stderr)
    if killed_at:
        assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-5000:]
    else:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return root / name


def samples(run: Path) -> dict[int, list]:
    """The ``gen/samples`` tables by step: every rank's completions (sample index, prompt, completion)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["rows"] for row in rows if row.get("table") == "gen/samples"}


def assert_same(run: Path, reference: Path) -> None:
    got, want = by_step(run), by_step(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in KEYS:
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (step, key)
    assert samples(run) == samples(reference)
    assert sorted(samples(reference)) == [3, 6] and len(samples(reference)[6]) == 4  # lmbda 0.5 of 8 samples


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("on_policy")
    train_small_teacher(root)
    return root


@pytest.fixture(scope="module")
def single(root) -> Path:
    return launch(root, 1, "single", "train.grad_accum=2")


@pytest.fixture(scope="module")
def fsdp(root) -> Path:
    return launch(root, 2, "fsdp", "parallel=fsdp")


@pytest.fixture(scope="module")
def ddp(root) -> Path:
    return launch(root, 2, "ddp", "parallel=ddp")


def test_fsdp_on_two_ranks_equals_one_process(single, fsdp):
    """At step 0 rank 0 completes all its 4 rows and rank 1 none: rank 1 joins the sharded forwards of rank 0's
    generation with a row of padding (without it, the ranks' all-gathers do not match and the run hangs)."""
    first = on_policy_rows(1337, 0, 8, 0.5)
    assert first[:4].all() and not first[4:].any()
    assert_same(fsdp, single)


def test_ddp_on_two_ranks_equals_one_process(single, ddp):
    assert_same(ddp, single)


@pytest.mark.slow  # a remote teacher rank scores as the replicated teacher in the default tier (the test below)
def test_a_remote_teacher_rank_scores_the_samples_as_the_replicated_teacher(root, ddp):
    remote = launch(root, 3, "remote", "parallel=ddp", "teacher.placement=remote", "parallel.teacher_ranks=1")
    assert_same(remote, ddp)
    assert by_step(remote)[STEPS]["distill/teacher_param_bytes"] == 0  # the student ranks hold no teacher


@pytest.mark.slow  # 5 ranks in all; the compact wire's rows against the exact top-k: test_teacher_placement.py
def test_a_compact_wire_grades_the_samples_as_the_replicated_teachers_top_k(root):
    """``teacher.wire=compact`` with on-policy distillation: the samples go to the teacher rank with the label after
    each row, and come back as compact top-8 rows with their tail and the teacher's log-probability of each next
    token. At step 1 (the same student writes the same completions) the teacher's log-probability of them is the
    replicated teacher's (computed on the teacher rank in fp32) and the KD terms are the exact top-8's within the
    codes' rounding; after it the students differ by that rounding, and so may their samples (seen: from step 3)."""
    top8 = ["distill.top_k=8", "distill.top_k_tail=true", "parallel=ddp"]
    replicated = launch(root, 2, "replicated_top8", *top8)
    packed = launch(root, 3, "compact_wire", *top8, "teacher.placement=remote", "parallel.teacher_ranks=1",
                    "teacher.wire=compact")  # fmt: skip
    got, want = by_step(packed), by_step(replicated)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert got[1]["distill/teacher_logprob"] == pytest.approx(want[1]["distill/teacher_logprob"], rel=1e-6)
    for key in ("distill/kd", "distill/on_policy_kl"):
        assert got[1][key] == pytest.approx(want[1][key], rel=2e-3), key
    for step in range(2, STEPS + 1):  # other samples of nearly the same student: the same scale
        for key, near in (("distill/teacher_logprob", 0.1), ("distill/kd", 0.05), ("distill/on_policy_kl", 0.1)):
            assert got[step][key] == pytest.approx(want[step][key], rel=near), (step, key)
    # on the wire: a training row's top-8 of the 32 tokens with its tail, a graded sample's 4 bytes more (fp32 logits:
    # 128)
    row = compact.value_bytes(8) + compact.index_bytes(8, 32) + 4
    (line,) = [line for line in (root / "compact_wire.stderr").read_text().splitlines() if "served" in line]
    assert f"compact: {row:.1f} bytes a token" in line and f"compact graded samples: {row + 4:.1f} bytes" in line, line


def test_a_run_killed_inside_a_checkpoint_write_and_resumed_equals_the_uninterrupted_run(root, fsdp):
    """Both FSDP ranks die (SIGKILL) after writing step 6's shards and before the checkpoint is complete: the
    restart resumes from step 3 and generates and trains steps 4-6 exactly as the uninterrupted run did."""
    killed = launch(root, 2, "resumed", "parallel=fsdp", killed_at=2)
    assert (killed / "ckpt" / "step_0000003").is_dir() and not (killed / "ckpt" / "step_0000006").exists()
    assert sorted(by_step(killed)) == list(range(1, STEPS + 1))  # it had logged every step before it died
    resumed = launch(root, 2, "resumed", "parallel=fsdp")
    assert_same(resumed, fsdp)


@pytest.mark.slow  # the sharded teacher's forward, as in tests/dist/test_teacher_placement.py
def test_a_sharded_teacher_scores_the_samples_as_the_replicated_teacher(root, fsdp):
    shard = launch(root, 2, "shard", "parallel=fsdp", "teacher.placement=shard")
    assert_same(shard, fsdp)


@pytest.mark.slow  # completions of several lengths under FSDP: the default tier has them in the text data test
def test_chat_with_a_llama_student_under_fsdp_equals_one_process(tmp_path):
    """data=chat: the prompts (up to each conversation's assistant turn) differ in length within and across the
    ranks, whose generations still run the same sharded forwards; the losses and completions equal one process's."""
    pytest.importorskip("transformers")
    from tests.data_files import conversations, save_llama, save_tokenizer, write_jsonl

    save_llama(tmp_path / "llama_teacher", 300, seed=1, tokenizer=save_tokenizer(tmp_path / "tok"))
    save_llama(tmp_path / "student", 300, seed=0)
    write_jsonl(tmp_path / "chat.jsonl", conversations(60))
    shared = ("logger", "logger.progress", "train.batch_size", "distill", "distill.lmbda", "train.max_steps",
              "logger.log_every", "train.eval_every", "train.ckpt_every")  # fmt: skip
    chat = ["data=chat", "data.files=[chat.jsonl]", "student=hf", "student.path=student", "student.block_size=48",
            "teacher=hf", "teacher.checkpoint=llama_teacher", "distill.max_new_tokens=8",
            *(o for o in RUN if o.split("=")[0] in shared)]  # fmt: skip
    one = launch(tmp_path, 1, "chat1", "train.grad_accum=2", base=chat)
    two = launch(tmp_path, 2, "chat2", "parallel=fsdp", base=chat)
    assert_same(two, one)
    lengths = {row[4] for rows in samples(one).values() for row in rows}
    assert len(lengths) > 1  # completions of several lengths: prompts of several lengths in one batch


@pytest.mark.slow  # on-policy runs on 2 ranks equal one process in the default tier (the tests above)
def test_completions_of_different_lengths_in_one_step_equal_one_process(tmp_path):
    """An end-of-text-happy Llama student on text data: within a step some completions end early and others run
    their 8 tokens, so the ranks' micro-batches hold different numbers of completion tokens. Each loss part is a mean
    over the global batch's tokens of that part, so FSDP2 on 2 ranks, and one process with 2 micro-batches, equal one
    process that reads the whole batch at once, at every step (a mean of the ranks' means would not). DDP reduces
    the same sums (``DataParallelRuntime``) and equals one process in the tests above."""
    pytest.importorskip("transformers")
    from tests.data_files import documents, save_eos_happy_llama, save_llama, save_tokenizer

    save_llama(tmp_path / "llama_teacher", 300, seed=1, tokenizer=save_tokenizer(tmp_path / "tok"))
    save_eos_happy_llama(tmp_path / "student", 300, eos=0)  # save_tokenizer's <|endoftext|> is id 0
    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(documents(40)):
        (tmp_path / "corpus" / f"{i:03d}.md").write_text(text)
    shared = ("logger", "logger.progress", "train.batch_size", "distill", "distill.lmbda", "distill.prompt_tokens",
              "distill.max_new_tokens", "distill.top_p", "logger.log_every")  # fmt: skip
    text = ["data=text", "data.files=[corpus/*.md]", "student=hf", "student.path=student", "student.block_size=16",
            "teacher=hf", "teacher.checkpoint=llama_teacher", "train.max_steps=4", "train.eval_every=1",
            "train.ckpt_every=4", *(o for o in RUN if o.split("=")[0] in shared)]  # fmt: skip
    whole = launch(tmp_path, 1, "whole", base=text)
    lengths = {step: sorted({row[4] for row in rows}) for step, rows in samples(whole).items()}
    assert sum(len(step_lengths) > 1 for step_lengths in lengths.values()) >= 2, lengths  # of the 4 steps
    for name, overrides in [("accum2", ["train.grad_accum=2"]), ("fsdp", ["parallel=fsdp"])]:
        run = launch(tmp_path, 1 if name == "accum2" else 2, name, *overrides, base=text)
        assert samples(run) == samples(whole), name
        got, want = by_step(run), by_step(whole)
        for step, expected in want.items():
            for key in ("train/loss", "train/ce", "distill/kd", "distill/on_policy_kl", "gen/mean_length"):
                assert got[step][key] == pytest.approx(expected[key], rel=REASSOCIATION), (name, step, key)


def test_a_remote_teacher_scores_while_the_student_writes_the_next_micro_batch(root, single):
    """1 student rank + 1 teacher rank, 2 micro-batches a step: the student writes micro-batch 2's samples while
    the teacher rank scores micro-batch 1's; the run equals one process with the replicated teacher."""
    remote = launch(
        root, 2, "remote_accum", "train.grad_accum=2", "teacher.placement=remote", "parallel.teacher_ranks=1"
    )
    assert_same(remote, single)
