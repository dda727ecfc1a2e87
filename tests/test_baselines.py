"""Tests of the cascaded and Pyramidal Flow baselines (dfm.baselines, method.md section 7)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dfm.baselines import (
    CascadeModel,
    CascadeObjective,
    CascadeSampler,
    CascadeSwitch,
    ConditionedDiT,
    GaussianPyramid,
    PyramidalDataPrediction,
    PyramidalObjective,
    PyramidalPath,
    PyramidalSampler,
    block_noise,
    init_stage2_from_stage1,
)
from dfm.config import SamplerConfig
from dfm.decomposition import LaplacianPyramid
from dfm.models import DFMDiT, DiTConfig
from dfm.sampling import initial_noise
from dfm.schedule import shift_time

TINY = dict(in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the exact-zero initialisation (adaLN-Zero, zero heads) by small noise so that signals flow."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_cascade(**overrides: object) -> CascadeModel:
    cfg = DiTConfig(**{**TINY, "input_size": (8, 8), "patch_size": 2, "stage_factors": (1,), **overrides})
    return CascadeModel.from_config(cfg)


# ============================================================================================== cascade
def test_cascade_model_has_same_backbone_and_token_count() -> None:
    model = tiny_cascade()
    c1, c2 = model.stage1.config, model.stage2.config
    assert (c1.input_size, c1.patch_size, c2.input_size, c2.patch_size) == ((4, 4), 1, (8, 8), 2)
    assert c1.num_tokens == c2.num_tokens == 16
    assert (c1.hidden_size, c1.depth, c1.num_heads) == (c2.hidden_size, c2.depth, c2.num_heads)
    x_low, x = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 8, 8)
    t, y = torch.rand(3), torch.tensor([0, 1, 4])
    assert model(x_low, t, y, 0).shape == x_low.shape
    assert model(x, t, y, 1, torch.randn(3, 1, 8, 8), torch.rand(3)).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        CascadeModel.from_config(DiTConfig(**{**TINY, "input_size": (8, 8), "patch_size": 1, "stage_factors": (1,)}))
    with pytest.raises(ValueError, match="conditioning"):
        model(x, t, y, 1)


@pytest.mark.parametrize("pos", ["rope", "sincos"])
def test_stage2_sees_every_input(pos: str) -> None:
    model = perturbed(
        ConditionedDiT(DiTConfig(**{**TINY, "input_size": (8, 8), "patch_size": 2, "stage_factors": (1,), "pos": pos}))
    )
    g = gen(1)
    x, cond = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, cond_t, y = torch.rand(2, generator=g), torch.rand(2, generator=g), torch.tensor([1, 2])
    base = model(x, t, y, cond, cond_t)
    for changed in (
        model(x, t, y, cond + torch.randn(2, 1, 8, 8, generator=g), cond_t),  # the conditioning image
        model(x, t, y, cond, cond_t * 0.5),  # its noise level
        model(x + 0.1, t, y, cond, cond_t),
        model(x, t * 0.5, y, cond, cond_t),
        model(x, t, torch.tensor([3, 0]), cond, cond_t),
    ):
        assert (changed - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample reacts
    # A conditioning change in one sample leaves the other alone (no leak across the batch).
    cond2 = cond.clone()
    cond2[0] += 1.0
    out = model(x, t, y, cond2, cond_t)
    torch.testing.assert_close(out[1], base[1])
    assert (out[0] - base[0]).abs().max() > 1e-4


def test_stage2_attends_over_2n_tokens_and_only_generated_tokens_reach_the_head() -> None:
    model = perturbed(
        ConditionedDiT(DiTConfig(**{**TINY, "input_size": (8, 8), "patch_size": 2, "stage_factors": (1,)}))
    )
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str, of_input: bool):
        def hook(module, inputs, output) -> None:  # returns None: a hook must not replace the output
            seen[name] = tuple((inputs[0] if of_input else output).shape)

        return hook

    model.blocks[0].register_forward_hook(record("block", False))
    model.final_layers[0].register_forward_hook(record("head_in", True))
    x = torch.randn(2, 1, 8, 8)
    model(x, torch.rand(2), None, torch.randn(2, 1, 8, 8), torch.rand(2))
    n, d = model.config.num_tokens, model.config.hidden_size
    assert seen == {"block": (2, 2 * n, d), "head_in": (2, n, d)}


def test_init_stage2_from_stage1_copies_and_lifts() -> None:
    model = tiny_cascade()
    perturbed(model.stage1, seed=3)
    untouched = init_stage2_from_stage1(model.stage2, model.stage1)
    assert untouched == []
    s1, s2 = model.stage1.state_dict(), model.stage2.state_dict()
    for key in s1:
        if s1[key].shape == s2[key].shape:
            torch.testing.assert_close(s2[key], s1[key])
    # Lifted patch embedding: stage 2 embeds a nearest-upsampled image exactly like stage 1 embeds the small one.
    low = torch.randn(2, 1, 4, 4)
    up = low.repeat_interleave(2, -1).repeat_interleave(2, -2)
    from dfm.models.layers import patchify

    emb1 = model.stage1.x_embedders[0](patchify(low, 1))
    torch.testing.assert_close(model.stage2.x_embedders[0](patchify(up, 2)), emb1)
    torch.testing.assert_close(model.stage2.cond_embedder(patchify(up, 2)), emb1)
    # Lifted head: every fine pixel of a block predicts what its coarse pixel did.
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    from dfm.models.layers import unpatchify

    out1 = unpatchify(model.stage1.final_layers[0](tokens, c), (4, 4), 1, 1)
    out2 = unpatchify(model.stage2.final_layers[0](tokens, c), (8, 8), 1, 2)
    torch.testing.assert_close(out2, out1.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_cascade_objective_trains_one_stage_per_phase() -> None:
    model = perturbed(tiny_cascade()).train()
    objective = CascadeObjective(switch_step=4)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    shapes = LaplacianPyramid(2).level_shapes(x.shape)
    for step, stage in ((3, 0), (4, 1)):
        draw = objective.draw(shapes, generator=gen(step), step=step)
        assert draw.main_stage.tolist() == [stage] * 6
        assert [tuple(n.shape) for n in draw.noise] == ([(6, 1, 4, 4)] if stage == 0 else [(6, 1, 8, 8), (6, 1, 4, 4)])
        sub = draw[2:5]
        assert sub.t.shape == (3, 2) and all(n.shape[0] == 3 for n in sub.noise)
        model.zero_grad(set_to_none=True)
        out = objective.loss(model, x[2:5], y[2:5], draw=sub)
        assert out.stage_counts.tolist() == ([3.0, 0.0] if stage == 0 else [0.0, 3.0])
        assert out.stage_losses[stage] == pytest.approx(out.loss.detach().item())
        out.loss.backward()
        trained, frozen = (model.stage1, model.stage2) if stage == 0 else (model.stage2, model.stage1)
        assert all(p.grad is None for p in frozen.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    # The draw is a function of the step and the generator only.
    a = objective.draw(shapes, generator=gen(9), step=7)
    b = objective.draw(shapes, generator=gen(9), step=7)
    torch.testing.assert_close(a.t, b.t)
    assert CascadeObjective.from_total_steps(1000).switch_step == 800


def test_cascade_conditioning_noise_statistics() -> None:
    n = 40_000
    objective = CascadeObjective(switch_step=0)
    x = torch.randn(1, 1, 4, 4).expand(n, 1, 4, 4)
    draw = objective.draw([(n, 1, 2, 2), (n, 1, 4, 4)], generator=gen(5), step=0)
    path = objective.sample_path(x, draw)
    logit_c = torch.logit(path.cond_t.double())
    assert logit_c.mean().item() == pytest.approx(1.5, abs=4 / math.sqrt(n))
    assert logit_c.std().item() == pytest.approx(1.0, rel=0.02)
    logit_t = torch.logit(path.t.double())
    assert logit_t.mean().item() == pytest.approx(0.0, abs=4 / math.sqrt(n))
    # cond = t_c · low + (1 - t_c) · ε with ε ~ N(0, I) independent of t_c, at low resolution.
    low = objective.down(x)
    shape = (-1, 1, 1, 1)
    eps = (path.cond - path.cond_t.view(shape) * low) / (1 - path.cond_t.view(shape))
    assert eps.mean().item() == pytest.approx(0.0, abs=0.01)
    assert eps.var().item() == pytest.approx(1.0, rel=0.02)
    assert abs(torch.corrcoef(torch.stack([eps[:, 0, 0, 0], path.cond_t]))[0, 1].item()) < 0.02
    # The residual noise of the conditioning image has std (1 - t_c) given t_c: median 1 - sigmoid(1.5) ≈ 0.18.
    resid = (path.cond - path.cond_t.view(shape) * low).flatten(1).std(1)
    assert resid.median().item() == pytest.approx(1 - torch.sigmoid(torch.tensor(1.5)).item(), rel=0.2)


def test_the_switch_callback_initialises_stage2_once_in_model_and_ema() -> None:
    model = tiny_cascade()
    perturbed(model.stage1, seed=4)
    ema = copy.deepcopy(model)
    perturbed(ema.stage1, seed=5)  # an EMA that differs from the model
    switch = CascadeSwitch(switch_step=10)
    before = copy.deepcopy(model.stage2.state_dict())
    switch.on_step_begin(9, model, ema)
    assert not bool(model.stage2_initialised)
    torch.testing.assert_close(model.stage2.state_dict(), before)
    switch.on_step_begin(10, model, ema)
    assert bool(model.stage2_initialised) and bool(ema.stage2_initialised)
    torch.testing.assert_close(model.stage2.blocks[0].attn.qkv.weight, model.stage1.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(ema.stage2.state_dict(), model.stage2.state_dict())
    with torch.no_grad():
        model.stage2.blocks[0].attn.qkv.weight.add_(1.0)  # fine-tuning moves it; later steps must not reset it
    switch.on_step_begin(11, model, ema)
    assert not torch.equal(model.stage2.blocks[0].attn.qkv.weight, model.stage1.blocks[0].attn.qkv.weight)
    # The flag travels with the weights (checkpoints, resume).
    fresh = tiny_cascade()
    fresh.load_state_dict(model.state_dict())
    assert bool(fresh.stage2_initialised)


def sample_cascade(model, shape, y=None, *, steps, guidance=1.0, solver="euler", cond_noise=0.025, shift=1.0,
                   **kwargs):  # fmt: skip
    """The cascade's sampler with ``steps`` per stage (factor and filter of ``model``)."""
    settings = SamplerConfig(steps=tuple(steps), thresholds=(), solver=solver, guidance=(guidance,), shift=shift)
    sampler = CascadeSampler(getattr(model, "factor", 2), getattr(model, "mode", "bilinear"), cond_noise)
    return sampler.sample(model, shape, y, settings=settings, **kwargs)


def sample_pyramidal(model, path, shape, y=None, *, steps, guidance=1.0, solver="euler", shift=1.0, **kwargs):
    # thresholds do not apply to Pyramidal Flow (nor to the cascade): its sampler neither needs nor checks them
    settings = SamplerConfig(steps=tuple(steps), thresholds=(), solver=solver, guidance=(guidance,), shift=shift)
    return PyramidalSampler(path).sample(model, shape, y, settings=settings, **kwargs)


def test_sample_cascade_shapes_seeds_and_guidance() -> None:
    model = perturbed(tiny_cascade())
    y = torch.tensor([0, 1, 2])
    out = sample_cascade(model, (3, 1, 8, 8), y, steps=(3, 2), seeds=[5, 6, 7], guidance=1.5)
    assert out.images.shape == (3, 1, 8, 8)
    assert [tuple(p.shape) for p in out.previews] == [(3, 1, 4, 4), (3, 1, 8, 8)]
    alone = sample_cascade(model, (1, 1, 8, 8), y[1:2], steps=(3, 2), seeds=[6], guidance=1.5)
    torch.testing.assert_close(alone.images[0], out.images[1], atol=1e-5, rtol=1e-5)
    heun = sample_cascade(model, (1, 1, 8, 8), y[:1], steps=(2, 2), seeds=[0], solver="heun")
    assert torch.isfinite(heun.images).all()
    with pytest.raises(ValueError, match="guidance"):
        sample_cascade(model, (1, 1, 8, 8), None, steps=(2, 2), seeds=[0], guidance=2.0)


def test_sample_cascade_lands_on_a_point_mass_and_conditions_on_the_noised_stage1_result() -> None:
    """With the exact velocity of a point mass (x* - x) / (1 - t), Euler lands on it in each stage."""
    g = gen(2)
    target = torch.randn(1, 1, 8, 8, generator=g)
    target_low = torch.randn(1, 1, 4, 4, generator=g)
    seen: dict[str, torch.Tensor] = {}

    class Oracle(torch.nn.Module):
        factor, mode, null_class = 2, "bilinear", 4

        def forward(self, x, t, y, stage, cond=None, cond_t=None):
            if stage == 1:
                seen["cond"], seen["cond_t"] = cond, cond_t
            goal = target_low if stage == 0 else target
            return (goal - x) / (1 - t.view(-1, 1, 1, 1))

    out = sample_cascade(Oracle(), (2, 1, 8, 8), steps=(5, 4), seeds=[1, 2])
    torch.testing.assert_close(out.previews[0], target_low.expand(2, 1, 4, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.images, target.expand(2, 1, 8, 8), atol=1e-5, rtol=1e-5)
    eps_cond = initial_noise([(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 4, 4)], [1, 2])[2]
    expected = torch.nn.functional.interpolate(0.975 * target_low + 0.025 * eps_cond, size=(8, 8), mode="bilinear")
    torch.testing.assert_close(seen["cond"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["cond_t"], torch.full((2,), 0.975))


def test_cascade_sampler_takes_the_time_shift_on_each_stage_grid() -> None:
    """sampler.shift warps each stage's own grid as it warps Flow Matching's; the exact velocity still lands."""
    g = gen(3)
    target, target_low = torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 4, 4, generator=g)
    times: dict[int, list[float]] = {0: [], 1: []}

    class Oracle(torch.nn.Module):
        factor, mode, null_class = 2, "bilinear", 4

        def forward(self, x, t, y, stage, cond=None, cond_t=None):
            times[stage].append(float(t[0]))
            return ((target_low if stage == 0 else target) - x) / (1 - t.view(-1, 1, 1, 1))

    out = sample_cascade(Oracle(), (2, 1, 8, 8), steps=(3, 2), seeds=[1, 2], shift=0.3)
    assert times[0] == pytest.approx([shift_time(i / 3, 0.3) for i in range(3)])
    assert times[1] == pytest.approx([shift_time(i / 2, 0.3) for i in range(2)])
    assert times[0][1] > 1 / 3 + 0.2  # really moved towards the data
    torch.testing.assert_close(out.images, target.expand(2, 1, 8, 8), atol=1e-5, rtol=1e-5)
    times = {0: [], 1: []}
    sample_cascade(Oracle(), (1, 1, 8, 8), steps=(3, 2), seeds=[1])  # no shift: uniform
    assert times[0] == pytest.approx([0, 1 / 3, 2 / 3]) and times[1] == pytest.approx([0, 0.5])
    times = {0: [], 1: []}
    settings = SamplerConfig(steps=(3, 2), thresholds=(0.5,), shift=0.3, shift_from=-1)  # the full-resolution stage
    CascadeSampler().sample(Oracle(), (1, 1, 8, 8), settings=settings, seeds=[1])
    assert times[0] == pytest.approx([0, 1 / 3, 2 / 3]) and times[1] == pytest.approx([0, shift_time(0.5, 0.3)])


def test_cascade_save_and_load(tmp_path) -> None:
    model = perturbed(tiny_cascade())
    model.stage2_initialised.fill_(True)
    model.save_pretrained(tmp_path / "cascade")
    loaded = CascadeModel.from_pretrained(tmp_path / "cascade")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    x, t = torch.randn(1, 1, 8, 8), torch.rand(1)
    torch.testing.assert_close(loaded(x, t, None, 1, x, t), model(x, t, None, 1, x, t))


# ============================================================================================== pyramidal
def test_gaussian_pyramid_levels_are_block_means_and_recompose_exactly() -> None:
    pyr = GaussianPyramid(3)
    x = torch.randn(2, 3, 16, 16)
    levels = pyr.decompose(x)
    assert [tuple(lv.shape[2:]) for lv in levels] == [(4, 4), (8, 8), (16, 16)]
    torch.testing.assert_close(levels[1], torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(levels[0], torch.nn.functional.avg_pool2d(levels[1], 2))
    assert torch.equal(pyr.recompose(levels), x)
    torch.testing.assert_close(pyr.up(levels[0], 1), levels[0].repeat_interleave(2, -1).repeat_interleave(2, -2))
    video = torch.randn(1, 2, 3, 8, 8)
    assert [tuple(lv.shape) for lv in GaussianPyramid(2).decompose(video)] == [(1, 2, 3, 4, 4), (1, 2, 3, 8, 8)]


@pytest.mark.parametrize("stages, windows", [(2, None), (3, None), (3, (0.2, 0.7))])
def test_time_windows_partition_the_unit_interval(stages: int, windows) -> None:
    path = PyramidalPath(GaussianPyramid(stages), windows)
    spans = [path.window(k) for k in range(stages)]
    assert spans[0][0] == 0.0 and spans[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    assert sum(hi - lo for lo, hi in spans) == pytest.approx(1.0)
    objective = PyramidalObjective(path)
    draw = objective.draw(path.decomposition.level_shapes((3000, 1, 16, 16)), generator=gen(1))
    lo = torch.tensor([spans[k][0] for k in draw.main_stage.tolist()])
    hi = torch.tensor([spans[k][1] for k in draw.main_stage.tolist()])
    assert ((draw.t >= lo) & (draw.t <= hi)).all()
    for bad in ((0.5, 0.4), (0.0, 0.5), (0.5,)):
        with pytest.raises(ValueError):
            PyramidalPath(GaussianPyramid(3), bad)


def test_jump_coefficients_follow_the_papers_renoising_equation() -> None:
    """γ = 1/3: s = e / (2 - e), s/e = (1 + s)/2, α = sqrt(3)(1 - s)/2; γ = 1/(f² - 1) by default."""
    path = PyramidalPath(GaussianPyramid(3), (0.3, 0.6))
    for k in (1, 2):
        e, s = path.end_coef(k - 1), path.start_coef(k)
        scale, alpha = path.jump_coefs(k)
        assert s == pytest.approx(e / (2 - e))
        assert e == pytest.approx(2 * s / (1 + s))
        assert scale == pytest.approx((1 + s) / 2)
        assert alpha == pytest.approx(math.sqrt(3) * (1 - s) / 2)
        assert s < e  # the jump adds noise
    assert path.start_coef(0) == 0.0 and path.end_coef(2) == 1.0
    assert PyramidalPath(GaussianPyramid(2)).gammas == pytest.approx((1 / 3,))
    assert PyramidalPath(GaussianPyramid(2, factors=4)).gammas == pytest.approx((1 / 15,))
    with pytest.raises(ValueError, match="gamma"):
        PyramidalPath(GaussianPyramid(2), gammas=0.5)


def test_block_noise_has_the_block_covariance() -> None:
    z = torch.randn(100_000, 1, 2, 2, generator=gen(3))
    for gamma in (1 / 3, 0.1):
        noise = block_noise(z, 2, gamma).flatten(1).double()
        cov = noise.T @ noise / noise.shape[0]
        expected = (1 + gamma) * torch.eye(4, dtype=torch.float64) - gamma
        torch.testing.assert_close(cov, expected, atol=0.02, rtol=0)
    # γ = 1/3 leaves every block mean untouched: the coarse content survives the jump.
    assert block_noise(z, 2, 1 / 3).mean(dim=(2, 3)).abs().max() < 1e-5


def test_pyramidal_shares_fix_each_stages_count_in_every_batch() -> None:
    path = PyramidalPath(GaussianPyramid(3))
    objective = PyramidalObjective(path, shares=(0.2, 0.3, 0.5))
    shapes = path.decomposition.level_shapes((10, 1, 16, 16))
    orders = set()
    for seed in range(20):
        draw = objective.draw(shapes, generator=gen(seed))
        assert torch.bincount(draw.main_stage, minlength=3).tolist() == [2, 3, 5]
        orders.add(tuple(draw.main_stage.tolist()))
    assert len(orders) > 10  # a random order in every batch, not one fixed pattern
    zero = lambda levels, *a: [torch.zeros_like(lv) for lv in levels]  # noqa: E731
    out = objective.loss(zero, torch.randn(10, 1, 16, 16), generator=gen(0))
    assert out.stage_counts.tolist() == [2.0, 3.0, 5.0]
    # Equal shares without the option: the paper's interleaving, unchanged
    equal = PyramidalObjective(path).draw(shapes, generator=gen(0)).main_stage
    assert sorted(torch.bincount(equal, minlength=3).tolist()) == [3, 3, 4]


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.2, 0.2, 0.5), (0.0, 0.5, 0.5), (-0.1, 0.6, 0.5)])
def test_pyramidal_shares_are_checked(shares) -> None:
    with pytest.raises(ValueError, match="positive shares of the batch"):
        PyramidalObjective(PyramidalPath(GaussianPyramid(3)), shares=shares)


def _stage_draw(objective: PyramidalObjective, shapes, stage: int, tau: float, seed: int = 0):
    draw = objective.draw(shapes, generator=gen(seed))
    b = draw.t.shape[0]
    draw.main_stage = torch.full((b,), stage)
    draw.t = objective.path.global_time(torch.full((b,), tau, dtype=torch.float64), stage).float()
    return draw


def test_path_endpoints_are_what_the_equations_say() -> None:
    path = PyramidalPath(GaussianPyramid(2))
    objective = PyramidalObjective(path)
    x = torch.randn(4, 1, 8, 8, generator=gen(0))
    levels = path.decomposition.decompose(x)
    shapes = [tuple(lv.shape) for lv in levels]
    # Stage 0 starts from pure noise and ends at e_0 X_0 + (1 - e_0) n.
    d = _stage_draw(objective, shapes, 0, 0.0)
    torch.testing.assert_close(objective.sample_path(levels, d).levels_t[0], d.noise[0])
    d = _stage_draw(objective, shapes, 0, 1.0)
    torch.testing.assert_close(objective.sample_path(levels, d).levels_t[0], 0.5 * levels[0] + 0.5 * d.noise[0])
    # Stage 1 starts at s_1 Up(X_0) + (1 - s_1) n, the noise shared with its end, which at t = 1 is the data.
    d = _stage_draw(objective, shapes, 1, 0.0)
    s = path.start_coef(1)
    expected = s * path.decomposition.up(levels[0], 1) + (1 - s) * d.noise[1]
    p = objective.sample_path(levels, d)
    torch.testing.assert_close(p.levels_t[1], expected)
    assert torch.equal(p.levels_t[0], torch.zeros_like(levels[0]))  # only the current stage's input is non-zero
    assert p.t[:, 0].eq(0).all() and p.t[:, 1].eq(0.5).all()
    d = _stage_draw(objective, shapes, 1, 1.0)
    p = objective.sample_path(levels, d)
    torch.testing.assert_close(p.levels_t[1], x)
    # The target is the constant velocity of the straight line in τ.
    torch.testing.assert_close(p.targets[1], x - expected)


def test_window_start_equals_the_renoised_coarser_end_in_distribution() -> None:
    """First two moments of the training start point S_1 and of renoise(E_0) agree (both Gaussian)."""
    n = 60_000
    path = PyramidalPath(GaussianPyramid(2))
    x = torch.randn(1, 1, 4, 4, generator=gen(7))
    levels = [lv.expand(n, *lv.shape[1:]) for lv in path.decomposition.decompose(x)]
    g = gen(8)
    _, end0 = path.endpoints(levels, 0, torch.randn(n, 1, 2, 2, generator=g))
    jumped = path.renoise(end0, 1, torch.randn(n, 1, 4, 4, generator=g))
    start1, _ = path.endpoints(levels, 1, torch.randn(n, 1, 4, 4, generator=g))
    s = path.start_coef(1)
    mean = s * path.decomposition.up(levels[0][:1], 1)
    cov = (1 - s) ** 2 * torch.eye(16, dtype=torch.float64)
    for sample in (jumped, start1):
        torch.testing.assert_close(sample.mean(0, keepdim=True), mean, atol=0.01, rtol=0)
        centred = (sample - mean).flatten(1).double()
        torch.testing.assert_close(centred.T @ centred / n, cov, atol=0.01, rtol=0)
    # Without the correction (plain upsampling, no renoising) the noise would be correlated inside blocks.
    plain = path.decomposition.up(end0, 1).flatten(1).double()
    plain = plain - plain.mean(0)
    assert (plain.T @ plain / n)[0, 1] > 0.2


@pytest.mark.parametrize("stages", [2, 3])
def test_equal_batch_share_per_stage(stages: int) -> None:
    path = PyramidalPath(GaussianPyramid(stages))
    objective = PyramidalObjective(path)
    draw = objective.draw(path.decomposition.level_shapes((10_000, 1, 8, 8)), generator=gen(2))
    counts = torch.bincount(draw.main_stage, minlength=stages)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10_000
    # Every rank's slice is balanced too.
    for lo in range(0, 10_000, 64):
        sub = torch.bincount(draw[lo : lo + 64].main_stage, minlength=stages)
        assert sub.max() - sub.min() <= 1


def point_mass_oracle(path: PyramidalPath, target: torch.Tensor):
    """The exact velocity field of Pyramidal Flow when the data is the single image ``target``."""
    levels = path.decomposition.decompose(target)

    def model(levels_t, t, y, main_stage):
        out = []
        for k, x in enumerate(levels_t):
            e, s = path.end_coef(k), path.start_coef(k)
            tau = path.local_time(t[:, k].double(), k).view(-1, 1, 1, 1).float()
            up = path.decomposition.up(levels[k - 1], k) if k > 0 else torch.zeros_like(levels[k])
            signal = tau * e * levels[k] + (1 - tau) * s * up
            a = tau * e + (1 - tau) * s
            noise = (x - signal) / (1 - a).clamp(min=1e-6)  # recover n from x_τ
            out.append(e * levels[k] - s * up + (s - e) * noise)
        return out

    return model


def test_loss_of_the_exact_velocity_is_zero() -> None:
    path = PyramidalPath(GaussianPyramid(3))
    target = torch.randn(1, 1, 16, 16, generator=gen(4))
    out = PyramidalObjective(path).loss(point_mass_oracle(path, target), target.expand(9, 1, 16, 16), generator=gen(5))
    assert out.loss.item() < 1e-8 and out.stage_counts.tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("stages, windows", [(2, None), (3, (0.3, 0.8))])
def test_sampling_with_the_exact_velocity_lands_on_a_point_mass(stages: int, windows) -> None:
    path = PyramidalPath(GaussianPyramid(stages), windows)
    target = torch.randn(1, 1, 16, 16, generator=gen(6))
    out = sample_pyramidal(point_mass_oracle(path, target), path, (3, 1, 16, 16), steps=(4,) * stages, seeds=[0, 1, 2])
    torch.testing.assert_close(out.images, target.expand(3, 1, 16, 16), atol=1e-4, rtol=1e-4)
    levels = path.decomposition.decompose(target)
    # The first stage's preview is exact (its path has no coarse term), and so is the last one.
    torch.testing.assert_close(out.previews[0], levels[0].expand_as(out.previews[0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.previews[-1], out.images)
    # Each stage ends at its end point e_k X_k + (1 - e_k) n for some n: different seeds, different noise.
    assert [tuple(e.shape[2:]) for e in out.levels] == [tuple(lv.shape[2:]) for lv in levels]
    assert not torch.allclose(out.levels[0][0], out.levels[0][1])


def test_pyramidal_sampler_takes_the_time_shift_in_each_window() -> None:
    """sampler.shift warps each window's local time (steps move towards the window's end); the exact velocity
    still lands on the point mass."""
    path = PyramidalPath(GaussianPyramid(2))
    target = torch.randn(1, 1, 16, 16, generator=gen(7))
    oracle, seen = point_mass_oracle(path, target), []

    def model(levels_t, t, y, main_stage):
        seen.append((int(main_stage[0]), float(t[0, int(main_stage[0])])))
        return oracle(levels_t, t, y, main_stage)

    out = sample_pyramidal(model, path, (2, 1, 16, 16), steps=(3, 2), seeds=[0, 1], shift=0.5)
    expected = []
    for k, n in enumerate((3, 2)):
        lo, hi = path.window(k)
        expected += [(k, pytest.approx(lo + (hi - lo) * shift_time(i / n, 0.5))) for i in range(n)]
    assert seen == expected
    torch.testing.assert_close(out.images, target.expand(2, 1, 16, 16), atol=1e-4, rtol=1e-4)


def clean_level_oracle(path: PyramidalPath, target: torch.Tensor, std):
    """A network that predicts the clean level of its stage divided by σ_k, whatever its input (data = ``target``)."""
    levels = path.decomposition.decompose(target)
    return lambda inputs, t, y, main_stage: [(lv / sd).expand_as(x) for lv, sd, x in zip(levels, std, inputs)]


def test_pyramidal_data_prediction_of_the_clean_level_is_the_exact_velocity() -> None:
    path, std = PyramidalPath(GaussianPyramid(3), (0.3, 0.7)), (0.5, 0.7, 0.9)
    target = torch.randn(1, 1, 16, 16, generator=gen(4))
    model = PyramidalDataPrediction(clean_level_oracle(path, target, std), path, std)
    objective = PyramidalObjective(path, prediction="data")
    out = objective.loss(model, target.expand(12, 1, 16, 16), generator=gen(5))
    assert out.loss.item() < 1e-9 and out.stage_counts.tolist() == [4.0, 4.0, 4.0]
    # the same velocities as the exact field of the point mass, at every stage and local time
    for k in range(3):
        for tau in (0.0, 0.3, 0.9, 0.99):
            draw = _stage_draw(objective, path.decomposition.level_shapes((2, 1, 16, 16)), k, tau, seed=k)
            sample = objective.sample_path(path.decomposition.decompose(target.expand(2, 1, 16, 16)), draw)
            mine = model(sample.levels_t, sample.t, None, sample.main_stage)[k]
            exact = point_mass_oracle(path, target)(sample.levels_t, sample.t, None, sample.main_stage)[k]
            torch.testing.assert_close(mine, exact, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(mine, sample.targets[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_pyramidal_data_prediction_samples_land_on_the_predicted_image(solver: str) -> None:
    path, std = PyramidalPath(GaussianPyramid(2)), (0.6, 0.8)
    target = torch.randn(1, 1, 16, 16, generator=gen(6))
    model = PyramidalDataPrediction(clean_level_oracle(path, target, std), path, std)
    out = sample_pyramidal(model, path, (3, 1, 16, 16), steps=(3, 3), seeds=[0, 1, 2], solver=solver)
    torch.testing.assert_close(out.images, target.expand(3, 1, 16, 16), atol=1e-5, rtol=1e-5)


def test_pyramidal_data_prediction_weights_only_the_end_of_the_last_stage() -> None:
    """Predicting zero: the velocity error grows as 1 / (1 - a); the clamp divides it by (1 - a)² at most 1 / 0.05²."""
    path, std = PyramidalPath(GaussianPyramid(2)), (1.0, 1.0)
    zero = PyramidalDataPrediction(lambda inputs, *a: [torch.zeros_like(x) for x in inputs], path, std)
    x = torch.randn(2, 1, 8, 8, generator=gen(1))
    shapes = path.decomposition.level_shapes(x.shape)

    def loss(prediction: str, stage: int, tau: float) -> float:
        objective = PyramidalObjective(path, prediction=prediction)
        return objective.loss(zero, x, draw=_stage_draw(objective, shapes, stage, tau)).loss.item()

    assert loss("data", 0, 0.9) == pytest.approx(loss("velocity", 0, 0.9))  # 1 - a >= 0.5 in the first stage
    assert loss("data", 1, 0.5) == pytest.approx(loss("velocity", 1, 0.5))
    # τ = 0.999 in the last stage: 1 - a = 0.001 (1 - s), the velocity error ~1 / (1 - a), the weighted one bounded
    assert loss("velocity", 1, 0.999) > 100 * loss("data", 1, 0.999)
    with pytest.raises(ValueError, match="prediction='x0': choose velocity or data"):
        PyramidalObjective(path, prediction="x0")


def test_pyramidal_trains_and_samples_a_dfm_dit() -> None:
    path = PyramidalPath(GaussianPyramid(2))
    model = DFMDiT(DiTConfig(**{**TINY, "input_size": (8, 8), "patch_size": 2, "stage_factors": (2, 1)}))
    perturbed(model).train()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    objective = PyramidalObjective(path)
    draw = objective.draw(path.decomposition.level_shapes(x.shape), generator=gen(0))
    out = objective.loss(model, x[:4], y[:4], draw=draw[:4])
    assert out.stage_counts.tolist() == [2.0, 2.0] and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.x_embedders[0].weight.grad.abs().sum() > 0 and model.x_embedders[1].weight.grad.abs().sum() > 0
    model.eval()
    res = sample_pyramidal(model, path, (3, 1, 8, 8), y[:3], steps=(2, 2), seeds=[3, 4, 5], guidance=2.0)
    assert res.images.shape == (3, 1, 8, 8) and [tuple(p.shape) for p in res.previews] == [(3, 1, 4, 4), (3, 1, 8, 8)]
    alone = sample_pyramidal(model, path, (1, 1, 8, 8), y[1:2], steps=(2, 2), seeds=[4], guidance=2.0)
    torch.testing.assert_close(alone.images[0], res.images[1], atol=1e-5, rtol=1e-5)
    heun = sample_pyramidal(model, path, (1, 1, 8, 8), y[:1], steps=(2, 1), seeds=[0], solver="heun")
    assert torch.isfinite(heun.images).all()
