"""A QAT'd Hugging Face student exported in the compressed-tensors format: transformers loads it in a fresh process
without Stillroom and computes what the fake-quant student computed; the file is ``compress/model_bytes`` plus its
safetensors header; what the format cannot hold (embeddings, a tied head, GPT-2's ``Conv1D``) is stored dense with
its fake-quantized values; sparse students keep their zeros; ``python -m trainer.export`` writes the same format.

Tolerance: the weights transformers dequantizes equal the fake-quantized ones bit for bit (asserted: the same int
codes, fp32 scales holding QAT's fp16 values, an exact ``codes * scale`` in fp32), so the logits can differ only by
the order of float operations of the same fp32 model: 1e-5. (They are in fact equal here.)"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HF_VOCAB, save_hf_student, slow
from trainer import export, models
from trainer.compress import build_compressor, compressed_tensors, qat, stats
from trainer.compress.stats import quant_specs
from trainer.compress.stillroom_format import quantize_dense
from trainer.config import ModifierConfig

transformers = pytest.importorskip("transformers", reason="Hugging Face students need the `hf` extra")

LOGITS_ATOL = 1e-5  # see the module docstring
# Loads a folder with transformers alone and saves its logits on the saved tokens (argv: folder, tokens, out).
TRANSFORMERS_ONLY = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
assert not any(name == "trainer" or name.startswith(("trainer.", "parallel")) for name in sys.modules)
"""
SCHEMES = {  # id: (weight_bits, act_bits, format)
    "int8": (8, 0, "pack-quantized"),
    "int4": (4, 0, "pack-quantized"),
    "int8_a8": (8, 8, "int-quantized"),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The small Llama (4 layers, 64 wide, 4 query / 2 key-value heads, tied head) saved by transformers."""
    return save_hf_student(tmp_path_factory.mktemp("ct") / "llama", "llama")


def tokens() -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))


def student(source: Path, *modifiers: ModifierConfig):
    """The Llama student with ``modifiers`` applied at step 0 (fake-quant on), and its compressor."""
    model = models.build("hf", path=str(source), vocab_size=HF_VOCAB)
    compressor = build_compressor(model, list(modifiers))
    compressor.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    return model.eval(), compressor


def qat_modifier(weight_bits: int, act_bits: int) -> ModifierConfig:
    return ModifierConfig(
        kind="qat", targets=["model.layers.*"], weight_bits=weight_bits, act_bits=act_bits, group_size=32
    )


def export_to(compressor, folder: Path) -> Path:
    staging = export.staging_dir(folder)
    compressor.export(staging)
    export.publish(staging, folder)
    return folder


def transformers_logits(folder: Path, tmp_path: Path) -> torch.Tensor:
    """The logits on ``tokens()`` of ``folder`` loaded by transformers in a fresh process without Stillroom."""
    torch.save(tokens(), tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ONLY, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return torch.load(tmp_path / "logits.pt", weights_only=True)


def header_bytes(path: Path) -> int:
    """A safetensors file's 8-byte length prefix plus its JSON header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def assert_size_is_model_bytes(final: Path, compressor) -> None:
    """``model.safetensors`` is ``compress/model_bytes`` (codes, fp32 scales, packed shapes, fp32 rest) plus its
    header, whether the metric is measured on the whole model or from per-shard counts."""
    weights = final / "model.safetensors"
    assert weights.stat().st_size == compressor.metrics()["compress/model_bytes"] + header_bytes(weights)
    from_counts = stats.summary_from_counts(compressor.shard_counts(), qat_active=True)["compress/model_bytes"]
    assert weights.stat().st_size == from_counts + header_bytes(weights)


@pytest.mark.parametrize("scheme", [s if s == "int8" else slow(s, id=s) for s in SCHEMES])
def test_transformers_loads_the_qat_student_with_its_logits_and_size(source, tmp_path, scheme):
    weight_bits, act_bits, fmt = SCHEMES[scheme]
    model, compressor = student(source, qat_modifier(weight_bits, act_bits))
    final = export_to(compressor, tmp_path / "final")
    assert {"config.json", "model.safetensors", "generation_config.json", "manifest.json"} <= {
        f.name for f in final.iterdir()
    }
    config = json.loads((final / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["quantization_status"]) == (
        "compressed-tensors",
        fmt,
        "compressed",
    )
    with torch.no_grad():
        want = model(tokens())
    torch.testing.assert_close(transformers_logits(final, tmp_path), want, rtol=0, atol=LOGITS_ATOL)

    # the weights transformers dequantized are the fake-quantized ones, bit for bit
    loaded = export.load(final)
    for name in quant_specs(model):
        got = loaded.get_submodule(name).weight
        assert torch.equal(got, qat.fake_quantize_weight(model.get_submodule(name))), name
    served = export.load_served(final)
    with torch.no_grad():
        torch.testing.assert_close(served(tokens()), want, rtol=0, atol=LOGITS_ATOL)

    assert_size_is_model_bytes(final, compressor)


def test_activation_quantization_is_what_transformers_runs(source, tmp_path):
    """The int8 per-token activations change the logits, and transformers' copy has the change."""
    model, compressor = student(source, qat_modifier(8, 8))
    final = export_to(compressor, tmp_path / "final")
    weight_only, _ = student(source, qat_modifier(8, 0))
    with torch.no_grad():
        want, without = model(tokens()), weight_only(tokens())
    assert (want - without).abs().max() > 100 * LOGITS_ATOL
    torch.testing.assert_close(export.load_served(final)(tokens()), want, rtol=0, atol=LOGITS_ATOL)


def test_a_sparse_student_keeps_its_zeros_stored_dense(source, tmp_path, capsys):
    """50% unstructured sparsity with int4 QAT: transformers reads no sparse-bitmask format any more, so the zeros
    are stored (as codes 0) and the file is the size of the dense int4 one; a note line says so."""
    prune = ModifierConfig(kind="magnitude", targets=["model.layers.*"], schedule="constant", final_sparsity=0.5)
    model, compressor = student(source, prune, qat_modifier(4, 0))
    final = export_to(compressor, tmp_path / "sparse")
    assert "sparse-bitmask" in capsys.readouterr().err
    loaded = export.load_served(final)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()), model(tokens()), rtol=0, atol=LOGITS_ATOL)
    q_proj = loaded.hf_model.model.layers[0].self_attn.q_proj.weight
    assert float((q_proj == 0).float().mean()) >= 0.5
    _, dense = student(source, qat_modifier(4, 0))
    dense_size = (export_to(dense, tmp_path / "dense") / "model.safetensors").stat().st_size
    assert (final / "model.safetensors").stat().st_size == dense_size
    assert_size_is_model_bytes(final, compressor)  # the zeros are counted as stored


# compress=prune_qat as each family's module names say (tests/dist/test_hf_students.py): pruned and fake-quantized
# decoder Linears and embeddings, a fake-quantized head (both heads here read the embedding's weight)
PRUNE_QAT_TARGETS = {
    "llama": (["model.layers.*", "model.embed_tokens"], ["lm_head"]),
    "gpt2": (["transformer.h.*", "transformer.wte", "transformer.wpe"], ["lm_head"]),
}


@pytest.mark.parametrize("kind", list(PRUNE_QAT_TARGETS))
def test_a_prune_qat_student_loads_in_transformers_with_its_logits_and_size(tmp_path, capsys, kind):
    """compress=prune_qat: the Llama's decoder Linears are compressed-tensors int8 codes; its tied embedding/head and
    all of GPT-2 (``Conv1D``, embeddings, tied head) are dense fp32 holding the fake-quantized values. GPT-2's
    projections thus lose their int8 activation fake-quant (a note says so): transformers computes the student with
    that off, to 1e-5."""
    pruned, head = PRUNE_QAT_TARGETS[kind]
    prune = ModifierConfig(kind="magnitude", targets=pruned, schedule="constant", final_sparsity=0.5)
    quantize = ModifierConfig(kind="qat", targets=pruned + head, weight_bits=8, act_bits=8)
    model, compressor = student(save_hf_student(tmp_path / kind, kind), prune, quantize)
    specs = quant_specs(model)
    compressed = compressed_tensors.compressed_specs(model, specs)
    dense = {"llama": {"model.embed_tokens", "lm_head"}, "gpt2": set(specs)}[kind]
    assert set(specs) - set(compressed) == dense
    final = export_to(compressor, tmp_path / "final")
    assert ("activation fake-quant is not in the export" in capsys.readouterr().err) == (kind == "gpt2")
    for name in dense:
        if specs[name]["act_bits"]:
            model.get_submodule(name).activation_fake_quantizer.enabled = False
    with torch.no_grad():
        want = model(tokens())
    torch.testing.assert_close(transformers_logits(final, tmp_path), want, rtol=0, atol=LOGITS_ATOL)
    loaded = export.load(final)
    embedding = model.get_submodule(pruned[1])
    assert torch.equal(loaded.get_submodule(pruned[1]).weight, qat.fake_quantize_weight(embedding))
    assert_size_is_model_bytes(final, compressor)


@pytest.mark.slow  # the CLI on a run; compressed-tensors exports of runs: test_any_decoder.py, test_hf_student_cli.py
def test_the_export_cli_writes_compressed_tensors_for_a_hugging_face_run(source, tmp_path):
    """``python -m trainer.export RUN quantize=int4_weight`` on a dense Hugging Face student's run."""
    run = tmp_path / "run"
    dense = models.build("hf", path=str(source), vocab_size=HF_VOCAB)
    staging = export.staging_dir(run / "final")
    models.save_dense(dense, staging)
    export.publish(staging, run / "final")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run), "quantize=int4_weight"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = run / "final_int4_weight"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    want = export.load(run / "final")
    quantize_dense(want, weight_bits=4, group_size=32, act_bits=0, targets=["model.layers.*"])
    with torch.no_grad():
        torch.testing.assert_close(transformers_logits(out, tmp_path), want.eval()(tokens()), rtol=0, atol=LOGITS_ATOL)
    assert (out / "manifest.json").is_file()


def test_a_channel_pruned_qat_student_is_thinned_then_quantized(source, tmp_path):
    """Half the key/value heads and MLP channels pruned, int8 QAT: config.json has the thinned sizes, and transformers
    computes the fake-quant student's function."""
    prune = ModifierConfig(kind="channel", targets=["model.layers.*"], schedule="constant", start_step=1)
    model, compressor = student(source, prune, qat_modifier(8, 0))
    compressor.after_optimizer_step(1)
    final = export_to(compressor, tmp_path / "final")
    config = json.loads((final / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["intermediate_size"]) == (1, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(export.load_served(final)(tokens()), model(tokens()), rtol=0, atol=LOGITS_ATOL)
