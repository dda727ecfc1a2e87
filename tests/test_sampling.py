"""Tests of the multi-stage samplers against an analytic velocity field (method.md section 6).

Per stage, data X1_s ~ N(mu_s, sigma_s^2) elementwise and noise X0 ~ N(0, 1). With X_t = t X1 + (1 - t) X0 the
exact (marginal) velocity is

    v_s(x, t) = mu_s + (t sigma_s^2 - (1 - t)) / (t^2 sigma_s^2 + (1 - t)^2) * (x - t mu_s)

and the exact flow maps noise eps to mu_s + sigma_s * eps at t = 1, whatever the schedule (stages are independent).
"""

from __future__ import annotations

import math

import pytest
import torch

from dfm.config import SamplerConfig
from dfm.decomposition import HaarWavelet, Identity, LaplacianPyramid
from dfm.sampling import StageSampler, initial_noise
from dfm.schedule import StageSchedule


def sample(model, dec, sched, shape, y=None, *, guidance=1.0, solver="euler", **kwargs):
    """DFM's sampler over the steps and thresholds of ``sched``."""
    scales = tuple(guidance) if isinstance(guidance, tuple) else (guidance,)
    settings = SamplerConfig(steps=sched.steps, thresholds=sched.thresholds, solver=solver, guidance=scales)
    return StageSampler(dec).sample(model, shape, y, settings=settings, **kwargs)


MU = (0.5, -0.3, 0.2)
SIGMA = (0.6, 0.25, 0.4)


class GaussianField:
    """The exact velocity of per-stage Gaussian data; records what it is called with."""

    def __init__(self, mus=MU, sigmas=SIGMA):
        self.mus, self.sigmas = mus, sigmas
        self.calls = []

    def __call__(self, levels, t, y, main_stage):
        self.calls.append((levels, t, y, main_stage))
        out = []
        for s, x in enumerate(levels):
            ts = t[:, s].view(-1, *[1] * (x.dim() - 1))
            mu, sig = self.mus[s], self.sigmas[s]
            coef = (ts * sig**2 - (1 - ts)) / (ts**2 * sig**2 + (1 - ts) ** 2)
            out.append(mu + coef * (x - ts * mu))
        return out


def exact_levels(noise):
    return [MU[s] + SIGMA[s] * eps for s, eps in enumerate(noise)]


def rms_error(levels, noise):
    return max((lv - ex).pow(2).mean().sqrt().item() for lv, ex in zip(levels, exact_levels(noise)))


SHAPE = (32, 1, 8, 8)


def run_error(dec, sched, solver):
    noise = initial_noise(dec.level_shapes(SHAPE), seeds=range(SHAPE[0]))
    out = sample(GaussianField(), dec, sched, SHAPE, noise=noise, solver=solver)
    torch.testing.assert_close(out.images, dec.recompose(out.levels))
    return rms_error(out.levels, noise)


TWO_STAGE = [(5, 2), (10, 4), (20, 8), (40, 16), (80, 32)]


@pytest.fixture(scope="module")
def errors():
    dec = LaplacianPyramid(2)
    return {
        solver: [run_error(dec, StageSchedule(steps, (0.7,)), solver) for steps in TWO_STAGE]
        for solver in ("euler", "heun")
    }


def test_euler_converges_first_order(errors):
    e = errors["euler"]
    assert all(a > b for a, b in zip(e, e[1:])), e  # (5,2) > (10,4) > (20,8) > (40,16) > (80,32)
    for a, b in zip(e[2:], e[3:]):
        assert 0.8 < math.log2(a / b) < 1.3, e
    assert e[-1] < 0.03


def test_heun_beats_euler_and_converges_second_order(errors):
    e, h = errors["euler"], errors["heun"]
    # Heun's last step is an Euler step (it ends at t = 1, where a trained network is not asked), which costs it
    # accuracy on coarse grids only: better than Euler at equal steps everywhere, by 2x from (20, 8) on, and at
    # equal model evaluations (2N - 1 against 2N) from (20, 8) on.
    assert all(hh < ee for hh, ee in zip(h, e)), (h, e)
    assert all(hh < ee / 2 for hh, ee in zip(h[2:], e[2:])), (h, e)
    assert all(hh < ee for hh, ee in zip(h[2:], e[3:])), (h, e)
    assert all(a > b for a, b in zip(h, h[1:])), h
    assert 1.6 < math.log2(h[-2] / h[-1]) < 2.4, h
    assert h[-1] < 2e-3


def test_one_stage_flow_matching():
    dec = Identity()
    e = [run_error(dec, StageSchedule.single(n), "euler") for n in (10, 20, 40)]
    h = [run_error(dec, StageSchedule.single(n), "heun") for n in (10, 20, 40)]
    assert e[0] > e[1] > e[2] and 0.8 < math.log2(e[1] / e[2]) < 1.3, e
    assert h[0] > h[1] > h[2] and 1.6 < math.log2(h[1] / h[2]) < 2.4, h
    assert all(hh < ee / 9 for hh, ee in zip(h, e)) and h[2] < e[2] / 40, (h, e)


def test_three_stage_schedule_converges():
    dec = HaarWavelet(3)
    e = [run_error(dec, StageSchedule((2 * k, k, k), (0.5, 0.8)), "heun") for k in (4, 8, 16)]
    assert e[0] > e[1] > e[2] and e[2] < 5e-3, e


def test_large_batch_matches_the_data_distribution():
    dec = LaplacianPyramid(2)
    shape = (4096, 1, 4, 4)  # 16384 coarse and 65536 fine values: 4 standard errors < 0.02
    sched = StageSchedule((30, 10), (0.7,))
    out = sample(GaussianField(), dec, StageSchedule((30, 30), (0.7,)), shape, solver="heun", generator=gen(0))
    for s, lv in enumerate(out.levels):
        assert lv.mean().item() == pytest.approx(MU[s], abs=0.02)
        assert lv.std().item() == pytest.approx(SIGMA[s], abs=0.015)
    # Heun with 30 + 10: its last step (an Euler step, as it ends at t = 1) leaves the fine level a little
    # under-dispersed, far less than Euler's 30 + 10 below
    heun_fine = sample(GaussianField(), dec, sched, shape, solver="heun", generator=gen(0)).levels[1].std().item()
    assert 0.9 * SIGMA[1] < heun_fine < SIGMA[1]
    # Euler with the paper's 30 + 10 steps: right means and coarse spread, but only 10 steps for the fine stage
    # leave it under-dispersed (the "flattened fine textures" of method.md section 6)
    out = sample(GaussianField(), dec, sched, shape, generator=gen(0))
    for s, lv in enumerate(out.levels):
        assert lv.mean().item() == pytest.approx(MU[s], abs=0.02)
    assert out.levels[0].std().item() == pytest.approx(SIGMA[0], abs=0.03)
    assert 0.7 * SIGMA[1] < out.levels[1].std().item() < heun_fine


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- classifier-free guidance ---------------------------------------------------------------------------------
A = (1.0, -2.0)
B = (0.25, 0.5)


class TwoWayModel:
    """Velocity a_s for real labels and b_s for the null class, whatever the input."""

    null_class = 10

    def __init__(self):
        self.batches = []

    def __call__(self, levels, t, y, main_stage):
        self.batches.append(y.clone())
        null = (y == self.null_class).view(-1, *[1] * (levels[0].dim() - 1))
        return [torch.where(null, B[s], A[s]).expand_as(lv).clone() for s, lv in enumerate(levels)]


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("guidance", [1.0, 1.5, 3.0, 0.0, (1.0, 2.5), (2.0, 0.5)])
def test_guided_velocity(guidance, solver):
    dec = LaplacianPyramid(2)
    model = TwoWayModel()
    shape = (3, 1, 4, 4)
    noise = initial_noise(dec.level_shapes(shape), seeds=[0, 1, 2])
    y = torch.tensor([0, 4, 9])
    out = sample(model, dec, StageSchedule((3, 2), (0.6,)), shape, y, noise=noise, guidance=guidance, solver=solver)
    w = (guidance, guidance) if isinstance(guidance, float) else guidance
    # every stage integrates a constant velocity over t: 0 -> 1, so x1 = eps + guided velocity
    for s in range(2):
        guided = B[s] + w[s] * (A[s] - B[s])
        torch.testing.assert_close(out.levels[s], noise[s] + guided, atol=1e-5, rtol=0)
    if w == (1.0, 1.0):  # no guidance: one conditional pass per evaluation
        assert all(torch.equal(yy, y) for yy in model.batches)
    else:  # conditional and unconditional halves in one batch
        assert all(torch.equal(yy, torch.cat([y, torch.full_like(y, 10)])) for yy in model.batches)


def test_guidance_null_class_argument_overrides_the_model():
    dec = Identity()
    model = lambda levels, t, y, q: [torch.where((y == 3).view(-1, 1, 1, 1), 0.0, 1.0).expand_as(levels[0])]
    shape = (2, 1, 2, 2)
    noise = initial_noise(dec.level_shapes(shape), seeds=[5, 6])
    y = torch.tensor([1, 2])
    out = sample(model, dec, StageSchedule.single(2), shape, y, noise=noise, guidance=2.0, null_class=3)
    torch.testing.assert_close(out.levels[0], noise[0] + 2.0, atol=1e-6, rtol=0)


def test_guidance_errors():
    dec = LaplacianPyramid(2)
    sched = StageSchedule((2, 2), (0.5,))
    shape = (2, 1, 4, 4)
    with pytest.raises(ValueError):  # guidance without labels
        sample(TwoWayModel(), dec, sched, shape, guidance=2.0)
    with pytest.raises(ValueError):  # no null class anywhere
        sample(GaussianField(), dec, sched, shape, torch.tensor([0, 1]), guidance=2.0)
    with pytest.raises(ValueError):  # wrong number of per-stage scales
        sample(TwoWayModel(), dec, sched, shape, torch.tensor([0, 1]), guidance=(2.0, 2.0, 2.0))
    with pytest.raises(ValueError):  # labels of the wrong shape
        sample(TwoWayModel(), dec, sched, shape, torch.tensor([0, 1, 2]))


# -- what the model is fed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_inactive_stages_are_fed_zeros_and_main_stage_is_the_schedules(solver):
    dec = LaplacianPyramid(3)
    sched = StageSchedule((3, 2, 2), (0.5, 0.8))
    field = GaussianField()
    sample(field, dec, sched, (2, 1, 8, 8), solver=solver, generator=gen(1))
    per_step = 2 if solver == "heun" else 1
    # Heun's last step ends on the data (t = 1), where training never goes: it is an Euler step, so the network is
    # never asked for a velocity at t = 1.
    assert len(field.calls) == per_step * sched.num_steps - (per_step - 1)
    assert all((t < 1).all() for _, t, _, _ in field.calls)
    for i, (levels, t, y, main_stage) in enumerate(field.calls):
        n, second = divmod(i, per_step)
        generated = sched.main_stage[n].item()
        assert y is None
        assert main_stage.shape == (2,) and (main_stage == generated).all()
        assert t.shape == (2, 3)
        row = sched.grid[n + second].float()
        torch.testing.assert_close(t, row.expand(2, 3))
        for s, lv in enumerate(levels):
            if s > generated:
                assert (lv == 0).all() and (t[:, s] == 0).all()
            else:
                assert lv.abs().sum() > 0


def test_noise_argument():
    dec = LaplacianPyramid(2)
    sched = StageSchedule((4, 3), (0.7,))
    shape = (2, 1, 8, 8)
    noise = initial_noise(dec.level_shapes(shape), seeds=[1, 2])
    out = sample(GaussianField(), dec, sched, shape, noise=noise)
    assert out.images.shape == shape
    torch.testing.assert_close(out.images, sample(GaussianField(), dec, sched, shape, seeds=[1, 2]).images)
    assert not torch.equal(out.images, sample(GaussianField(), dec, sched, shape, seeds=[2, 1]).images)


def test_preview_callback():
    dec = LaplacianPyramid(3)
    sched = StageSchedule((3, 2, 2), (0.5, 0.8))
    shape = (2, 3, 16, 16)
    got = []
    out = sample(GaussianField(), dec, sched, shape, callback=lambda k, p: got.append((k, p)), generator=gen(2))
    assert [k for k, _ in got] == [0, 1, 2]
    assert [tuple(p.shape) for _, p in got] == dec.level_shapes(shape)
    assert len(out.previews) == 3
    assert all(p is q for (_, p), q in zip(got, out.previews))
    torch.testing.assert_close(out.previews[-1], out.images)


def test_preview_is_the_denoised_estimate():
    # with a constant velocity c_s, x_t = eps + t c, and the denoised estimate x + (1 - t) c = eps + c at any t
    dec = LaplacianPyramid(2)
    c = (0.7, -1.3)
    model = lambda levels, t, y, q: [torch.full_like(lv, c[s]) for s, lv in enumerate(levels)]
    shape = (2, 1, 8, 8)
    noise = initial_noise(dec.level_shapes(shape), seeds=[3, 4])
    out = sample(model, dec, StageSchedule((5, 3), (0.6,)), shape, noise=noise)
    torch.testing.assert_close(out.previews[0], noise[0] + c[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.previews[1], dec.recompose([noise[0] + c[0], noise[1] + c[1]]), atol=1e-5, rtol=0)


# -- seeds ----------------------------------------------------------------------------------------------------
def test_per_sample_seeds_are_batch_independent():
    dec = LaplacianPyramid(2)
    sched = StageSchedule((4, 2), (0.7,))
    run = lambda seeds: sample(GaussianField(), dec, sched, (len(seeds), 2, 8, 8), seeds=seeds).images
    both, rev = run([3, 7]), run([7, 3])
    alone3, alone7 = run([3]), run([7])
    torch.testing.assert_close(both[0], alone3[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(both[1], alone7[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(rev[0], both[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(rev[1], both[0], atol=1e-6, rtol=0)
    assert not torch.allclose(both[0], both[1])
    # the noise itself is exactly batch independent
    shapes = dec.level_shapes((2, 2, 8, 8))
    n_both = initial_noise(shapes, seeds=[3, 7])
    n_alone = initial_noise([(1,) + s[1:] for s in shapes], seeds=[7])
    assert all(torch.equal(a[1], b[0]) for a, b in zip(n_both, n_alone))


def test_generator_reproducibility():
    dec = LaplacianPyramid(2)
    sched = StageSchedule((3, 2), (0.7,))
    a = sample(GaussianField(), dec, sched, (2, 1, 8, 8), generator=gen(5)).images
    b = sample(GaussianField(), dec, sched, (2, 1, 8, 8), generator=gen(5)).images
    c = sample(GaussianField(), dec, sched, (2, 1, 8, 8), generator=gen(6)).images
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_video_sampling():
    dec = LaplacianPyramid(2, temporal_factors=2)
    shape = (2, 1, 4, 8, 8)
    noise = initial_noise(dec.level_shapes(shape), seeds=[0, 1])
    out = sample(GaussianField(), dec, StageSchedule((20, 10), (0.7,)), shape, noise=noise, solver="heun")
    assert out.images.shape == shape
    assert rms_error(out.levels, noise) < 0.02


# -- errors ---------------------------------------------------------------------------------------------------
def test_sampling_errors():
    dec = LaplacianPyramid(2)
    shape = (2, 1, 8, 8)
    sched = StageSchedule((2, 2), (0.5,))
    with pytest.raises(ValueError, match="solver"):
        sample(GaussianField(), dec, sched, shape, solver="rk4")
    with pytest.raises(ValueError, match="stage"):
        sample(GaussianField(), dec, StageSchedule.single(4), shape)
    with pytest.raises(ValueError, match="stage"):
        sample(GaussianField(), LaplacianPyramid(3), sched, shape)
    with pytest.raises(ValueError, match="seed"):
        sample(GaussianField(), dec, sched, shape, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        initial_noise(dec.level_shapes(shape), seeds=[1])
    with pytest.raises(ValueError, match="noise shapes"):
        sample(GaussianField(), dec, sched, shape, noise=[torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)])
    with pytest.raises(ValueError):
        sample(GaussianField(), dec, sched, (2, 1, 9, 8))


def test_a_dit_gives_each_seed_its_image_bitwise_in_the_same_batch_and_to_rounding_in_any_other():
    """The guarantee as documented in dfm.generate: bitwise for the same batch composition, rounding otherwise."""
    from dfm.models import DFMDiT, DiTConfig

    torch.manual_seed(0)
    model = DFMDiT(DiTConfig(input_size=(8, 8), in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                             num_classes=4))  # fmt: skip
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    dec, sched = LaplacianPyramid(2), StageSchedule((3, 2), (0.7,))
    seeds = list(range(16))
    y = torch.tensor(seeds) % 4
    run = lambda s, lab: sample(model, dec, sched, (len(s), 1, 8, 8), lab, seeds=s, guidance=1.5).images  # noqa: E731
    batch = run(seeds, y)
    assert torch.equal(batch, run(seeds, y))  # same composition: bitwise
    alone = torch.cat([run([s], y[i : i + 1]) for i, s in enumerate(seeds)])
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=0)  # another batch shape: float rounding only
