"""A QAT'd Hugging Face student exported in the compressed-tensors format: transformers loads it in a fresh process
without Stillroom and computes what the fake-quant student computed; the file is ``compress/model_bytes`` plus what
the format adds; sparse students keep their zeros; ``python -m trainer.export`` writes the same format.

Tolerance: the weights transformers dequantizes equal the fake-quantized ones bit for bit (asserted: the same int
codes, fp32 scales holding QAT's fp16 values, an exact ``codes * scale`` in fp32), so the logits can differ only by
the order of float operations of the same fp32 model: 1e-5. (They are in fact equal here.)"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import HF_VOCAB, save_hf_student
from trainer import exports, models
from trainer.compress import build_compressor, compressed_tensors, qat
from trainer.compress.export import quantize_dense
from trainer.compress.stats import quant_specs
from trainer.config import ModifierConfig
from trainer.models.hf import HFDecoderLM

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


def export(compressor, folder: Path) -> Path:
    staging = exports.staging_dir(folder)
    compressor.export(staging)
    exports.publish(staging, folder)
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


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_transformers_loads_the_qat_student_with_its_logits_and_size(source, tmp_path, scheme):
    weight_bits, act_bits, fmt = SCHEMES[scheme]
    model, compressor = student(source, qat_modifier(weight_bits, act_bits))
    final = export(compressor, tmp_path / "final")
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
    loaded = exports.load(final)
    for name in quant_specs(model):
        got = loaded.get_submodule(name).weight
        assert torch.equal(got, qat.fake_quantize_weight(model.get_submodule(name))), name
    served = exports.load_served(final)
    with torch.no_grad():
        torch.testing.assert_close(served(tokens()), want, rtol=0, atol=LOGITS_ATOL)

    # size: compress/model_bytes (codes, fp16 scales, fp32 rest) plus what the format adds: fp32 instead of fp16
    # scales (2 bytes each), an int64 weight_shape [2] per packed weight, and the safetensors header
    specs = quant_specs(model)
    scales = sum(n_scales(model, name, spec) for name, spec in specs.items())
    shapes = 0 if act_bits else 16 * len(specs)
    weights = final / "model.safetensors"
    model_bytes = compressor.metrics()["compress/model_bytes"]
    assert weights.stat().st_size == model_bytes + 2 * scales + shapes + header_bytes(weights)


def test_activation_quantization_is_what_transformers_runs(source, tmp_path):
    """The int8 per-token activations change the logits, and transformers' copy has the change."""
    model, compressor = student(source, qat_modifier(8, 8))
    final = export(compressor, tmp_path / "final")
    weight_only, _ = student(source, qat_modifier(8, 0))
    with torch.no_grad():
        want, without = model(tokens()), weight_only(tokens())
    assert (want - without).abs().max() > 100 * LOGITS_ATOL
    torch.testing.assert_close(exports.load_served(final)(tokens()), want, rtol=0, atol=LOGITS_ATOL)


def test_a_sparse_student_keeps_its_zeros_stored_dense(source, tmp_path, capsys):
    """50% unstructured sparsity with int4 QAT: transformers reads no sparse-bitmask format any more, so the zeros
    are stored (as codes 0) and the file is the size of the dense int4 one; a note line says so."""
    prune = ModifierConfig(kind="magnitude", targets=["model.layers.*"], schedule="constant", final_sparsity=0.5)
    model, compressor = student(source, prune, qat_modifier(4, 0))
    final = export(compressor, tmp_path / "sparse")
    assert "sparse-bitmask" in capsys.readouterr().err
    loaded = exports.load_served(final)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()), model(tokens()), rtol=0, atol=LOGITS_ATOL)
    q_proj = loaded.hf_model.model.layers[0].self_attn.q_proj.weight
    assert float((q_proj == 0).float().mean()) >= 0.5
    _, dense = student(source, qat_modifier(4, 0))
    dense_size = (export(dense, tmp_path / "dense") / "model.safetensors").stat().st_size
    assert (final / "model.safetensors").stat().st_size == dense_size


def test_quantization_compressed_tensors_cannot_hold_goes_to_stillrooms_format(source, tmp_path, capsys):
    """A quantized tied embedding (the head shares it) has no compressed-tensors form: Stillroom's format, one note."""
    qat_all = ModifierConfig(kind="qat", targets=["model.embed_tokens", "lm_head"], weight_bits=8, act_bits=0)
    model, compressor = student(source, qat_all)
    assert compressed_tensors.unsupported(model, quant_specs(model)) == (
        "model.embed_tokens is not a Linear in transformers"
    )
    final = export(compressor, tmp_path / "final")
    assert "compressed-tensors format cannot hold" in capsys.readouterr().err
    assert json.loads((final / "config.json").read_text())["format"] == "stillroom-compressed"


def test_the_export_cli_writes_compressed_tensors_for_a_hugging_face_run(source, tmp_path):
    """``python -m trainer.export RUN quantize=int4_weight`` on a dense Hugging Face student's run."""
    run = tmp_path / "run"
    dense = models.build("hf", path=str(source), vocab_size=HF_VOCAB)
    staging = exports.staging_dir(run / "final")
    models.save_dense(dense, staging)
    exports.publish(staging, run / "final")
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
    want = exports.load(run / "final")
    quantize_dense(want, weight_bits=4, group_size=32, act_bits=0, targets=["model.layers.*"])
    with torch.no_grad():
        torch.testing.assert_close(transformers_logits(out, tmp_path), want.eval()(tokens()), rtol=0, atol=LOGITS_ATOL)
    assert (out / "manifest.json").is_file()


def n_scales(model: HFDecoderLM, name: str, spec: dict) -> int:
    rows, row_len = model.get_submodule(name).weight.shape
    return rows * (row_len // spec["group_size"])


def test_gpt2s_conv1d_projections_have_no_compressed_tensors_form(tmp_path):
    """transformers' GPT-2 keeps its projections as ``Conv1D``, which compressed-tensors does not quantize."""
    folder = save_hf_student(tmp_path / "gpt2", "gpt2", weights=False)
    model = models.build("hf", path=str(folder), vocab_size=HF_VOCAB)
    build_compressor(model, [dataclasses.replace(qat_modifier(8, 0), targets=["transformer.h.*"])])
    assert compressed_tensors.unsupported(model, quant_specs(model)) == (
        "transformer.h.0.attn.c_attn is not a Linear in transformers"
    )


def test_a_channel_pruned_qat_student_is_thinned_then_quantized(source, tmp_path):
    """Half the key/value heads and MLP channels pruned, int8 QAT: config.json has the thinned sizes, and transformers
    computes the fake-quant student's function."""
    prune = ModifierConfig(kind="channel", targets=["model.layers.*"], schedule="constant", start_step=1)
    model, compressor = student(source, prune, qat_modifier(8, 0))
    compressor.after_optimizer_step(1)
    final = export(compressor, tmp_path / "final")
    config = json.loads((final / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["intermediate_size"]) == (1, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(exports.load_served(final)(tokens()), model(tokens()), rtol=0, atol=LOGITS_ATOL)
