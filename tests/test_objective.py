"""Tests of the per-stage flow-matching path and loss (method.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.decomposition import HaarWavelet, Identity, LaplacianPyramid
from dfm.objective import DFMObjective, active_mask, default_stage_probs, logit_normal

N = 100_000
FAST = settings(max_examples=25, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zero_model(levels, t, y, main_stage):
    return [torch.zeros_like(lv) for lv in levels]


def _logit(t: torch.Tensor) -> torch.Tensor:
    return torch.logit(t.double())


# -- defaults and helpers -------------------------------------------------------------------------------------
def test_default_stage_probs():
    assert default_stage_probs(1) == (1.0,)
    assert default_stage_probs(2) == pytest.approx((0.9, 0.1))
    assert default_stage_probs(3) == pytest.approx((0.8, 0.1, 0.1))
    assert DFMObjective(LaplacianPyramid(2)).stage_probs == pytest.approx((0.9, 0.1))
    assert DFMObjective(Identity()).stage_probs == (1.0,)
    with pytest.raises(ValueError):
        default_stage_probs(11)


def test_stage_mask():
    mask = active_mask(torch.tensor([0, 2, 1]), 3)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_logit_normal_statistics():
    t = logit_normal((N,), 0.4, 0.7, gen(1))
    assert ((t > 0) & (t < 1)).all()
    z = _logit(t)
    assert z.mean().item() == pytest.approx(0.4, abs=4 * 0.7 / math.sqrt(N))
    assert z.std().item() == pytest.approx(0.7, rel=0.01)
    torch.testing.assert_close(logit_normal((5,), 0.0, 1.0, gen(3)), logit_normal((5,), 0.0, 1.0, gen(3)))


# -- draws of the main stage and the timesteps ----------------------------------------------------------------
@pytest.mark.parametrize(
    "dec, probs", [(LaplacianPyramid(2), None), (LaplacianPyramid(3), (0.5, 0.3, 0.2)), (HaarWavelet(3), None)]
)
def test_main_stage_frequencies(dec, probs):
    obj = DFMObjective(dec, stage_probs=probs)
    q = obj.sample_main_stage(N, gen(2))
    assert q.shape == (N,) and q.dtype == torch.long
    freq = torch.bincount(q, minlength=dec.num_stages).double() / N
    for f, p in zip(freq.tolist(), obj.stage_probs):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / N) + 1e-12
    if probs is None and dec.num_stages == 2:
        assert obj.stage_probs == pytest.approx((0.9, 0.1))


def test_zero_probability_stage_is_never_main():
    q = DFMObjective(LaplacianPyramid(3), stage_probs=(0.0, 1.0, 0.0)).sample_main_stage(1000, gen(0))
    assert (q == 1).all()


@pytest.mark.parametrize("loc, scale", [(0.0, 1.0), (-0.5, 0.6)])
def test_main_stage_time_is_logit_normal(loc, scale):
    obj = DFMObjective(LaplacianPyramid(3), stage_probs=(0.4, 0.3, 0.3), main_loc=loc, main_scale=scale)
    q = obj.sample_main_stage(N, gen(3))
    t = obj.sample_timesteps(q, gen(4))
    assert t.shape == (N, 3)
    main_t = t.gather(1, q[:, None])[:, 0]
    assert ((main_t > 0) & (main_t < 1)).all()
    z = _logit(main_t)
    assert z.median().item() == pytest.approx(loc, abs=0.02)
    assert z.mean().item() == pytest.approx(loc, abs=0.02)
    assert z.std().item() == pytest.approx(scale, rel=0.02)
    # the main stage's time does not depend on which stage is the main one
    for s in range(3):
        assert _logit(main_t[q == s]).median().item() == pytest.approx(loc, abs=0.05)


def test_earlier_stages_are_mostly_clean():
    obj = DFMObjective(LaplacianPyramid(3))
    t = obj.sample_timesteps(torch.full((N,), 2), gen(5))
    for s in (0, 1):
        z = _logit(t[:, s])
        assert z.mean().item() == pytest.approx(1.5, abs=0.02)
        assert z.std().item() == pytest.approx(1.0, rel=0.02)
        assert t[:, s].median().item() == pytest.approx(1 / (1 + math.exp(-1.5)), abs=0.005)
        assert t[:, s].median().item() == pytest.approx(0.82, abs=0.01)
    # independent draws: earlier stages do not share the main stage's (or each other's) time
    z = _logit(t)
    corr = torch.corrcoef(z.T)
    assert corr[0, 1].abs() < 0.02 and corr[0, 2].abs() < 0.02 and corr[1, 2].abs() < 0.02
    assert _logit(t[:, 2]).median().item() == pytest.approx(0.0, abs=0.02)
    # custom location and scale
    t = DFMObjective(LaplacianPyramid(2), prev_loc=0.5, prev_scale=2.0).sample_timesteps(torch.ones(N, dtype=int))
    assert _logit(t[:, 0]).mean().item() == pytest.approx(0.5, abs=0.04)
    assert _logit(t[:, 0]).std().item() == pytest.approx(2.0, rel=0.02)


def test_later_stages_are_exactly_zero():
    obj = DFMObjective(LaplacianPyramid(3), stage_probs=(0.6, 0.3, 0.1))
    q = obj.sample_main_stage(N, gen(6))
    t = obj.sample_timesteps(q, gen(7))
    later = torch.arange(3)[None, :] > q[:, None]
    assert later.any()
    assert (t[later] == 0).all()
    assert (t[~later] > 0).all()


def test_tied_times():
    obj = DFMObjective(LaplacianPyramid(3), stage_probs=(0.2, 0.3, 0.5), tied=True)
    q = obj.sample_main_stage(10_000, gen(8))
    t = obj.sample_timesteps(q, gen(9))
    main_t = t.gather(1, q[:, None])
    active = torch.arange(3)[None, :] <= q[:, None]
    assert torch.equal(torch.where(active, t, main_t), main_t.expand(-1, 3))
    assert (t[~active] == 0).all()
    assert _logit(main_t).median().item() == pytest.approx(0.0, abs=0.05)
    # untied: the earlier stages differ from the main stage
    t_untied = DFMObjective(LaplacianPyramid(3)).sample_timesteps(q, gen(9))
    assert (t_untied[:, 0] != t_untied.gather(1, q[:, None])[:, 0])[q > 0].all()


# -- the path -------------------------------------------------------------------------------------------------
@FAST
@given(st.integers(0, 2**16), st.integers(1, 3))
def test_path_algebra(seed, stages):
    dec = LaplacianPyramid(stages)
    x = torch.randn(16, 2, 8, 8, generator=gen(seed), dtype=torch.float64)
    levels = dec.decompose(x)
    obj = DFMObjective(dec, stage_probs=(1 / stages,) * stages)
    path = obj.sample_path(levels, generator=gen(seed + 1))
    assert path.t.shape == (16, stages) and path.mask.shape == (16, stages) and path.main_stage.shape == (16,)
    torch.testing.assert_close(path.mask, active_mask(path.main_stage, stages))
    for s, (x1, xt, v) in enumerate(zip(levels, path.levels_t, path.targets)):
        assert xt.shape == x1.shape and v.shape == x1.shape and xt.dtype == torch.float64
        t = path.t[:, s].double().view(-1, 1, 1, 1)
        active = path.mask[:, s].bool()
        # X_t + (1 - t) v == X1 on active stages (X_t = t X1 + (1 - t) eps, v = X1 - eps)
        torch.testing.assert_close((xt + (1 - t) * v)[active], x1[active], atol=1e-12, rtol=0)
        eps = x1 - v
        torch.testing.assert_close(xt[active], (t * x1 + (1 - t) * eps)[active], atol=1e-12, rtol=0)
        # inactive stages: t = 0 and the input is exactly zero
        assert (path.t[~active, s] == 0).all()
        assert (xt[~active] == 0).all()


def test_path_noise_is_standard_normal_and_independent_per_stage():
    dec = LaplacianPyramid(2)
    x = torch.randn(512, 1, 16, 16, generator=gen(10)) * 3 + 1
    levels = dec.decompose(x)
    obj = DFMObjective(dec)
    path = obj.sample_path(levels, main_stage=torch.ones(512, dtype=torch.long), generator=gen(11))
    eps = [x1 - v for x1, v in zip(levels, path.targets)]
    for e in eps:
        assert e.mean().item() == pytest.approx(0.0, abs=0.02)
        assert e.std().item() == pytest.approx(1.0, abs=0.02)
    up = torch.nn.functional.interpolate(eps[0], size=(16, 16), mode="nearest")
    assert torch.corrcoef(torch.stack([up.flatten(), eps[1].flatten()]))[0, 1].abs() < 0.02
    # noise differs between samples with the same data
    assert not torch.allclose(eps[1][0], eps[1][1])


def test_path_is_reproducible_with_a_generator():
    dec = LaplacianPyramid(2)
    levels = dec.decompose(torch.randn(4, 1, 8, 8))
    obj = DFMObjective(dec)
    a, b = obj.sample_path(levels, generator=gen(12)), obj.sample_path(levels, generator=gen(12))
    assert torch.equal(a.t, b.t) and torch.equal(a.main_stage, b.main_stage)
    assert all(torch.equal(u, v) for u, v in zip(a.levels_t, b.levels_t))


# -- the loss -------------------------------------------------------------------------------------------------
def test_masked_stage_data_does_not_change_the_loss():
    dec = HaarWavelet(2)
    obj = DFMObjective(dec)
    g = gen(13)
    x = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
    # a checkerboard has zero 2x2 block mean: it changes stage 2 (the fine level) only
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1).double()
    x2 = x + 5.0 * checker
    l1, l2 = dec.decompose(x), dec.decompose(x2)
    torch.testing.assert_close(l1[0], l2[0], atol=1e-12, rtol=0)
    assert not torch.allclose(l1[1], l2[1])

    def model(levels, t, y, main_stage):  # depends on its inputs
        return [0.5 * lv + t[:, s].view(-1, 1, 1, 1) for s, lv in enumerate(levels)]

    coarse = torch.zeros(8, dtype=torch.long)
    a = obj.loss(model, x, generator=gen(14), main_stage=coarse)
    b = obj.loss(model, x2, generator=gen(14), main_stage=coarse)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12, abs=1e-12)
    assert torch.equal(a.path.levels_t[1], torch.zeros_like(a.path.levels_t[1]))
    # when stage 2 is active, the same change does change the loss
    fine = torch.ones(8, dtype=torch.long)
    c = obj.loss(model, x, generator=gen(14), main_stage=fine)
    d = obj.loss(model, x2, generator=gen(14), main_stage=fine)
    assert abs(c.loss.item() - d.loss.item()) > 1e-3


def test_loss_matches_hand_computation():
    dec = LaplacianPyramid(3)
    obj = DFMObjective(dec, stage_probs=(0.4, 0.3, 0.3))
    b = 6
    x = torch.randn(b, 2, 8, 8, generator=gen(15))
    shapes = dec.level_shapes(x.shape)
    preds = [torch.randn(*s, generator=gen(16 + i)) for i, s in enumerate(shapes)]
    seen = {}

    def model(levels, t, y, main_stage):
        seen.update(levels=levels, t=t, y=y, main_stage=main_stage)
        return preds

    y = torch.arange(b)
    main_stage = torch.tensor([0, 1, 2, 2, 1, 0])
    out = obj.loss(model, x, y=y, generator=gen(17), main_stage=main_stage)
    path = out.path
    assert seen["y"] is y and torch.equal(seen["main_stage"], main_stage) and seen["t"] is path.t
    assert [tuple(lv.shape) for lv in seen["levels"]] == shapes
    mse = torch.zeros(b, 3, dtype=torch.float64)
    for i in range(b):
        for s in range(3):
            mse[i, s] = ((preds[s][i].double() - path.targets[s][i].double()) ** 2).mean()
    mask = (torch.arange(3)[None, :] <= main_stage[:, None]).double()
    assert out.loss.shape == ()
    assert out.loss.item() == pytest.approx((mse * mask).sum(1).mean().item(), rel=1e-5)
    assert out.stage_counts.tolist() == [6, 4, 2]
    expected = (mse * mask).sum(0) / torch.tensor([6.0, 4.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(out.stage_losses.double(), expected, rtol=1e-5, atol=0)


def test_stage_losses_zero_where_no_sample_is_active_and_grad_flows():
    obj = DFMObjective(LaplacianPyramid(2))
    w = torch.tensor(0.3, requires_grad=True)
    model = lambda levels, t, y, q: [w * lv for lv in levels]
    out = obj.loss(model, torch.randn(4, 1, 8, 8), generator=gen(18), main_stage=torch.zeros(4, dtype=torch.long))
    assert out.stage_counts.tolist() == [4, 0]
    assert out.stage_losses[1].item() == 0.0 and out.stage_losses[0].item() > 0
    assert out.loss.item() == pytest.approx(out.stage_losses[0].item(), rel=1e-6)
    assert not out.stage_losses.requires_grad
    out.loss.backward()
    assert w.grad is not None and w.grad.item() != 0


def test_identity_objective_is_plain_flow_matching():
    obj = DFMObjective(Identity())
    x = torch.randn(8, 1, 4, 4, generator=gen(19))
    out = obj.loss(zero_model, x, generator=gen(20))
    assert out.path.mask.tolist() == [[1.0]] * 8
    v = out.path.targets[0]
    assert out.loss.item() == pytest.approx(v.pow(2).mean().item(), rel=1e-5)


def test_default_path_draws_main_stage_per_sample():
    obj = DFMObjective(LaplacianPyramid(2), stage_probs=(0.5, 0.5))
    out = obj.loss(zero_model, torch.randn(256, 1, 4, 4), generator=gen(21))
    counts = out.stage_counts.tolist()
    assert counts[0] == 256 and 80 < counts[1] < 176  # per sample, not one draw per batch


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stage_probs=(1.0,)),
        dict(stage_probs=(0.5, 0.3, 0.2)),
        dict(stage_probs=(1.1, -0.1)),
        dict(stage_probs=(0.5, 0.4)),
        dict(stage_probs=(0.6, 0.6)),
        dict(stage_probs=(float("nan"), 1.0)),
        dict(main_scale=0.0),
        dict(main_scale=-1.0),
        dict(prev_scale=0.0),
        dict(prev_scale=-0.5),
        dict(main_scale=float("nan")),
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        DFMObjective(LaplacianPyramid(2), **kwargs)


@pytest.mark.parametrize("n", [1, 3])
def test_wrong_number_of_velocities_raises(n):
    obj = DFMObjective(LaplacianPyramid(2))
    model = lambda levels, t, y, q: [torch.zeros_like(levels[0])] * n
    with pytest.raises(ValueError, match=f"{n} velocities for 2 stages"):
        obj.loss(model, torch.randn(2, 1, 8, 8))
