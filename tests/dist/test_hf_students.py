"""Hugging Face students (a small Llama with grouped-query attention and a tied head, a GPT-2, a Qwen3, a Phi-3, an
OLMo 2, a Gemma 3, a Qwen3-MoE and a Mixtral, on transformers' own modules, and a StableLM, a model type without a
structure spec, on the generic path) train under DDP, FSDP2 and pipeline parallelism (not the generic path) on 2
ranks (and the Llama under HSDP 2x2 on 4) equal to one process, with KD from a small GPT teacher, magnitude pruning
and int8 QAT (``compress=prune_qat`` aimed at their module names).

Each run is held to its single-process reference by ``tests.dist.equality.assert_same_run``: every loss term within
float reassociation before fake-quant and within the flipped-code bound after it, sparsity exactly, the exports'
weights code for code but for the flipped ones, each within one code of the reference's.

The learning rate is 3e-4, not the 1e-3 default: GPT-2's output projections start at std 0.02/sqrt(2 * layers),
so one int8 code of theirs is about 2e-4, and in Adam's first steps a weight moves by about the learning rate
whatever the size of its gradient. At 1e-3 a flipped code in a pipeline run (whose tied embedding's gradient is
summed in another order) turned near-zero gradients the other way and moved such weights by 5 codes a step, in
opposite directions in the two runs (measured: 2,000 codes apart after 6 steps, some by 40); at 3e-4 the same runs
stay within a code (21 flips).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, cli_env, save_hf_student, slow
from tests.dist import test_parallel_runs
from tests.dist.equality import assert_same_run

pytestmark = pytest.mark.dist
pytest.importorskip("transformers", reason="Hugging Face students need the `hf` extra")

teacher = test_parallel_runs.teacher  # the same fixture: a small GPT teacher (module scope)

STEPS, QAT_START = 10, 4
# What prune_qat aims at, by each family's module names: the decoder layers' Linears and the embeddings (pruned
# and fake-quantized), and the head (fake-quantized; GPT-2's and this Llama's read the embedding's weight).
TARGETS = {
    "llama": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "stablelm": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),  # a model type on the generic path
    "gpt2": (["transformer.h.*", "transformer.wte", "transformer.wpe"], ["lm_head"]),
    "qwen3": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "phi3": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "olmo2": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "gemma3": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "qwen3_moe": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "mixtral": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
}
DEFAULT_TIER = ("llama",)  # the others run in the slow tier (the generic path under DDP: test_any_decoder.py)


def run_overrides(kind: str, root: Path, teacher: Path) -> list[str]:
    pruned, head = TARGETS[kind]
    return [
        *(arg for arg in FAST if not arg.startswith("student.")),  # FAST's student fields are GPT's
        "student=hf",
        f"student.path={root / kind}",
        "student.block_size=16",
        "distill=kd",
        "teacher=path",
        f"teacher.checkpoint={teacher}",
        "compress=prune_qat",
        f"compress.modifiers.0.targets=[{','.join(pruned)}]",
        f"compress.modifiers.1.targets=[{','.join(pruned + head)}]",
        "compress.modifiers.0.start_step=2",
        "compress.modifiers.0.end_step=6",
        "compress.modifiers.0.every=2",
        f"compress.modifiers.1.start_step={QAT_START}",
        f"train.max_steps={STEPS}",
        "train.lr=3e-4",
        "train.min_lr=3e-5",
        "logger.log_every=1",
        "train.eval_every=5",
        "train.ckpt_every=5",
    ]


def launch(root: Path, nproc: int, name: str, overrides: list[str]) -> Path:
    """``python -m trainer`` (nproc=1) or ``torchrun --nproc_per_node=nproc -m trainer`` into ``root/name``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *torchrun, "-m", "trainer", *overrides, f"hydra.run.dir={name}"]
    proc = subprocess.run(
        command, cwd=root, env=cli_env(root) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root / name


@pytest.fixture(scope="module", params=[kind if kind in DEFAULT_TIER else slow(kind, id=kind) for kind in TARGETS])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def runs(tmp_path_factory, kind) -> Path:
    """The student's folder (``small_hf_config(kind)`` with random weights) and the runs of that student."""
    root = tmp_path_factory.mktemp(f"hf_{kind}")
    save_hf_student(root / kind, kind)
    return root


@pytest.fixture(scope="module")
def reference(runs, kind, teacher) -> Path:
    """The single-process run whose 2 micro-batches are the 2 ranks' slices."""
    return launch(runs, 1, "single", [*run_overrides(kind, runs, teacher), "train.grad_accum=2"])


@pytest.mark.parametrize(
    "layout",
    [
        slow(["parallel=ddp"], id="ddp"),
        pytest.param(["parallel=fsdp"], id="fsdp"),
        slow(["parallel=pipeline", "parallel.pp=2", "parallel.microbatches=2"], id="pipeline"),
    ],
)
def test_a_hugging_face_student_matches_one_process(runs, kind, teacher, reference, layout):
    name = layout[0].split("=")[1]
    if kind == "stablelm" and name == "pipeline":
        pytest.skip("the generic path has no pipeline stages: the preflight refuses them (test_any_decoder.py)")
    run = launch(runs, 2, name, [*run_overrides(kind, runs, teacher), *layout])
    assert_same_run(run, reference, teacher, steps=STEPS, qat_start=QAT_START)


@pytest.mark.slow  # HSDP itself: tests/dist/test_parallel_runs.py
def test_a_llama_student_on_hsdp_2x2_matches_one_process(tmp_path_factory, teacher):
    """HSDP on 4 ranks (2 replicas x 2 shards) against one process summing its 4 micro-batches in the order the
    collectives do (``train.accum_order=pairwise``)."""
    root = tmp_path_factory.mktemp("hf_hsdp")
    save_hf_student(root / "llama", "llama")
    overrides = run_overrides("llama", root, teacher)
    reference = launch(root, 1, "single", [*overrides, "train.grad_accum=4", "train.accum_order=pairwise"])
    run = launch(root, 4, "hsdp", [*overrides, "parallel=hsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2"])
    assert_same_run(run, reference, teacher, steps=STEPS, qat_start=QAT_START)
