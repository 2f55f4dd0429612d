"""Models: shapes, hidden states, tied embeddings, and exports that reload to identical logits."""

from __future__ import annotations

import pytest
import torch

from trainer import export, models


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return models.build("gpt", **{"vocab_size": 65, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **kw})


def test_gpt_shapes_and_hidden_states():
    model = tiny_gpt()
    x = torch.randint(0, 65, (3, 16))
    logits, hidden = model(x, hidden_layers=(0, 2))
    assert logits.shape == (3, 16, 65)
    assert set(hidden) == {0, 2} and hidden[2].shape == (3, 16, 32)
    assert torch.equal(model(x), logits)


def test_gpt_is_causal():
    model = tiny_gpt().eval()
    x = torch.randint(0, 65, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 65
    assert torch.equal(model(x)[0, :10], model(y)[0, :10])
    assert not torch.equal(model(x)[0, 10:], model(y)[0, 10:])


def test_embeddings_are_tied():
    model = tiny_gpt()
    assert model.head.weight is model.tok_emb.weight


def test_gpt_rejects_long_sequences():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("arch", ["gpt", "mlp"])
def test_export_reloads_to_identical_logits(tmp_path, arch):
    if arch == "gpt":
        model, x = tiny_gpt(), torch.randint(0, 65, (2, 16))
    else:
        torch.manual_seed(0)
        model, x = models.build("mlp", in_dim=64, n_classes=10, hidden=[32, 16]), torch.rand(5, 64)
    models.save_dense(model, tmp_path)
    loaded = export.load(tmp_path)
    assert torch.equal(model.eval()(x), loaded(x))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_load_refuses_weights_of_another_shape(tmp_path):
    models.save_dense(tiny_gpt(), tmp_path)
    config = (
        (tmp_path / "config.json")
        .read_text()
        .replace('"n_embd": 32', '"n_embd": 64')
        .replace('"n_head": 2', '"n_head": 4')
    )
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(Exception, match="size mismatch|do not fit"):
        export.load(tmp_path)


def test_load_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(export.ExportError, match="no config.json .not a Stillroom export.$"):
        export.load(tmp_path)
