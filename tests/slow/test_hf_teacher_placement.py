"""A Hugging Face teacher on 2 ranks (torchrun, gloo): ``teacher.placement=shard`` (its transformer layers are
FSDP2's units) equals ``replicate`` at every step, logits and hidden states alike, with half the teacher per rank
from the start (its peak resident memory); a padded vocabulary, aligned by itself, under ``shard`` equals the
unpadded teacher; a student padded past its tokenizer gets the real vocabulary's logits from a remote teacher and a
cache alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, cli_env, read_metrics, save_hf_teachers, save_tokenizer, slow
from tests.gguf_files import write_gguf

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers", reason="Hugging Face teachers need the `hf` extra")

STEPS = 4
RUN = [
    *FAST,
    "distill=kd",
    f"train.max_steps={STEPS}",
    "logger.log_every=1",
    "train.eval_every=2",
    "distill.features=[{student_layer:2,teacher_layer:2,loss:mse,weight:0.1}]",
]
EXACT = 1e-5


def launch(root: Path, name: str, *overrides: str) -> dict[int, dict]:
    """``torchrun --nproc_per_node=2 -m trainer`` into ``root/name``; its metrics by step."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer",
        *RUN,
        *overrides,
        f"hydra.run.dir={name}",
    ]
    proc = subprocess.run(
        command,
        cwd=root,
        env=cli_env(root) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {row["step"]: row for row in read_metrics(root / name)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``hf32``: a 2-layer GPT-2 on the synthetic data's 32 tokens; ``hf48``: the same, embeddings padded to 48."""
    root = tmp_path_factory.mktemp("hf_dist")
    save_hf_teachers(root, 32, 48, n_embd=48)
    return root


@pytest.fixture(scope="module")
def replicate(root) -> dict[int, dict]:
    return launch(root, "replicate", "parallel=fsdp", "teacher.checkpoint=hf32")


def assert_same_losses(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, expected in want.items():
        for key in ("train/loss", "distill/kd", "distill/features", "eval/val_loss"):
            if key in expected:
                assert got[step][key] == pytest.approx(expected[key], rel=EXACT), (step, key)


def test_sharded_hf_teacher_equals_replicated_with_half_the_bytes(root, replicate):
    got = launch(root, "shard", "parallel=fsdp", "teacher.checkpoint=hf32", "teacher.placement=shard")
    assert_same_losses(got, replicate)
    assert "distill/features" in replicate[STEPS]
    whole, held = replicate[STEPS]["distill/teacher_param_bytes"], got[STEPS]["distill/teacher_param_bytes"]
    print(f"HF teacher parameter bytes on rank 0: replicate {whole:.0f}, shard {held:.0f}")
    assert 0.45 * whole <= held <= 0.55 * whole


def test_padded_hf_teacher_under_shard_equals_the_unpadded_one(root, replicate):
    got = launch(
        root,
        "shard_sliced",
        "parallel=ddp",
        "teacher.checkpoint=hf48",
        "teacher.placement=shard",
    )
    assert_same_losses(got, replicate)


def run(root: Path, nproc: int, module: str, *overrides: str) -> None:
    """``python -m module`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m module`` in ``root``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    proc = subprocess.run(
        [sys.executable, *torchrun, "-m", module, *overrides],
        cwd=root, env=cli_env(root) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_a_student_padded_past_its_tokenizer_gets_the_real_vocabulary_from_remote_and_cache(root):
    """A Llama student of 48 rows whose tokenizer has 32 tokens, the GPT-2 teacher padded to 48: both are cut to 32
    logits; the remote teacher rank (the live teacher, as ``replicate`` loads it) and a cache of its top-32 give the
    same losses at every step (the cache regroups the sums: to float rounding)."""
    student = root / "s48"
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(student)
    save_tokenizer(student, [f"t{i}" for i in range(32)])
    common = [
        *(arg for arg in FAST if not arg.startswith("student.")), "data.synthetic_vocab=48", "student=hf",
        f"student.path={student}", "student.block_size=16", "distill=kd", "teacher=hf", "teacher.checkpoint=hf48",
        "train.max_steps=3", "logger.log_every=1", "train.eval_every=3", "teacher.cache_dir=cache_s48",
    ]  # fmt: skip
    run(root, 1, "trainer.cache", *common, "hydra.run.dir=build_s48")
    key = json.loads((root / "cache_s48" / "manifest.json").read_text())["key"]
    assert (key["vocab"], key["k"]) == (32, 32)
    run(root, 1, "trainer", *common, "teacher.placement=cache", "hydra.run.dir=cached_s48")
    run(root, 2, "trainer", *common, "teacher.placement=remote", "parallel.teacher_ranks=1", "hydra.run.dir=remote_s48")
    cached, remote = (read_metrics(root / name) for name in ("cached_s48", "remote_s48"))
    kd = [(row["step"], row["distill/kd"], row["train/loss"]) for row in cached if "distill/kd" in row]
    assert [step for step, _, _ in kd] == [1, 2, 3]
    by_step = {row["step"]: row for row in remote if "distill/kd" in row}
    for step, cached_kd, cached_loss in kd:
        assert by_step[step]["distill/kd"] == pytest.approx(cached_kd, rel=0, abs=1e-6), step
        assert by_step[step]["train/loss"] == pytest.approx(cached_loss, rel=0, abs=1e-6), step


def save_big_llama(folder: Path) -> int:
    """A 32-layer Llama of about 127 MB (fp32; tied head, 1,024 tokens): big enough that what a process gains besides
    its share of the teacher (Python objects, the teacher's process group: 4 to 7 MiB measured) is small beside it.
    Returns its parameter bytes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=32, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return 4 * model.num_parameters()


def memory_run(root: Path, teacher: Path, placement: str) -> tuple[list[dict], list[torch.Tensor]]:
    """``tests/dist/teacher_memory.py`` on 2 ranks: each rank's peak-memory growth and its logits."""
    out = root / f"memory_{teacher.name}_{placement}"
    out.mkdir()
    script = Path(__file__).parent.parent / "dist" / "teacher_memory.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    # A fixed mmap threshold: glibc returns each freed buffer of 64 KiB or more to the system at once, so the peak is
    # what the process holds, not what the allocator keeps cached after FSDP2's gathers (the same for both runs).
    env = cli_env(root) | {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [*command, str(teacher), placement, str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = range(2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in ranks], [
        torch.load(out / f"rank{r}.pt", weights_only=True) for r in ranks
    ]


@pytest.mark.parametrize("kind", ["hf", slow("gguf", id="gguf")])
def test_sharded_hf_teacher_is_never_whole_on_a_rank(tmp_path, kind):
    """Peak resident memory (``ru_maxrss``) grown while the teacher is built and every byte of its parameters on the
    rank is read: a mapped file counts when its pages are touched, so a teacher loaded whole counts whole even
    where its tensors are backed by a lazily read file. The replicated run is the control that the measurement
    sees a whole teacher (at least its bytes); the sharded one must hold about half (it cannot pass by measuring
    nothing: it must be at least the half it holds). The sharded logits equal the replicated ones. The same Llama
    as a Hugging Face folder and as an F32 GGUF file (whose query/key rows a rank reads in transformers' order)."""
    teacher_bytes = save_big_llama(tmp_path / "llama127")
    teacher = tmp_path / "llama127"
    if kind == "gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(teacher)
        teacher = write_gguf(model, tmp_path / "llama127.gguf")
        del model
    whole, want = memory_run(tmp_path, teacher, "replicate")
    sharded, got = memory_run(tmp_path, teacher, "shard")
    for rank in range(2):
        held, replicated = sharded[rank]["held"], whole[rank]["held"]
        mib = {key: f"{value / 2**20:.1f} MiB" for key, value in (("replicate", replicated), ("shard", held))}
        print(
            f"rank {rank}: teacher {teacher_bytes / 2**20:.1f} MiB; peak growth replicate {mib['replicate']}, shard "
            f"{mib['shard']} ({held / teacher_bytes:.2f} of the teacher); after a forward: replicate "
            f"{whole[rank]['forward'] / 2**20:.1f} MiB, shard {sharded[rank]['forward'] / 2**20:.1f} MiB"
        )
        assert replicated >= teacher_bytes
        assert 0.5 * teacher_bytes <= held <= 0.6 * teacher_bytes
        torch.testing.assert_close(got[rank], want[rank], rtol=0, atol=EXACT)
