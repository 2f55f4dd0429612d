"""LR schedule: linear warmup, cosine decay to min_lr, as nanoGPT."""

import math

import pytest

from trainer.lr_schedule import lr_at

KW = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)


def test_warmup_is_linear():
    assert lr_at(0, **KW) == pytest.approx(1e-3 / 11)
    assert lr_at(9, **KW) == pytest.approx(1e-3 * 10 / 11)


def test_cosine_reaches_min_lr():
    assert lr_at(10, **KW) == pytest.approx(1e-3)
    assert lr_at(60, **KW) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert lr_at(110, **KW) == pytest.approx(1e-4)
    assert lr_at(500, **KW) == pytest.approx(1e-4)
