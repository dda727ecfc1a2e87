"""Tests of the sampling-time stage schedule (method.md section 6)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.schedule import StageSchedule

FAST = settings(max_examples=25, deadline=None)


def test_paper_default_table():
    sched = StageSchedule((30, 10), (0.7,))
    grid = sched.grid
    assert grid.shape == (41, 2) and grid.dtype == torch.float64
    assert sched.num_steps == 40 and sched.num_stages == 2
    assert grid[0].tolist() == [0.0, 0.0]
    assert grid[30].tolist() == [0.7, 0.0]
    assert grid[40].tolist() == [1.0, 1.0]
    assert grid[1].tolist() == pytest.approx([0.7 / 30, 0.0], abs=1e-15)
    assert grid[31].tolist() == pytest.approx([0.73, 0.1], abs=1e-12)
    for k in range(31):
        assert grid[k, 0].item() == pytest.approx(0.7 * k / 30, abs=1e-15)
        assert grid[k, 1].item() == 0.0
    for k in range(31, 41):
        j = k - 30
        assert grid[k, 0].item() == pytest.approx(0.7 + 0.3 * j / 10, abs=1e-12)
        assert grid[k, 1].item() == pytest.approx(j / 10, abs=1e-12)
    assert sched.main_stage.tolist() == [0] * 30 + [1] * 10
    assert sched.active.shape == (40, 2) and sched.active.dtype == torch.bool
    assert sched.active[:, 0].all()
    assert sched.active[:, 1].tolist() == [False] * 30 + [True] * 10
    assert sched.stage_ends == [30, 40]


def test_three_stages_by_hand():
    sched = StageSchedule((2, 2, 2), (0.5, 0.8))
    expected = [
        [0.0, 0.0, 0.0],
        [0.25, 0.0, 0.0],
        [0.5, 0.0, 0.0],
        [0.65, 0.4, 0.0],  # stage 1: 0.5 -> 0.8 halfway; stage 2: 0 -> 0.8 halfway
        [0.8, 0.8, 0.0],
        [0.9, 0.9, 0.5],  # stages 1, 2: 0.8 -> 1 halfway; stage 3: 0 -> 1 halfway
        [1.0, 1.0, 1.0],
    ]
    torch.testing.assert_close(sched.grid, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert sched.main_stage.tolist() == [0, 0, 1, 1, 2, 2]
    assert sched.active.tolist() == [
        [True, False, False],
        [True, False, False],
        [True, True, False],
        [True, True, False],
        [True, True, True],
        [True, True, True],
    ]
    assert sched.stage_ends == [2, 4, 6]


def test_uneven_three_stage_case():
    sched = StageSchedule((3, 1, 4), (0.6, 0.9))
    g = sched.grid
    assert g.shape == (9, 3)
    assert g[3].tolist() == [0.6, 0.0, 0.0]
    assert g[4].tolist() == [0.9, 0.9, 0.0]  # a one-step stage jumps straight to the threshold
    assert g[6].tolist() == pytest.approx([0.95, 0.95, 0.5])
    assert g[8].tolist() == [1.0, 1.0, 1.0]


def test_single():
    sched = StageSchedule.single(8)
    assert sched.num_stages == 1 and sched.thresholds == () and sched.steps == (8,)
    torch.testing.assert_close(sched.grid[:, 0], torch.linspace(0, 1, 9, dtype=torch.float64), atol=1e-15, rtol=0)
    assert sched.main_stage.tolist() == [0] * 8
    assert sched.active.all()
    assert StageSchedule.single(1).grid.tolist() == [[0.0], [1.0]]


@st.composite
def schedules(draw):
    stages = draw(st.integers(1, 4))
    steps = tuple(draw(st.integers(1, 12)) for _ in range(stages))
    taus = sorted(set(draw(st.lists(st.floats(0.01, 0.99), min_size=stages - 1, max_size=stages - 1))))
    if len(taus) != stages - 1 or any(b - a < 1e-6 for a, b in zip(taus, taus[1:])):
        taus = [(i + 1) / stages for i in range(stages - 1)]
    return StageSchedule(steps, taus)


@FAST
@given(schedules())
def test_schedule_properties(sched):
    g = sched.grid
    n, s = sched.num_steps, sched.num_stages
    assert g.shape == (n + 1, s)
    assert (g[0] == 0).all() and (g[-1] == 1).all()
    assert (g >= 0).all() and (g <= 1).all()
    assert (g[1:] >= g[:-1]).all()  # monotone non-decreasing per stage
    assert sched.main_stage.shape == (n,) and sched.active.shape == (n, s)
    assert sched.main_stage.tolist() == sum(([i] * k for i, k in enumerate(sched.steps)), [])
    taus = list(sched.thresholds) + [1.0]
    for i, end in enumerate(sched.stage_ends):
        assert (g[end, : i + 1] == taus[i]).all()  # stages up to i land exactly on their threshold
        assert (g[end, i + 1 :] == 0).all()
    for step in range(n):
        p = sched.main_stage[step].item()
        moving = g[step + 1] > g[step]
        assert moving.tolist() == [j <= p for j in range(s)]  # exactly the active stages move
        assert sched.active[step].tolist() == [j <= p for j in range(s)]
        assert (g[step, p + 1 :] == 0).all() and (g[step + 1, p + 1 :] == 0).all()
        # all earlier stages move together (same value) and stay ahead of the current stage
        assert torch.allclose(g[step + 1, :p], g[step + 1, 0].expand(p))
        assert (g[step + 1, :p] >= g[step + 1, p]).all()


@pytest.mark.parametrize(
    "steps, thresholds",
    [
        ((30, 10), (0.7, 0.8)),  # wrong count
        ((30, 10), ()),
        ((30,), (0.5,)),
        ((), ()),
        ((10, 10, 10), (0.8, 0.7)),  # not increasing
        ((10, 10, 10), (0.7, 0.7)),  # not strictly increasing
        ((10, 10), (0.0,)),  # outside (0, 1)
        ((10, 10), (1.0,)),
        ((10, 10), (-0.2,)),
        ((10, 10), (1.5,)),
        ((10, 10), (float("nan"),)),
        ((0, 10), (0.7,)),  # zero steps
        ((10, -1), (0.7,)),  # negative steps
        ((10.0, 10), (0.7,)),  # non-integer steps
        ((10.5, 10), (0.7,)),
        ((True, 10), (0.7,)),
    ],
)
def test_invalid_schedules_raise(steps, thresholds):
    with pytest.raises(ValueError):
        StageSchedule(steps, thresholds)


def test_single_invalid():
    with pytest.raises(ValueError):
        StageSchedule.single(0)
    with pytest.raises(ValueError):
        StageSchedule.single(2.5)


# ------------------------------------------------------------------------------------- sampler.shift (SD3's shift)
def test_shift_warps_every_stage_and_the_thresholds():
    from dfm.config import SamplerConfig
    from dfm.schedule import shift_time

    plain = StageSchedule((10, 5, 5), (0.7, 0.85))
    for shift in (0.25, 3.0):
        settings = SamplerConfig(steps=(10, 5, 5), thresholds=(0.7, 0.85), shift=shift).validate(3)
        warped = StageSchedule.from_settings(settings, (64, 64))
        torch.testing.assert_close(warped.grid, plain.grid / (plain.grid + shift * (1 - plain.grid)))
        assert warped.thresholds == pytest.approx([t / (t + shift * (1 - t)) for t in (0.7, 0.85)])
        assert warped.grid[0].tolist() == [0.0] * 3 and warped.grid[-1].tolist() == [1.0] * 3
        assert (warped.grid.diff(dim=0) >= 0).all()  # still monotone in every stage
        assert torch.equal(warped.main_stage, plain.main_stage) and torch.equal(warped.active, plain.active)
    # SD3's form in noise levels: sigma -> shift sigma / (1 + (shift - 1) sigma)
    sigma = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(1 - shift_time(1 - sigma, 3.0), 3 * sigma / (1 + 2 * sigma))
    # below 1 the last step before the data starts later: 5 steps of the fine stage end 0.8 -> 1 without a shift
    fine = StageSchedule.from_settings(SamplerConfig(steps=(5,), thresholds=(), shift=0.25).validate(1), (8, 8))
    assert fine.grid[-2, 0].item() == pytest.approx(0.8 / (0.8 + 0.25 * 0.2))
    # 1 is no shift at all
    same = StageSchedule.from_settings(SamplerConfig(steps=(10, 5, 5), thresholds=(0.7, 0.85)).validate(3), (8, 8))
    assert torch.equal(same.grid, plain.grid)


def test_shift_from_warps_only_the_later_stages():
    """sampler.shift_from=k: stages k.. are warped (grid columns and thresholds), earlier ones keep the uniform grid;
    negative counts from the finest."""
    from dfm.config import SamplerConfig
    from dfm.schedule import shift_time

    plain = StageSchedule((10, 5, 5), (0.7, 0.85))
    for first in (2, -1):
        settings = SamplerConfig(steps=(10, 5, 5), thresholds=(0.7, 0.85), shift=0.3, shift_from=first).validate(3)
        assert [settings.stage_shift(k, 3) for k in range(3)] == [1.0, 1.0, 0.3]
        warped = StageSchedule.from_settings(settings, (64, 64))
        torch.testing.assert_close(warped.grid[:, :2], plain.grid[:, :2])  # the coarse stages as without a shift
        torch.testing.assert_close(warped.grid[:, 2], shift_time(plain.grid[:, 2], 0.3))
        assert warped.thresholds == (0.7, 0.85)  # stage 2 has no threshold of its own (it ends on the data)
        assert (warped.grid.diff(dim=0) >= 0).all() and warped.grid[-1].tolist() == [1.0] * 3
    # the finest stage's last step starts nearer the data: 0.8 -> 0.93 for shift 0.3
    assert warped.grid[-2, 2].item() == pytest.approx(0.8 / (0.8 + 0.3 * 0.2))
    middle = StageSchedule.from_settings(SamplerConfig((10, 5, 5), (0.7, 0.85), shift=0.3, shift_from=1), (8, 8))
    torch.testing.assert_close(middle.grid[:, 0], plain.grid[:, 0])
    torch.testing.assert_close(middle.grid[:, 1:], shift_time(plain.grid[:, 1:], 0.3))
    assert middle.thresholds == pytest.approx((0.7, shift_time(0.85, 0.3)))
    every = SamplerConfig((10, 5, 5), (0.7, 0.85), shift=0.3, shift_from=-3)  # -3 of 3 stages = 0, every stage
    assert torch.equal(
        StageSchedule.from_settings(every, (8, 8)).grid,
        StageSchedule.from_settings(SamplerConfig((10, 5, 5), (0.7, 0.85), shift=0.3), (8, 8)).grid,
    )
    for bad in (3, -4, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"sampler\.shift_from=.*\(-1 = the finest only\)"):
            SamplerConfig((10, 5, 5), (0.7, 0.85), shift=0.3, shift_from=bad).validate(3)


def test_flow_matching_from_a_dfm_config_shifts_its_one_grid():
    from dfm.presets import get_preset, with_method
    from dfm.resolve import apply_overrides

    cfg = apply_overrides(get_preset("quickstart"), ["sampler.shift=0.3", "sampler.shift_from=1"])
    fm = with_method(cfg, "fm")
    assert (fm.sampler.shift, fm.sampler.shift_from, fm.sampler.steps) == (0.3, 0, (sum(cfg.sampler.steps),))


@pytest.mark.parametrize("shift", [0, -1.0, float("nan"), float("inf"), True, "0.5"])
def test_bad_shift_is_named(shift):
    from dfm.config import SamplerConfig

    with pytest.raises(ValueError, match=r"sampler\.shift="):
        SamplerConfig(shift=shift).validate(2)
