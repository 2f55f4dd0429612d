"""Sparsity schedules against their closed forms, as functions of the optimizer step."""

import pytest

from trainer.compress.schedules import Schedule


def agp_closed_form(t, t0, n_dt, s_i, s_f):
    return s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** 3


@pytest.mark.parametrize(
    "step, expected_update",
    [
        (0, None),
        (9, None),  # before start: no pruning
        (10, 10),
        (11, 10),
        (14, 10),  # at start, then held between updates (every = 5)
        (15, 15),
        (37, 35),  # mid
        (50, 50),
        (51, 50),
        (1000, 50),  # at and after the end: held
    ],
)
def test_agp_against_closed_form(step, expected_update):
    s = Schedule("agp", start_step=10, end_step=50, every=5, initial=0.1, final=0.8)
    assert s.last_update(step) == expected_update
    if expected_update is None:
        assert s.sparsity(step) == 0.0
    else:
        assert s.sparsity(step) == pytest.approx(agp_closed_form(expected_update, 10, 40, 0.1, 0.8), abs=1e-12)


def test_agp_endpoints_and_shape():
    s = Schedule("agp", start_step=0, end_step=100, every=1, initial=0.0, final=0.9)
    assert s.sparsity(0) == 0.0
    assert s.sparsity(100) == pytest.approx(0.9)
    assert s.sparsity(50) == pytest.approx(0.9 - 0.9 * 0.5**3)
    values = [s.sparsity(t) for t in range(101)]
    assert values == sorted(values)  # monotone, and fastest early (cubic)
    assert values[10] - values[0] > values[100] - values[90]


def test_last_update_reaches_end_step_when_not_a_multiple_of_every():
    s = Schedule("agp", start_step=0, end_step=10, every=4, initial=0.0, final=0.5)
    assert [s.last_update(t) for t in (3, 4, 8, 9, 10, 11)] == [0, 4, 8, 8, 10, 10]
    assert s.sparsity(10) == pytest.approx(0.5)


def test_linear():
    s = Schedule("linear", start_step=20, end_step=120, every=10, initial=0.2, final=0.7)
    assert s.sparsity(19) == 0.0
    assert s.sparsity(20) == pytest.approx(0.2)
    assert s.sparsity(75) == pytest.approx(0.2 + 0.5 * 50 / 100)  # held at the update at step 70
    assert s.sparsity(120) == pytest.approx(0.7)
    assert s.sparsity(500) == pytest.approx(0.7)


def test_constant_is_one_shot_at_start():
    s = Schedule("constant", start_step=7, end_step=7, every=1, initial=0.0, final=0.6)
    assert s.sparsity(6) == 0.0
    assert s.last_update(7) == 7 and s.sparsity(7) == 0.6
    assert s.last_update(100) == 7 and s.sparsity(100) == 0.6


def test_zero_length_agp_is_one_shot():
    s = Schedule("agp", start_step=3, end_step=3, every=1, initial=0.0, final=0.4)
    assert [s.sparsity(t) for t in (2, 3, 4)] == [0.0, 0.4, 0.4]
