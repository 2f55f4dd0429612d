"""Compressed export: logits agree with the QAT model, pruned weights stay zero, files are small and compact."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from trainer.compress import build_compressor, qat
from trainer.compress.stillroom_format import (
    QuantizedLinear,
    export_compressed,
    load_compressed,
    pack_bits,
    pack_int4,
    parse_scheme,
    quantize_dense,
    scheme_name,
    storage_bytes,
    unpack_bits,
    unpack_int4,
)
from trainer.config import ModifierConfig
from trainer.export import load
from trainer.models import CONFIG_FILE, WEIGHTS_FILE, build, save_dense, unique_state_dict
from trainer.report import folder_bytes

PRUNE_QAT = Path(__file__).resolve().parents[2] / "conf" / "compress" / "prune_qat.yaml"

EMBEDDINGS = ["tok_emb", "pos_emb", "head"]


def small_gpt() -> nn.Module:
    torch.manual_seed(0)
    return build("gpt", vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=32)


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def qat_gpt(weight_bits: int, act_bits: int, embeddings: bool = False) -> nn.Module:
    model = small_gpt()
    targets = block_linears(model) + (EMBEDDINGS if embeddings else [])
    qat.prepare(model, targets, weight_bits=weight_bits, group_size=32, act_bits=act_bits)
    qat.set_enabled(model, True)
    return model.eval()


def prune_half(model: nn.Module, embeddings: bool = False) -> dict[str, torch.Tensor]:
    """50% unstructured masks on the block linears (and embeddings), applied in place like the Compressor does."""
    generator = torch.Generator().manual_seed(1)
    masks = {}
    with torch.no_grad():
        for name in block_linears(model) + (["tok_emb", "pos_emb"] if embeddings else []):
            weight = model.get_submodule(name).weight
            masks[f"{name}.weight"] = torch.rand(weight.shape, generator=generator) < 0.5
            weight.mul_(masks[f"{name}.weight"])
    return masks


def tokens() -> torch.Tensor:
    return torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(2))


def test_packing_round_trips():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:45]
    assert torch.equal(unpack_int4(pack_int4(codes), 45), codes)
    assert pack_int4(codes).numel() == 23
    flags = torch.rand(77) < 0.3
    assert torch.equal(unpack_bits(pack_bits(flags), 77), flags)
    assert pack_bits(flags).numel() == 10


@pytest.mark.parametrize("weight_bits,act_bits,embeddings", [(8, 8, False), (4, 0, False), (8, 8, True), (4, 0, True)])
def test_exported_logits_match_qat_model(tmp_path, weight_bits, act_bits, embeddings):
    model = qat_gpt(weight_bits, act_bits, embeddings)
    export_compressed(model, tmp_path, {}, {})
    loaded = load(tmp_path)  # trainer.models.load dispatches on the format
    assert not loaded.training
    fc = loaded.blocks["0"].mlp.fc
    assert isinstance(fc, QuantizedLinear)
    assert fc.qdata.dtype == (torch.int8 if weight_bits == 8 else torch.uint8)
    assert fc.qdata.numel() == fc.in_features * fc.out_features * weight_bits // 8
    assert type(loaded.head) is nn.Linear and loaded.head.weight is loaded.tok_emb.weight
    with torch.no_grad():
        assert (loaded(tokens()) - model(tokens())).abs().max() < 1e-4


def test_masked_int8_export_keeps_pruned_weights_zero(tmp_path):
    model = qat_gpt(8, 8, embeddings=True)
    masks = prune_half(model, embeddings=True)
    export_compressed(model, tmp_path, masks, {})
    loaded = load_compressed(tmp_path)
    for key, mask in masks.items():
        weight = loaded.get_submodule(key.removesuffix(".weight")).weight
        assert torch.all(weight[~mask] == 0)
    assert loaded.head.weight is loaded.tok_emb.weight and torch.all(loaded.head.weight[~masks["tok_emb.weight"]] == 0)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["format"] == "stillroom-compressed" and set(meta["sparse"]) == set(masks)
    assert meta["quant"] == {
        "w8a8": sorted(block_linears(model)),
        "w8": ["pos_emb", "tok_emb"],
    }  # head: stored as tok_emb
    with torch.no_grad():
        assert (loaded(tokens()) - model(tokens())).abs().max() < 1e-4


def predicted_bytes(model: nn.Module, loaded: nn.Module) -> int:
    """``storage_bytes`` summed over the stored tensors, nonzeros counted in the loaded model."""
    total = 0
    for key, tensor in unique_state_dict(model).items():
        module_name = key.rpartition(".")[0]
        bits, group = 32, 0
        if key.endswith(".weight") and qat.is_quantized(model.get_submodule(module_name)):
            spec = qat.quant_spec(model.get_submodule(module_name))
            bits, group = spec["weight_bits"], spec["group_size"]
        nonzero = int((loaded.get_submodule(module_name).weight if bits < 32 else tensor).count_nonzero())
        total += storage_bytes(tensor.numel(), tuple(tensor.shape), nonzero, bits, group)
    return total


def blob_bytes(out_dir) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(out_dir / WEIGHTS_FILE)).values())


def test_storage_bytes_predicts_the_blobs_exactly(tmp_path):
    model = qat_gpt(8, 8, embeddings=True)
    export_compressed(model, tmp_path, prune_half(model, embeddings=True), {})
    assert blob_bytes(tmp_path) == predicted_bytes(model, load_compressed(tmp_path))
    blobs = load_file(str(tmp_path / WEIGHTS_FILE))
    assert {name: t.dtype for name, t in blobs.items()} == {
        "codes": torch.int8,
        "scales": torch.float16,
        "floats": torch.float32,
        "bitmasks": torch.uint8,
    }
    assert all(t.dim() == 1 for t in blobs.values())
    config_text = (tmp_path / CONFIG_FILE).read_text()
    assert "\n" not in config_text and ", " not in config_text  # compact JSON


def test_storage_bytes_chooses_the_smaller_layout():
    shape = (64, 256)
    numel = math.prod(shape)
    assert storage_bytes(numel, shape, numel, 32, 0) == 4 * numel
    assert storage_bytes(numel, shape, numel, 8, 0) == numel + 2 * 64
    assert storage_bytes(numel, shape, numel, 4, 32) == numel // 2 + 2 * numel // 32
    assert storage_bytes(numel, shape, numel // 2, 8, 0) == numel // 2 + numel // 8 + 2 * 64
    assert storage_bytes(numel, shape, numel // 2, 32, 0) == 2 * numel + numel // 8
    assert storage_bytes(numel, shape, numel // 4, 4, 32) == numel // 8 + numel // 8 + 2 * numel // 32


def test_schemes_round_trip():
    for spec in (
        {"weight_bits": 8, "group_size": 64, "act_bits": 8},
        {"weight_bits": 8, "group_size": 64, "act_bits": 0},
        {"weight_bits": 4, "group_size": 32, "act_bits": 0},
        {"weight_bits": 4, "group_size": 16, "act_bits": 8},
    ):
        assert parse_scheme(scheme_name(spec), 64) == spec
    assert [
        scheme_name({"weight_bits": 8, "group_size": 64, "act_bits": 8}),
        scheme_name({"weight_bits": 4, "group_size": 32, "act_bits": 0}),
    ] == ["w8a8", "w4g32"]
    for bad in ("w8g32", "w4", "w16", "w8a4"):
        with pytest.raises(ValueError, match="unknown quant scheme"):
            parse_scheme(bad, 64)


def test_blobs_that_do_not_match_the_config_are_rejected(tmp_path):
    model = qat_gpt(8, 8, embeddings=True)
    export_compressed(model, tmp_path, prune_half(model, embeddings=True), {})
    blobs = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file(blobs | {"floats": blobs["floats"][:-1].clone()}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="blob 'floats' ends before"):
        load_compressed(tmp_path)
    save_file(blobs | {"codes": torch.cat([blobs["codes"], blobs["codes"][:3]])}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="does not describe: {'codes': 3}"):
        load_compressed(tmp_path)


def test_a_tied_head_is_quantized_with_its_embedding_or_not_at_all(tmp_path):
    int8 = {"weight_bits": 8, "group_size": 64, "act_bits": 0}
    for quant in ({"tok_emb": int8}, {"head": int8}, {"tok_emb": int8, "head": int8 | {"act_bits": 8}}):
        with pytest.raises(ValueError, match="'head' shares its weight with 'tok_emb'"):
            export_compressed(small_gpt(), tmp_path, {}, quant)
    model = small_gpt().eval()
    export_compressed(model, tmp_path, {}, {"tok_emb": int8, "head": int8})
    table = qat.dequantize_weight(*qat.quantize_weight(model.tok_emb.weight.detach(), 8, 64))
    loaded = load_compressed(tmp_path)
    assert torch.equal(loaded.tok_emb.weight, table) and loaded.head.weight is loaded.tok_emb.weight


def test_sparse_float_export_without_quantization(tmp_path):
    model = small_gpt().eval()
    masks = prune_half(model)
    export_compressed(model, tmp_path, masks, {})
    loaded = load_compressed(tmp_path)
    assert not any(isinstance(m, QuantizedLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), model(tokens()))


def test_post_training_quantization_path(tmp_path):
    model = quantize_dense(small_gpt(), weight_bits=4, group_size=32, act_bits=8).eval()
    assert all(qat.is_quantized(model.get_submodule(n)) for n in block_linears(model))
    assert not qat.is_quantized(model.head)  # tied to the embedding: skipped
    export_compressed(model, tmp_path, {}, {})
    with torch.no_grad():
        assert (load_compressed(tmp_path)(tokens()) - model(tokens())).abs().max() < 1e-4


def test_quant_argument_quantizes_plain_linears(tmp_path):
    torch.manual_seed(0)
    model = build("mlp", in_dim=64, n_classes=10, hidden=[32]).eval()
    export_compressed(model, tmp_path, {}, {"layers.0": {"weight_bits": 4, "group_size": 32, "act_bits": 0}})
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded.layers[0], QuantizedLinear) and type(loaded.layers[1]) is nn.Linear
    codes, scale = qat.quantize_weight(model.layers[0].weight.detach(), 4, 32)
    assert torch.equal(loaded.layers[0].weight, qat.dequantize_weight(codes, scale))


def prune_qat_modifiers_from_step_0() -> list[ModifierConfig]:
    """conf/compress/prune_qat.yaml, with the 50% masks and fake-quant due at step 0."""
    modifiers = [ModifierConfig(**OmegaConf.to_container(m)) for m in OmegaConf.load(PRUNE_QAT).modifiers]
    pruning, quantization = modifiers
    assert pruning.final_sparsity == 0.5 and quantization.weight_bits == 8
    return [
        dataclasses.replace(pruning, schedule="constant", start_step=0, end_step=0),
        dataclasses.replace(quantization, start_step=0),
    ]


def test_prune_qat_export_of_the_tiny_student_is_6x_smaller_than_dense(tmp_path):
    torch.manual_seed(0)
    model = build("gpt", vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=64)  # conf/student/tiny
    dense_bytes = folder_bytes(save_dense(model, tmp_path / "dense"))
    compressor = build_compressor(model, prune_qat_modifiers_from_step_0())
    compressor.attach_optimizer(torch.optim.AdamW(model.parameters()))
    assert set(compressor.masks) >= {"tok_emb.weight", "pos_emb.weight"}
    assert compressor.metrics()["compress/sparsity"] == pytest.approx(0.5, abs=1e-3)
    out = compressor.export(tmp_path / "final")
    ratio = dense_bytes / folder_bytes(out)  # every file, config.json included
    assert ratio >= 6.0, (dense_bytes, folder_bytes(out), ratio)
    assert compressor.metrics()["compress/model_bytes"] == blob_bytes(out)
    x = torch.randint(0, 65, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load(out)(x) - model.eval()(x)).abs().max() < 1e-4
