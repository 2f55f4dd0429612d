"""Small GGUF files written by the tests with the ``gguf`` package, as llama.cpp's converter lays them out: a
transformers Llama's tensors under GGUF names (F32, so that loading them back is exact; or Q8_0), its query and
key rows permuted the way llama.cpp stores them (transformers undoes it on load), and a 32-token byte-level BPE
tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB = 32  # data=synthetic's default vocabulary
# GGUF names of a Llama decoder layer's modules, by their transformers names.
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
OTHER_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Byte-level BPE pieces ("Ġ" is the space byte): the letters, the space, four merges, and the end-of-text token.
TOKENS = [*"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab", "ba", "Ġa", "Ġb", "<|endoftext|>"]
MERGES = ["a b", "b a", "Ġ a", "Ġ b"]


def tiny_llama(tied: bool = False, seed: int = 0):
    """A random transformers Llama: 2 layers, 64 wide, 4 query and 2 key/value heads, ``VOCAB`` tokens."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a Llama tensor (``model.layers.1.mlp.up_proj.weight`` -> ``blk.1.ffn_up.weight``)."""
    module, _, kind = hf_name.rpartition(".")
    if module in OTHER_TENSORS:
        return f"{OTHER_TENSORS[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{LAYER_TENSORS[rest]}.{kind}"


def llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's rows in llama.cpp's order: within each head, the two rotary halves
    interleaved (pairs of rows ``(i, i + d/2)`` side by side) instead of stacked."""
    rows, cols = weight.shape
    halves = weight.reshape(heads, 2, rows // heads // 2, cols)
    return halves.transpose(0, 2, 1, 3).reshape(rows, cols)


def write_gguf(
    model, file: Path, architecture: str = "llama", quantized: bool = False, left_out: tuple[str, ...] = ()
) -> Path:
    """``model`` (a transformers Llama) as the GGUF file ``file``, its architecture named ``architecture``: F32, or
    with its matrices in Q8_0 blocks (``quantized``; the norms stay F32, as llama.cpp keeps them); without the
    tensors named in ``left_out`` (transformers' names)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(file, architecture)
    writer.add_name("stillroom-test-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (len(TOKENS) - 1) + [3])  # normal pieces, then one control token
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(TOKENS) - 1)
    writer.add_eos_token_id(len(TOKENS) - 1)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings or name in left_out:
            continue  # llama.cpp writes no output tensor for a tied head
        array = tensor.detach().float().numpy()
        projection = name.split(".")[-2]
        if projection in heads:
            array = llama_cpp_rows(array, heads[projection])
        if quantized and array.ndim == 2:
            blocks = gguf.quants.quantize(np.ascontiguousarray(array), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def save_llama_pair(root: Path, tied: bool = False) -> tuple[Path, Path]:
    """``tiny_llama(tied)`` as a Hugging Face folder ``root/hf`` and as ``root/gguf/llama.gguf``."""
    model = tiny_llama(tied)
    model.save_pretrained(root / "hf")
    (root / "gguf").mkdir(parents=True)
    return root / "hf", write_gguf(model, root / "gguf" / "llama.gguf")


def q8_rounded(model):
    """``model`` with each matrix replaced by its Q8_0 round trip: what a ``quantized`` GGUF of it dequantizes to."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), q8), q8)
                param.copy_(torch.from_numpy(rounded))
    return model
