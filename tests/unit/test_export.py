"""Compressed export: logits agree with the QAT model, pruned weights stay zero, files are small."""

import json
import math

import pytest
import torch
import torch.nn as nn

from trainer.compress import qat
from trainer.compress.export import (
    QuantizedLinear,
    export_compressed,
    load_compressed,
    pack_bits,
    pack_int4,
    quantize_dense,
    storage_bytes,
    unpack_bits,
    unpack_int4,
)
from trainer.models import WEIGHTS_FILE, build, load, save_dense, unique_state_dict


def small_gpt() -> nn.Module:
    torch.manual_seed(0)
    return build("gpt", vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=32)


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def qat_gpt(weight_bits: int, act_bits: int) -> nn.Module:
    model = small_gpt()
    qat.prepare(model, block_linears(model), weight_bits=weight_bits, group_size=32, act_bits=act_bits)
    qat.set_enabled(model, True)
    return model.eval()


def prune_half(model: nn.Module) -> dict[str, torch.Tensor]:
    """50% unstructured masks on the block linears, applied in place like the Compressor does."""
    generator = torch.Generator().manual_seed(1)
    masks = {}
    with torch.no_grad():
        for name in block_linears(model):
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


@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 0)])
def test_exported_logits_match_qat_model(tmp_path, weight_bits, act_bits):
    model = qat_gpt(weight_bits, act_bits)
    export_compressed(model, tmp_path, {}, {})
    loaded = load(tmp_path)  # trainer.models.load dispatches on the format
    assert not loaded.training
    fc = loaded.blocks[0].mlp.fc
    assert isinstance(fc, QuantizedLinear)
    assert fc.qdata.dtype == (torch.int8 if weight_bits == 8 else torch.uint8)
    assert fc.qdata.numel() == fc.in_features * fc.out_features * weight_bits // 8
    assert type(loaded.head) is nn.Linear and loaded.head.weight is loaded.tok_emb.weight
    with torch.no_grad():
        assert (loaded(tokens()) - model(tokens())).abs().max() < 1e-4


def test_masked_int8_export_keeps_pruned_weights_zero(tmp_path):
    model = qat_gpt(8, 8)
    masks = prune_half(model)
    export_compressed(model, tmp_path, masks, {})
    loaded = load_compressed(tmp_path)
    for key, mask in masks.items():
        weight = loaded.get_submodule(key.removesuffix(".weight")).weight
        assert torch.all(weight[~mask] == 0)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "stillroom-compressed" and set(meta["sparse"]) == set(masks)
    with torch.no_grad():
        assert (loaded(tokens()) - model(tokens())).abs().max() < 1e-4


def test_export_is_small_and_storage_bytes_predicts_it(tmp_path):
    model = qat_gpt(8, 8)
    masks = prune_half(model)
    export_compressed(model, tmp_path / "compressed", masks, {})
    save_dense(model, tmp_path / "dense")
    compressed_size = (tmp_path / "compressed" / WEIGHTS_FILE).stat().st_size
    dense_size = (tmp_path / "dense" / WEIGHTS_FILE).stat().st_size
    assert compressed_size < 0.3 * dense_size

    loaded = load_compressed(tmp_path / "compressed")
    predicted = 0
    for key, tensor in unique_state_dict(model).items():
        module = model.get_submodule(key.rpartition(".")[0])
        if key.endswith(".weight") and qat.is_quantized(module):
            spec = qat.quant_spec(module)
            nonzero = int((loaded.get_submodule(key.rpartition(".")[0]).weight != 0).sum())
            predicted += storage_bytes(tensor.numel(), tuple(tensor.shape), nonzero,
                                       spec["weight_bits"], spec["group_size"])
        else:
            predicted += storage_bytes(tensor.numel(), tuple(tensor.shape), int((tensor != 0).sum()), 32, 0)
    assert predicted <= compressed_size < 1.05 * predicted


def test_storage_bytes_chooses_the_smaller_layout():
    shape = (64, 256)
    numel = math.prod(shape)
    assert storage_bytes(numel, shape, numel, 32, 0) == 4 * numel
    assert storage_bytes(numel, shape, numel, 8, 0) == numel + 4 * 64
    assert storage_bytes(numel, shape, numel, 4, 32) == numel // 2 + 4 * numel // 32
    assert storage_bytes(numel, shape, numel // 2, 8, 0) == numel // 2 + numel // 8 + 4 * 64
    assert storage_bytes(numel, shape, numel // 2, 32, 0) == 2 * numel + numel // 8
    assert storage_bytes(numel, shape, numel // 4, 4, 32) == numel // 8 + numel // 8 + 4 * numel // 32


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
