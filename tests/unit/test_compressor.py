"""The Compressor facade: targets, config checks, training with masks, resume, metrics, QAT, export."""

import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainer import checkpoint, models
from trainer.compress import build_compressor, qat, resolve_targets, validate_modifiers
from trainer.config import ConfigError, ModifierConfig
from trainer.export import load
from trainer.models import WEIGHTS_FILE, build

VOCAB = 17
BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra threads only add contention (200x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return build("gpt", **(dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK) | overrides))


def batch(step):
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (4, BLOCK + 1), generator=generator)


def make_run(modifiers, seed=0):
    model = tiny_gpt(seed)
    compressor = build_compressor(model, modifiers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    compressor.attach_optimizer(optimizer)
    return model, optimizer, compressor


def train(model, optimizer, compressor, steps):
    """Steps ``steps`` (1-based numbers of the step being taken) in the loop's order of calls."""
    losses = []
    for step in steps:
        x = batch(step)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        compressor.mask_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        compressor.after_optimizer_step(step)
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- targets and checks


def test_default_targets_are_linear_layers_in_blocks():
    model = tiny_gpt()
    names = resolve_targets(model, ["blocks.*"], "t")
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert "head" not in resolve_targets(model, ["*"], "t") and "tok_emb" not in resolve_targets(model, ["*"], "t")
    assert resolve_targets(model, ["head"], "t") == ["head"]
    assert resolve_targets(model, ["tok_emb", "*.mlp.fc"], "t") == ["tok_emb", "blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    with pytest.raises(ConfigError, match="t: pattern 'he\\*' matches no Linear"):
        resolve_targets(model, ["he*"], "t")


@pytest.mark.parametrize(
    "fields, arch, message",
    [
        (
            dict(kind="magnitude", final_sparsity=1.0),
            "gpt",
            r"compress.modifiers.0.final_sparsity: must be in \[0, 1\)",
        ),
        (dict(kind="prune"), "gpt", "compress.modifiers.0.kind: unknown kind 'prune'"),
        (
            dict(kind="magnitude", start_step=10, end_step=5),
            "gpt",
            "compress.modifiers.0.end_step: must be >= start_step",
        ),
        (dict(kind="nm", n=3, m=2), "gpt", "compress.modifiers.0.n: must be in"),
        (dict(kind="channel"), "mlp", "compress.modifiers.0.kind: channel pruning needs a student with heads"),
        (dict(kind="magnitude", schedule="cubic"), "gpt", "compress.modifiers.0.schedule: must be one of"),
        (dict(kind="magnitude", initial_sparsity=0.6, final_sparsity=0.5), "gpt", "initial_sparsity"),
        (dict(kind="qat", weight_bits=3), "gpt", "compress.modifiers.0.weight_bits"),
        (dict(kind="magnitude", targets=[]), "gpt", "compress.modifiers.0.targets"),
    ],
)
def test_validate_modifiers_names_the_field(fields, arch, message):
    with pytest.raises(ValueError, match=message):
        validate_modifiers([ModifierConfig(**fields)], models.family(arch))


def test_build_checks_against_the_model():
    with pytest.raises(ConfigError, match="compress.modifiers.1.targets: pattern 'blocks.9.*'"):
        build_compressor(tiny_gpt(), [ModifierConfig(), ModifierConfig(targets=["blocks.9.*"])])
    with pytest.raises(ConfigError, match="compress.modifiers.0.m: .* not a multiple of m=5"):
        build_compressor(tiny_gpt(), [ModifierConfig(kind="nm", n=2, m=5)])
    with pytest.raises(ConfigError, match="compress.modifiers.0.targets: matches no attention or MLP"):
        build_compressor(tiny_gpt(), [ModifierConfig(kind="channel", targets=["head"])])
    mlp = build("mlp", in_dim=8, n_classes=3, hidden=[16])
    with pytest.raises(ConfigError, match="compress.modifiers.0.kind: channel pruning needs a student with heads"):
        build_compressor(mlp, [ModifierConfig(kind="channel", targets=["layers.*"])])
    with pytest.raises(ConfigError, match="compress.modifiers.0.targets: .*tied"):
        build_compressor(tiny_gpt(), [ModifierConfig(kind="qat", targets=["head"])])
    with pytest.raises(ConfigError, match="compress.modifiers.0.targets: QAT target 'tok_emb': .*tied to head"):
        build_compressor(tiny_gpt(), [ModifierConfig(kind="qat", targets=["blocks.*", "tok_emb"])])


def test_no_modifiers_is_inactive():
    model, _, compressor = make_run([])
    assert not compressor.active
    assert compressor.metrics()["compress/sparsity"] == 0.0


# ----------------------------------------------------------------------------- training


def test_pruned_weights_stay_zero_through_adamw_with_momentum():
    modifiers = [
        ModifierConfig(kind="magnitude", schedule="constant", start_step=5, final_sparsity=0.6),
        ModifierConfig(kind="channel", schedule="constant", start_step=5, final_sparsity=0.5),
    ]
    model, optimizer, compressor = make_run(modifiers)
    train(model, optimizer, compressor, range(1, 5))  # dense: AdamW builds up momentum
    assert compressor.metrics()["compress/sparsity"] == 0.0
    train(model, optimizer, compressor, [5])
    pruned = {name: ~mask for name, mask in compressor.masks.items()}
    for name, off in pruned.items():
        state = optimizer.state[model.get_parameter(name)]
        assert (state["exp_avg"][off] == 0).all() and (state["exp_avg_sq"][off] == 0).all()
    losses = train(model, optimizer, compressor, range(6, 26))  # 20 more steps
    assert losses[-1] < losses[0]
    for name, off in pruned.items():
        assert off.any()
        assert (model.get_parameter(name)[off] == 0).all(), name
    assert compressor.metrics()["compress/sparsity"] >= 0.6


def test_resume_mid_schedule_reproduces_the_uninterrupted_run():
    modifiers = [
        ModifierConfig(kind="magnitude", scope="global", start_step=2, end_step=10, every=2, final_sparsity=0.7),
        ModifierConfig(
            kind="channel",
            schedule="linear",
            targets=["blocks.*.mlp.*"],
            start_step=0,
            end_step=9,
            every=3,
            final_sparsity=0.5,
            norm=2,
        ),
        ModifierConfig(kind="qat", targets=["blocks.*"], start_step=4, act_bits=8),
    ]
    n = 6
    model_a, opt_a, comp_a = make_run(modifiers)
    losses_a = train(model_a, opt_a, comp_a, range(1, 2 * n + 1))

    model_b, opt_b, comp_b = make_run(modifiers)
    losses_b = train(model_b, opt_b, comp_b, range(1, n + 1))
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict(), "compress": comp_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    del model_b, opt_b, comp_b

    model_c, opt_c, comp_c = make_run(modifiers, seed=123)  # fresh objects, different init
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optim"])
    comp_c.load_state_dict(saved["compress"])
    assert comp_c.qat.enabled
    losses_b += train(model_c, opt_c, comp_c, range(n + 1, 2 * n + 1))

    # Bit for bit: one process, one thread, the same ops on the same shapes in the same order; the checkpoint only
    # round-trips exact fp32 state, so any difference is state lost or restored wrongly, not rounding.
    assert losses_b == losses_a
    assert comp_c.masks.keys() == comp_a.masks.keys()
    for name in comp_a.masks:
        assert torch.equal(comp_c.masks[name], comp_a.masks[name]), name
    assert comp_c.metrics() == comp_a.metrics()


def test_state_round_trips_through_a_dcp_checkpoint(tmp_path):
    modifiers = [ModifierConfig(kind="magnitude", start_step=0, end_step=4, final_sparsity=0.5)]
    model, optimizer, compressor = make_run(modifiers)
    train(model, optimizer, compressor, range(1, 3))
    checkpoint.save(
        tmp_path,
        2,
        model=model,
        optimizer=optimizer,
        extra={"compress": compressor.state_dict()},
        model_spec={},
        keep_last=1,
    )
    model2, optimizer2, compressor2 = make_run(modifiers, seed=7)
    extra = checkpoint.load(
        checkpoint.latest(tmp_path),
        model=model2,
        optimizer=optimizer2,
        extra_template={"compress": compressor2.state_dict()},
    )
    compressor2.load_state_dict(extra["compress"])
    assert compressor2.state_dict()["pruners"] == compressor.state_dict()["pruners"]
    for name, mask in compressor.masks.items():
        assert torch.equal(compressor2.masks[name], mask)


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsity_metric_matches_target(scope):
    modifiers = [ModifierConfig(kind="magnitude", schedule="constant", scope=scope, final_sparsity=0.3)]
    model, _, compressor = make_run(modifiers)
    metrics = compressor.metrics()
    targeted = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith("blocks.") and n.endswith("weight") and "ln" not in n
    )
    assert abs(metrics["compress/sparsity"] - 0.3) <= 8 / targeted  # rounding per layer
    columns, rows = compressor.layer_table()
    assert columns == ["layer", "shape", "sparsity", "bits"]
    assert [r[0] for r in rows][:2] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"] and len(rows) == 8
    assert rows[0][1] == "96x32" and rows[0][3] == 32
    if scope == "layer":
        assert all(abs(r[2] - 0.3) < 1e-3 for r in rows)


def test_nonzero_params_counts_tied_weights_once():
    modifiers = [ModifierConfig(kind="magnitude", targets=["head"], schedule="constant", final_sparsity=0.25)]
    model, _, compressor = make_run(modifiers)
    assert list(compressor.masks) == ["tok_emb.weight"]
    unique = sum(p.numel() for p in model.parameters())
    pruned = round(0.25 * model.tok_emb.weight.numel())
    metrics = compressor.metrics()
    assert metrics["compress/nonzero_params"] == unique - pruned
    assert metrics["compress/sparsity"] == pytest.approx(0.25, abs=1e-3)
    assert metrics["compress/weight_bits"] == 32 and metrics["compress/qat_active"] == 0
    assert "compress/weight_sqnr_db" not in metrics


# ----------------------------------------------------------------------------- pruning + QAT, export


def stored_bytes(out_dir):
    return sum(t.numel() * t.element_size() for t in load_file(str(out_dir / WEIGHTS_FILE)).values())


@pytest.mark.parametrize("weight_bits, group_size", [(8, 32), (4, 16)])
def test_prune_and_qat_pruned_weights_are_zero_in_the_quantized_model(tmp_path, weight_bits, group_size):
    modifiers = [
        ModifierConfig(kind="channel", schedule="constant", start_step=2, final_sparsity=0.5),
        ModifierConfig(kind="nm", targets=["blocks.*.mlp.*"], start_step=3, n=2, m=4),
        ModifierConfig(kind="qat", start_step=1, weight_bits=weight_bits, group_size=group_size),
    ]
    model, optimizer, compressor = make_run(modifiers)
    assert not compressor.qat.enabled
    train(model, optimizer, compressor, range(1, 6))
    assert compressor.qat.enabled
    fc = model.blocks["0"].mlp.fc
    fake_quantized = qat.fake_quantize_weight(fc)
    off = ~compressor.masks["blocks.0.mlp.fc.weight"]
    assert not torch.equal(fake_quantized, fc.weight)  # fake-quant is on
    assert (fake_quantized[off] == 0).all() and off.float().mean() > 0.6

    metrics = compressor.metrics()
    assert metrics["compress/qat_active"] == 1 and "compress/weight_sqnr_db" in metrics
    assert metrics["compress/weight_bits"] < 32
    assert metrics["compress/ratio"] > 2
    assert {row[3] for row in compressor.layer_table()[1]} == {weight_bits}

    out = compressor.export(tmp_path / "export")
    assert metrics["compress/model_bytes"] == stored_bytes(out)
    shipped = load(out)
    x = batch(99)[:, :-1]
    model.eval()
    with torch.no_grad():
        # Thinning drops all-zero channels, so matmul inner lengths differ: float sums regrouped (~1e-6 on these
        # O(1) logits; measured bit-equal here), far under 1e-4. No activation fake-quant, so no int8 code can flip.
        torch.testing.assert_close(shipped(x), model(x), atol=1e-4, rtol=0)
    hidden = shipped.cfg.mlp_hidden
    assert hidden == ([64, 64] if weight_bits == 8 else [128, 128])  # int4 groups keep the proj width


def test_mlp_student_magnitude_and_qat_export(tmp_path):
    torch.manual_seed(0)
    model = build("mlp", in_dim=64, n_classes=10, hidden=[32, 32])
    compressor = build_compressor(
        model,
        [
            ModifierConfig(
                kind="magnitude", targets=["layers.*"], scope="global", schedule="constant", final_sparsity=0.5
            ),
            ModifierConfig(kind="qat", targets=["layers.0", "layers.1"], start_step=0),
        ],
    )
    compressor.attach_optimizer(torch.optim.AdamW(model.parameters()))
    metrics = compressor.metrics()
    assert metrics["compress/sparsity"] == pytest.approx(0.5, abs=1e-3) and metrics["compress/qat_active"] == 1
    out = compressor.export(tmp_path / "mlp")
    assert metrics["compress/model_bytes"] == stored_bytes(out)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x), model(x), atol=1e-4, rtol=0)


def test_pruned_and_quantized_embeddings_train_and_export_with_the_tie(tmp_path):
    modifiers = [
        ModifierConfig(
            kind="magnitude", targets=["blocks.*", "tok_emb", "pos_emb"], start_step=1, end_step=3, final_sparsity=0.5
        ),
        ModifierConfig(kind="qat", targets=["blocks.*", "tok_emb", "pos_emb", "head"], start_step=2, act_bits=8),
    ]
    model, optimizer, compressor = make_run(modifiers)
    train(model, optimizer, compressor, range(1, 7))
    assert model.head.weight is model.tok_emb.weight and compressor.qat.enabled
    off = ~compressor.masks["tok_emb.weight"]
    assert off.float().mean() == pytest.approx(0.5, abs=0.01) and (model.tok_emb.weight[off] == 0).all()
    rows = {row[0]: row for row in compressor.layer_table()[1]}
    assert [rows[name][3] for name in ("tok_emb", "pos_emb", "head")] == [8, 8, 8]
    assert rows["head"][2] == rows["tok_emb"][2] == pytest.approx(0.5, abs=0.01)

    metrics = compressor.metrics()
    out = compressor.export(tmp_path / "export")
    assert metrics["compress/model_bytes"] == stored_bytes(out)
    shipped = load(out)
    assert shipped.head.weight is shipped.tok_emb.weight and (shipped.tok_emb.weight[off] == 0).all()
    x = batch(99)[:, :-1]
    model.eval()
    with torch.no_grad():
        # Not thinned (no channel pruning): the same ops on the same shapes as the QAT model (measured bit-equal on
        # all three kernel paths), so the int8 activation codes cannot flip and 1e-4 is never approached.
        torch.testing.assert_close(shipped(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_metrics_from_shard_counts_equal_the_whole_model_metrics(weight_bits):
    """The counts path (used under sharding) gives the same sizes, sparsity and SQNR as the full-tensor path."""
    modifiers = [
        ModifierConfig(
            kind="magnitude",
            targets=["blocks.*", "tok_emb"],
            schedule="agp",
            final_sparsity=0.6,
            start_step=1,
            end_step=4,
            every=1,
        ),
        ModifierConfig(
            kind="qat", targets=["blocks.*", "tok_emb", "head"], weight_bits=weight_bits, group_size=16, start_step=3
        ),
    ]
    model, optimizer, compressor = make_run(modifiers)
    train(model, optimizer, compressor, range(1, 6))
    from trainer.compress import stats

    counts = compressor.shard_counts()
    want, got = compressor.metrics(), stats.summary_from_counts(counts, qat_active=compressor.qat_active)
    assert want["compress/qat_active"] == 1.0 and 0.55 < want["compress/sparsity"] < 0.65
    assert sorted(got) == sorted(want)
    for key in ("compress/model_bytes", "compress/nonzero_params", "compress/sparsity", "compress/qat_active"):
        assert got[key] == want[key], key  # from integer counts (exact zeros, codes): exact on any kernel path
    for key in ("compress/weight_bits", "compress/ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    # metrics() sums w^2 and (w - q(w))^2 in fp32 (relative error ~eps * log2(n) <= 1.5e-6 per sum for n <= 3072
    # weights), the counts path in fp64; 10*log10 turns that into <= 4.34 * 3e-6 dB, under 1e-6 of an SQNR >= 13 dB
    # (here ~24 dB at int4, ~48 dB at int8; measured ~7e-9 relative on all three kernel paths).
    assert got["compress/weight_sqnr_db"] == pytest.approx(want["compress/weight_sqnr_db"], rel=1e-6)
    _, rows = stats.table_from_counts(counts)
    _, want_rows = compressor.layer_table()
    assert {row[0]: row[2:] for row in rows} == {row[0]: row[2:] for row in want_rows if row[0] != "head"}
