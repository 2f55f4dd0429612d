"""``trainer.cut``: a student cut out of its teacher computes what the teacher does with the same layers, head
groups, MLP channels and embedding channels removed by hand; uniform selection keeps evenly spaced layers,
importance selection drops the layer that does nothing, width selection keeps the most active units; bad cuts are
refused naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import HF_VOCAB, save_hf_student, small_hf_config
from trainer import cut, data, models
from trainer.build import build_student, student_spec
from trainer.cut import from_teacher
from trainer.models.protocol import ConfigFieldError, family_of

transformers = pytest.importorskip("transformers", reason="Hugging Face models need the `hf` extra")


def teacher(kind: str):
    torch.manual_seed(0)
    return models.build("hf", hf_config=small_hf_config(kind).to_dict()).eval()


def batches(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, HF_VOCAB, (3, 12), generator=gen) for _ in range(n)]


def kept(index: torch.Tensor, size: int) -> torch.Tensor:
    """The rows of the units ``index`` (each ``size`` rows)."""
    return torch.cat([torch.arange(i * size, (i + 1) * size) for i in index.tolist()])


@torch.no_grad()
def llama_by_hand(model, layers: list[int], choice: cut.Importance, width: float, hidden: float):
    """transformers' own Llama with the teacher's weights sliced here: ``layers``, the most important key/value groups
    (with their query heads), MLP channels and embedding channels; the norms over the residual stream scaled by
    sqrt(kept energy / all energy * width / kept width)."""
    config = model.config
    n_kv, head = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // n_kv
    channels = cut.top(choice.channels, int(hidden * config.hidden_size))
    small = transformers.LlamaConfig(**(config.to_dict() | {
        "num_hidden_layers": len(layers), "hidden_size": len(channels), "num_key_value_heads": int(n_kv * width),
        "num_attention_heads": int(n_kv * width) * group, "head_dim": head,
        "intermediate_size": int(config.intermediate_size * width),
    }))  # fmt: skip
    twin = transformers.LlamaForCausalLM(small).eval()
    twin.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[:, channels])
    energy = choice.energy
    scale = ((energy[channels].sum() / energy.sum()) * len(energy) / len(channels)).sqrt().item()
    twin.model.norm.weight.copy_(model.model.norm.weight[channels] * scale)
    for new, old in enumerate(layers):
        src, dst = model.model.layers[str(old)], twin.model.layers[new]
        heads = cut.top(choice.units["attn", old], int(n_kv * width))
        mlp = cut.top(choice.units["mlp", old], int(config.intermediate_size * width))
        q, kv = kept(heads, group * head), kept(heads, head)
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight[channels] * scale)
        dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight[channels] * scale)
        dst.self_attn.q_proj.weight.copy_(src.self_attn.q_proj.weight[q][:, channels])
        dst.self_attn.k_proj.weight.copy_(src.self_attn.k_proj.weight[kv][:, channels])
        dst.self_attn.v_proj.weight.copy_(src.self_attn.v_proj.weight[kv][:, channels])
        dst.self_attn.o_proj.weight.copy_(src.self_attn.o_proj.weight[channels][:, q])
        dst.mlp.gate_proj.weight.copy_(src.mlp.gate_proj.weight[mlp][:, channels])
        dst.mlp.up_proj.weight.copy_(src.mlp.up_proj.weight[mlp][:, channels])
        dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight[channels][:, mlp])
    return twin


@torch.no_grad()
def gpt2_by_hand(model, layers: list[int], choice: cut.Importance, width: float):
    """transformers' own GPT-2 with ``layers`` and the most important MLP channels (Conv1D weights: [in, out])."""
    inner = int(4 * model.config.n_embd * width)
    small = transformers.GPT2Config(**(model.config.to_dict() | {"n_layer": len(layers), "n_inner": inner}))
    twin = transformers.GPT2LMHeadModel(small).eval()
    reference = transformers.GPT2LMHeadModel(model.config)
    reference.load_state_dict(family_of(model).to_hf_state(model.state_dict()))
    own = dict(reference.named_parameters())
    for name, param in twin.named_parameters():
        if not name.startswith("transformer.h."):
            param.copy_(own[name])
    for new, old in enumerate(layers):
        src, dst = reference.transformer.h[old], twin.transformer.h[new]
        mlp = cut.top(choice.units["mlp", old], inner)
        dst.load_state_dict(src.state_dict() | {
            "mlp.c_fc.weight": src.mlp.c_fc.weight[:, mlp], "mlp.c_fc.bias": src.mlp.c_fc.bias[mlp],
            "mlp.c_proj.weight": src.mlp.c_proj.weight[mlp],
        })  # fmt: skip
    return twin


@pytest.mark.parametrize("select", ["uniform", "importance"])
@torch.no_grad()
def test_a_cut_llama_is_the_teacher_with_layers_heads_and_channels_removed_by_hand(select):
    model, calib = teacher("llama"), batches()
    config = cut.CutConfig(layers=2, layer_select=select, width=0.5, hidden_width=0.5)
    student = cut.cut(model, config, calib).eval()
    choice = cut.measure(model, calib)
    layers = cut.uniform_layers(4, 2) if select == "uniform" else cut.top(choice.layers, 2).tolist()
    twin = llama_by_hand(model, layers, choice, 0.5, 0.5)
    x = batches(3)[2]
    torch.testing.assert_close(student(x), twin(input_ids=x).logits, rtol=0, atol=1e-5)
    assert family_of(student).name == "hf_llama" and family_of(student).tied_weights(student)
    c = student.config
    sizes = (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.num_attention_heads, c.intermediate_size)
    assert sizes == (2, 32, 1, 2, 64)


@torch.no_grad()
def test_a_cut_gpt2_is_the_teacher_with_layers_and_mlp_channels_removed_by_hand():
    """GPT-2 keeps every head (its config derives the head size from the width and the head count)."""
    model, calib = teacher("gpt2"), batches()
    student = cut.cut(model, cut.CutConfig(layers=3, width=0.5), calib).eval()
    twin = gpt2_by_hand(model, cut.uniform_layers(4, 3), cut.measure(model, calib), 0.5)
    x = batches(3)[2]
    torch.testing.assert_close(student(x), twin(input_ids=x).logits, rtol=0, atol=1e-5)
    assert (student.config.n_layer, student.config.n_head, student.config.n_inner) == (3, 4, 128)


@torch.no_grad()
def test_a_cut_stillroom_gpt_keeps_the_chosen_blocks():
    torch.manual_seed(0)
    model = models.build("gpt", vocab_size=HF_VOCAB, n_layer=4, n_head=4, n_embd=32, block_size=16).eval()
    student = cut.cut(model, cut.CutConfig(layers=2), []).eval()
    by_hand = models.build("gpt", vocab_size=HF_VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=16).eval()
    state = model.state_dict()
    by_hand.load_state_dict({k: state[k.replace("blocks.1.", "blocks.3.")] for k in by_hand.state_dict()})
    x = batches()[0]
    torch.testing.assert_close(student(x), by_hand(x), rtol=0, atol=1e-6)
    assert student.cfg.n_layer == 2


def test_uniform_selection_spaces_layers_evenly_with_the_first_and_last():
    assert cut.uniform_layers(4, 2) == [0, 3]
    assert cut.uniform_layers(5, 3) == [0, 2, 4]
    assert cut.uniform_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert cut.uniform_layers(4, 4) == [0, 1, 2, 3] and cut.uniform_layers(4, 1) == [0]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_importance_drops_the_layer_that_does_nothing_deterministically(kind):
    """Layer 1's output projections zeroed: it is an identity (its input is its output), the least important."""
    model = teacher(kind)
    outputs = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}[kind]
    layer = family_of(model).layers(model)["1"]
    for name in outputs:
        for param in layer.get_submodule(name).parameters():
            param.zero_()
    choice = cut.measure(model, batches())
    assert choice.layers[1] < 1e-6 < float(choice.layers[[0, 2, 3]].min())
    config = cut.CutConfig(layers=3, layer_select="importance")
    first, second = cut.cut(model, config, batches()), cut.cut(model, config, batches())
    prefix = family_of(model).layers_attr
    state = model.state_dict()
    assert all(torch.equal(t, state[n.replace(f"{prefix}.1.", f"{prefix}.2.")]) for n, t in first.state_dict().items()
               if n.startswith(f"{prefix}.1."))  # fmt: skip  # new layer 1 is the teacher's layer 2
    assert all(torch.equal(t, second.state_dict()[n]) for n, t in first.state_dict().items())


@torch.no_grad()
def test_width_keeps_the_most_active_head_groups_and_channels():
    """Key/value head group 1 (its v rows) and 64 chosen MLP channels (their gate and up rows) scaled up 10x in every
    layer of the teacher: the cut keeps exactly those."""
    model = teacher("llama")
    channels = torch.randperm(128, generator=torch.Generator().manual_seed(2))[:64].sort().values
    for layer in model.model.layers.values():
        layer.self_attn.v_proj.weight[16:32] *= 10
        layer.mlp.gate_proj.weight[channels] *= 10
        layer.mlp.up_proj.weight[channels] *= 10
    choice = cut.measure(model, batches())
    for layer in range(4):
        assert cut.top(choice.units["attn", layer], 1).tolist() == [1]
        assert torch.equal(cut.top(choice.units["mlp", layer], 64), channels)
    student = cut.cut(model, cut.CutConfig(width=0.5), batches())
    layer = student.model.layers["2"]
    torch.testing.assert_close(layer.self_attn.v_proj.weight, model.model.layers["2"].self_attn.v_proj.weight[16:32])
    torch.testing.assert_close(layer.mlp.up_proj.weight, model.model.layers["2"].mlp.up_proj.weight[channels])


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@torch.no_grad()
def test_experts_keeps_the_experts_that_add_most_with_their_router_rows(kind):
    """Expert 2's down projection scaled up 10x and expert 0's zeroed in every mixture-of-experts layer: expert 2
    adds most to the layers' outputs and expert 0 nothing, so a cut to 3 experts keeps 1, 2 and 3, with their rows
    of the router, and routes each token among them as the teacher's router ranks them."""
    model = teacher(kind)
    moe = [name for name, layer in model.model.layers.items() if hasattr(layer.mlp, "experts")]
    assert moe == (["0", "2", "3"] if kind == "qwen3_moe" else ["0", "1", "2", "3"])  # Qwen3-MoE's layer 1 is dense
    for name in moe:
        model.model.layers[name].mlp.experts.down_proj[2] *= 10
        model.model.layers[name].mlp.experts.down_proj[0] = 0
    choice = cut.measure(model, batches())
    for name in moe:
        scores = choice.units["experts", int(name)]
        assert scores[0] == 0 and int(scores.argmax()) == 2
    student = cut.cut(model, cut.CutConfig(experts=3), batches())
    config = student.config
    assert (config.num_local_experts, config.num_experts_per_tok) == (3, 2)
    for name in moe:
        small, big = student.model.layers[name].mlp, model.model.layers[name].mlp
        torch.testing.assert_close(small.experts.down_proj, big.experts.down_proj[1:])
        torch.testing.assert_close(small.gate.weight, big.gate.weight[1:])
    x = batches(1)[0]
    assert student(x).shape == model(x).shape
    with pytest.raises(ConfigFieldError, match="5 is more than the teacher's 4 experts"):
        cut.cut(model, cut.CutConfig(experts=5), batches())


@pytest.mark.parametrize("kind", ["qwen3", "phi3", "olmo2", "gemma3", "qwen3_moe", "mixtral"])
@torch.no_grad()
def test_every_family_is_cut_in_depth_heads_channels_width_and_experts(kind):
    """3 of 4 layers, half the key/value heads and MLP channels, half the width, 2 of 4 experts: a model of the
    family of those sizes, which runs."""
    model, x = teacher(kind), batches(1)[0]
    moe = kind in ("qwen3_moe", "mixtral")
    wanted = cut.CutConfig(layers=3, width=0.5, hidden_width=0.5, experts=2 if moe else None)
    student = cut.cut(model, wanted, [x])
    config = student.config
    assert family_of(student) is family_of(model) and student(x).shape == (*x.shape, HF_VOCAB)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.hidden_size) == (3, 1, 32)
    assert config.num_local_experts == 2 if moe else config.intermediate_size == 64


@torch.no_grad()
def test_mlp_width_cuts_the_mlp_channels_apart_from_the_head_groups():
    model, calib = teacher("llama"), batches()
    student = cut.cut(model, cut.CutConfig(width=0.5, mlp_width=0.25), calib)
    c = student.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.intermediate_size) == (1, 2, 32)
    choice = cut.measure(model, calib)
    kept_mlp = cut.top(choice.units["mlp", 0], 32)
    torch.testing.assert_close(
        student.model.layers["0"].mlp.up_proj.weight, model.model.layers["0"].mlp.up_proj.weight[kept_mlp]
    )
    assert cut.cut(model, cut.CutConfig(mlp_width=0.5), calib).config.num_key_value_heads == 2


@torch.no_grad()
def test_hidden_width_keeps_the_most_active_embedding_channels():
    """32 chosen embedding channels scaled up 10x: the residual stream is widest there, the cut keeps them."""
    model = teacher("llama")
    embedding = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:32].sort().values
    model.model.embed_tokens.weight[:, embedding] *= 10
    assert torch.equal(cut.top(cut.measure(model, batches()).channels, 32), embedding)
    student = cut.cut(model, cut.CutConfig(hidden_width=0.5), batches())
    torch.testing.assert_close(student.model.embed_tokens.weight, model.model.embed_tokens.weight[:, embedding])
    scale = cut.norm_scale_of(cut.measure(model, batches()).energy, embedding)
    assert 1 < scale < 2**0.5  # most of the energy is in the kept half
    torch.testing.assert_close(student.model.norm.weight, model.model.norm.weight[embedding] * scale)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3"])
@torch.no_grad()
def test_cutting_channels_that_carry_nothing_keeps_the_function_and_the_export_reloads(kind, tmp_path):
    """Half the residual stream's channels zero everywhere (the embedding's columns, the rows every layer writes to
    it): the cut to half the width computes the teacher's logits (1e-6), and its export, loaded by transformers,
    the cut's. The norms' epsilon is 1e-12 here: it is added to the mean square over the width, which the cut halves
    (at the usual 1e-6, against these random weights' mean square of about 4e-4, it moves the logits by 5e-4)."""
    torch.manual_seed(0)
    model = models.build("hf", hf_config=small_hf_config(kind).to_dict() | {"rms_norm_eps": 1e-12}).eval()
    empty = torch.randperm(64, generator=torch.Generator().manual_seed(4))[:32]
    for name, param in model.state_dict().items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            param[:, empty] = 0
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            param[empty] = 0
    student = cut.cut(model, cut.CutConfig(hidden_width=0.5), batches()).eval()
    assert student.config.hidden_size == 32
    x = batches(3)[2]
    torch.testing.assert_close(student(x), model(x), rtol=0, atol=1e-6)
    models.save_dense(student, tmp_path / "export")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, student(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kind, fields, key, message",
    [
        ("llama", {"layers": 5}, "layers", "5 is more than the teacher's 4 decoder layers"),
        ("llama", {"width": 0.75}, "width", "0.75 of 2 attention head groups (a key/value head with its query heads) "
         "is 1.5, not a whole number: use one of 0.5, 1"),
        ("gpt2", {"hidden_width": 0.5}, "hidden_width",
         "GPT-2 keeps its width: its config derives the head size from the width and the head count"),
        ("llama", {"width": 0.0}, "width", "must be in (0, 1] (got 0.0)"),
        ("llama", {"hidden_width": 1.5}, "hidden_width", "must be in (0, 1] (got 1.5)"),
        ("llama", {"layer_select": "random"}, "layer_select", "must be one of uniform, importance (got 'random')"),
        ("llama", {"experts": 2}, "experts", "the teacher has no mixture-of-experts layers (hf_llama)"),
        ("llama", {"experts": 0}, "experts", "must be >= 1 (got 0)"),
    ],
)  # fmt: skip
def test_bad_cuts_are_refused_naming_the_field(kind, fields, key, message):
    with pytest.raises(ConfigFieldError) as error:
        cut.cut(teacher(kind), cut.CutConfig(**fields), batches())
    assert (error.value.key, error.value.message) == (key, message)


@torch.no_grad()
def test_a_cut_gpt_is_the_teacher_with_heads_and_channels_removed_by_hand():
    """Stillroom's GPT: the kept heads' q, k and v rows of the fused projection, MLP channels, embedding channels."""
    torch.manual_seed(0)
    model = models.build("gpt", vocab_size=HF_VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=16).eval()
    calib = batches()
    student = cut.cut(model, cut.CutConfig(width=0.5, hidden_width=0.5), calib).eval()
    choice = cut.measure(model, calib)
    channels = cut.top(choice.channels, 16)
    by_hand = models.build(
        "gpt", vocab_size=HF_VOCAB, n_layer=2, n_head=2, n_embd=16, block_size=16, head_dim=8,
        mlp_hidden=[64, 64], n_heads_per_layer=[2, 2],
    ).eval()  # fmt: skip
    state, want = model.state_dict(), {}
    for name in ("tok_emb.weight", "pos_emb.weight", "head.weight"):
        want[name] = state[name][:, channels]
    want["ln_f.weight"] = state["ln_f.weight"][channels]
    for i in range(2):
        b = f"blocks.{i}"
        heads = kept(cut.top(choice.units["attn", i], 2), 8)
        mlp = cut.top(choice.units["mlp", i], 64)
        qkv = torch.cat([heads + part * 32 for part in range(3)])
        want |= {
            f"{b}.ln1.weight": state[f"{b}.ln1.weight"][channels],
            f"{b}.ln2.weight": state[f"{b}.ln2.weight"][channels],
            f"{b}.attn.qkv.weight": state[f"{b}.attn.qkv.weight"][qkv][:, channels],
            f"{b}.attn.proj.weight": state[f"{b}.attn.proj.weight"][channels][:, heads],
            f"{b}.mlp.fc.weight": state[f"{b}.mlp.fc.weight"][mlp][:, channels],
            f"{b}.mlp.proj.weight": state[f"{b}.mlp.proj.weight"][channels][:, mlp],
        }
    by_hand.load_state_dict(want)
    x = batches(3)[2]
    torch.testing.assert_close(student(x), by_hand(x), rtol=0, atol=1e-5)


def test_the_preflights_spec_is_the_built_students(tmp_path):
    """What the preflight reads from the teacher's architecture (and a resume compares with a checkpoint) is what the
    cut with calibration builds."""
    from trainer.config import DataConfig, RunConfig, TeacherConfig, TrainConfig

    save_hf_student(tmp_path / "llama", "llama")
    student = {"arch": "from_teacher", "layers": 3, "layer_select": "importance", "width": 0.5, "hidden_width": 0.5,
               "calib_batches": 2, "block_size": 16}  # fmt: skip
    cfg = RunConfig(student=student, teacher=TeacherConfig(checkpoint=str(tmp_path / "llama")),
                    data=DataConfig(name="synthetic"), train=TrainConfig(batch_size=4))  # fmt: skip
    family, config = student_spec(cfg)
    built = build_student(cfg, data.build(cfg.data, cfg.sequence_length))
    assert models.model_spec(built) == {"arch": family.name, "config": dataclasses.asdict(config)}


def test_the_cut_depends_on_calib_seed_and_not_on_train_seed(tmp_path):
    """Runs that differ only in ``train.seed`` train the same student (calibration draws with ``calib_seed``); a
    different ``calib_seed`` calibrates on other batches."""
    from trainer.config import DataConfig, RunConfig, TeacherConfig, TrainConfig

    save_hf_student(tmp_path / "llama", "llama")

    def calibration(train_seed: int, calib_seed: int) -> list[torch.Tensor]:
        student = {"arch": "from_teacher", "layers": 3, "layer_select": "importance", "width": 0.5,
                   "calib_batches": 2, "calib_seed": calib_seed, "block_size": 16}  # fmt: skip
        teacher = TeacherConfig(checkpoint=str(tmp_path / "llama"))
        train = TrainConfig(batch_size=4, seed=train_seed)
        cfg = RunConfig(student=student, teacher=teacher, data=DataConfig(name="synthetic"), train=train)
        dataset = data.build(cfg.data, cfg.sequence_length)
        wanted = from_teacher.config(cfg.student, cfg.data)
        return from_teacher.calibration_batches(wanted, dataset, cfg.train.batch_size)

    first = calibration(train_seed=1, calib_seed=0)
    assert len(first) == 2
    for a, b in zip(first, calibration(train_seed=2, calib_seed=0), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first, calibration(train_seed=1, calib_seed=5), strict=True))
