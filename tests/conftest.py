"""Shared fixtures: run the real CLI in a subprocess (or its preflight in this process), read metrics files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# Two xdist workers share the 2 cores: one OpenMP thread each (inherited by every CLI run a test starts), so that no
# process's idle OpenMP threads spin against the other worker's (measured: a quarter less CPU time, same results).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Runs the trainer CLI but SIGKILLs the process inside its Nth checkpoint write (usage in the script).
KILL_DURING_CHECKPOINT = Path(__file__).resolve().parent / "e2e" / "kill_during_checkpoint.py"


def cli_env(tmp_path: Path) -> dict:
    """A clean environment: no W&B credentials, W&B quiet, scratch TMPDIR; a process killed by a fatal signal
    (SIGABRT, SIGSEGV) prints its Python stacks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_SILENT="true",
        HOME=str(tmp_path),
        NETRC=str(tmp_path / "netrc"),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def run_cli(
    tmp_path: Path, *overrides: str, module: str = "trainer", timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m trainer OVERRIDES`` with cwd=tmp_path; fails the test with the output when it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def preflight_in_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *overrides: str,
    launcher: dict[str, str] | None = None,
    check: Callable[[Any], None] | None = None,
) -> tuple[int, list[str]]:
    """What ``python -m trainer OVERRIDES`` does before Hydra starts (``trainer.cli.train.preflight``; with ``check``,
    another command's checks, e.g. ``trainer.cli.search.check``), in this process with cwd=tmp_path (and a launcher's
    variables ``launcher``, e.g. torchrun's WORLD_SIZE and RANK): (its exit code, its stderr lines). For the many
    one-line refusals, which need no new interpreter each; tests also run a few of them as real processes, which
    checks the way from ``main`` to the line. Fails the test when the overrides pass the preflight."""
    from trainer.cli.train import preflight
    from trainer.config import register_configs
    from trainer.preflight import validate

    monkeypatch.chdir(tmp_path)
    for launcher_variable in ("RANK", "SLURM_PROCID", "WORLD_SIZE", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(launcher_variable, raising=False)
    for name, value in (launcher or {}).items():
        monkeypatch.setenv(name, value)
    register_configs()
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(stderr):
        preflight(list(overrides), check or validate)
    return int(stopped.value.code or 0), stderr.getvalue().strip().splitlines()


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "table" not in row]


# A few-second synthetic run: tiny GPT, 16-token windows.
FAST = [
    "data=synthetic",
    "student.block_size=16",
    "student.n_embd=32",
    "logger=console",
    "logger.progress=false",
    "train.batch_size=8",
    "train.warmup_steps=2",
]


def stopped_and_resumed(root: Path, name: str, *overrides: str, stop_at: int = 2) -> tuple[list[dict], list[dict]]:
    """The metrics of a run stopped after step ``stop_at`` then resumed by the same command (``root/name``), and of
    the same run uninterrupted (``root/name_whole``)."""
    run_cli(root, *overrides, f"train.stop_at_step={stop_at}", f"hydra.run.dir={name}")
    assert max(row["step"] for row in read_metrics(root / name)) == stop_at
    proc = run_cli(root, *overrides, f"hydra.run.dir={name}")
    assert "resumed from" in proc.stderr and f"step_{stop_at:07d}" in proc.stderr, proc.stderr[-2000:]
    run_cli(root, *overrides, f"hydra.run.dir={name}_whole")
    return read_metrics(root / name), read_metrics(root / f"{name}_whole")


def train_small_teacher(root: Path) -> Path:
    """A small teacher trained by the CLI itself (plain training, distill=none) into ``root/t``; its export."""
    run_cli(root, *FAST, "train.max_steps=20", "student.n_layer=2", "student.n_embd=48", "hydra.run.dir=t")
    return root / "t" / "final"


def save_hf_teachers(root: Path, vocab: int, padded: int, n_embd: int) -> None:
    """A 2-layer GPT-2 (transformers, seed 0) saved as ``root/hf{vocab}``, and with its embeddings padded to
    ``padded`` tokens as ``root/hf{padded}`` (the same logits on the first ``vocab``)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=n_embd, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(root / f"hf{vocab}")
    model.resize_token_embeddings(padded, mean_resizing=False)
    model.save_pretrained(root / f"hf{padded}")


HF_VOCAB = 32  # data=synthetic's default vocabulary: a small Hugging Face student reads its token ids


def small_hf_config(kind: str):
    """A small Hugging Face causal-LM config of ``kind``: "llama" (4 layers, 64 wide, 4 query and 2 key/value heads,
    SwiGLU 128 wide, tied head), "qwen2" (the same with q/k/v biases and an untied head), "qwen3" (untied, q/k
    norms), "phi3" (untied, fused q/k/v and gate/up projections), "olmo2" (untied, norms after attention and MLP,
    q/k norms over all heads), "gemma3" (tied, four norms a layer, sliding and global layers, soft-capped logits),
    "qwen3_moe" (untied, 4 experts in layers 0, 2 and 3, a dense MLP in layer 1), "mixtral" (untied, 4 experts
    a layer), "granite" (tied; the generic path), "stablelm" (untied, LayerNorm; the generic path) or "gpt2" (4
    layers, 64 wide, 4 heads, tied head, no dropout); ``HF_VOCAB`` tokens, 64 positions."""
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(
            n_layer=4, n_head=4, n_embd=64, vocab_size=HF_VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    config_class = {
        "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
        "granite": transformers.GraniteConfig, "stablelm": transformers.StableLmConfig,
        "phi3": transformers.Phi3Config, "olmo2": transformers.Olmo2Config, "gemma3": transformers.Gemma3TextConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig,
    }[kind]  # fmt: skip
    extra = {
        "qwen3": {"head_dim": 16},
        # sliding layers (a window shorter than the tests' sequences) and global ones; soft-capped logits
        "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "final_logit_softcapping": 30.0,
                   "layer_types": ["sliding_attention", "full_attention"] * 2},
        # 4 experts of 32 channels, 2 a token; layer 1 a dense MLP
        "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                      "mlp_only_layers": [1]},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # 4 experts of 128 channels, 2 a token
    }.get(kind, {})  # fmt: skip
    return config_class(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=kind in ("llama", "granite", "gemma3"),
        bos_token_id=0, eos_token_id=0, pad_token_id=None, **extra,
    )  # fmt: skip


def save_hf_student(folder: Path, kind: str, weights: bool = True) -> Path:
    """``small_hf_config(kind)`` saved in ``folder``: with random weights (seed 0), or its config.json alone."""
    import torch
    import transformers

    config = small_hf_config(kind)
    if not weights:
        config.save_pretrained(folder)
        return folder
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def save_tokenizer(folder: Path, tokens: list[str]) -> Path:
    """A word-level tokenizer of ``tokens`` (id = position) saved in ``folder`` as transformers writes one."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token=tokens[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=tokens[0]).save_pretrained(folder)
    return folder


# Test tiers by folder (tests/<folder>/...): the default command (no -m) runs every tier but ``slow`` and ``gpu``;
# ``-m slow`` re-runs the benchmarks' quick modes and the larger runs, ``-m gpu`` the tests that need CUDA (each skips
# with its reason without it). A -m expression of one's own selects as it says.
FOLDER_MARKERS = {"e2e": "e2e", "dist": "dist", "slurm": "slurm", "slow": "slow", "gpu": "gpu"}
NOT_BY_DEFAULT = ("slow", "gpu")


def slow(*values: object, id: str | None = None):
    """One case of a parametrized test that repeats what its other cases show on another family, layout or signal:
    it runs in the slow tier (``pytest.param`` with the ``slow`` mark)."""
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker more than the cores, to use the time the multi-process and SLURM tests spend waiting
    (rendezvous, job scheduling) on another test."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        folder = item.path.resolve().relative_to(tests).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])
    if config.option.markexpr:
        return
    kept = [item for item in items if not any(item.get_closest_marker(name) for name in NOT_BY_DEFAULT)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
