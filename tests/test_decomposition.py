"""Tests of the multi-scale decompositions (method.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.decomposition import (
    DCTBands,
    HaarWavelet,
    Identity,
    LaplacianPyramid,
    Standardized,
    build_decomposition,
    estimate_level_std,
)

MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
FAST = settings(max_examples=25, deadline=None)


@st.composite
def cases(draw, kinds=("laplacian", "haar", "dct", "identity"), video=None):
    """A decomposition and a compatible input shape: random kind, stage count (1-4), factors (2 or one 4x
    jump), resampling mode, image or video, with or without temporal factors."""
    kind = draw(st.sampled_from(kinds))
    is_video = draw(st.booleans()) if video is None else video
    stages = 1 if kind == "identity" else draw(st.integers(1, 4))
    spatial = [2] * (stages - 1)
    if kind != "haar" and stages > 1 and draw(st.booleans()):
        spatial[draw(st.integers(0, stages - 2))] = 4  # a 4x jump (e.g. 256 -> 1024)
    temporal = [1] * (stages - 1)
    if is_video and stages > 1 and draw(st.booleans()):
        temporal = [2] * (stages - 1) if kind == "haar" else [draw(st.sampled_from([1, 2])) for _ in temporal]
    if kind == "identity":
        dec = Identity()
    elif kind == "haar":
        dec = HaarWavelet(stages, temporal=any(f == 2 for f in temporal))
    elif kind == "dct":
        dec = DCTBands(stages, factors=tuple(spatial), temporal_factors=tuple(temporal))
    else:
        modes = [m for m in MODES if m != "bicubic" or all(f == 1 for f in temporal)]
        mode = draw(st.sampled_from(modes))
        dec = LaplacianPyramid(stages, factors=tuple(spatial), mode=mode, temporal_factors=tuple(temporal))
    ps = math.prod(spatial)
    h = draw(st.integers(1, 2 if is_video else 3)) * ps
    w = draw(st.integers(1, 2 if is_video else 3)) * ps
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    if is_video:
        shape += (draw(st.integers(1, 2)) * math.prod(temporal),)
    return dec, shape + (h, w)


def _randn(shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# -- exact reconstruction -------------------------------------------------------------------------------------
@FAST
@given(cases(), st.integers(0, 2**16))
def test_exact_reconstruction_float64(case, seed):
    dec, shape = case
    x = _randn(shape, seed)
    levels = dec.decompose(x)
    assert len(levels) == dec.num_stages
    assert [tuple(lv.shape) for lv in levels] == dec.level_shapes(shape)
    assert all(lv.dtype == torch.float64 for lv in levels)
    out = dec.recompose(levels)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-10, rtol=0)


@FAST
@given(cases(), st.integers(0, 2**16))
def test_exact_reconstruction_float32(case, seed):
    dec, shape = case
    x = _randn(shape, seed, torch.float32)
    out = dec.recompose(dec.decompose(x))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@FAST
@given(cases(video=True), st.integers(0, 2**16))
def test_exact_reconstruction_video(case, seed):
    dec, shape = case
    x = _randn(shape, seed)
    assert len(shape) == 5
    torch.testing.assert_close(dec.recompose(dec.decompose(x)), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factors", [(2,), (4,), (2, 2), (4, 2), (2, 2, 2)])
def test_laplacian_every_mode_and_factor(mode, factors):
    pyr = LaplacianPyramid(len(factors) + 1, factors=factors, mode=mode)
    x = _randn((2, 3, 16, 16), 1)
    levels = pyr.decompose(x)
    assert levels[0].shape[-1] == 16 // math.prod(factors)
    torch.testing.assert_close(pyr.recompose(levels), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "area"])
def test_laplacian_temporal_factors_video(mode):
    pyr = LaplacianPyramid(3, mode=mode, temporal_factors=(2, 1))
    x = _randn((1, 2, 4, 8, 8), 2)
    levels = pyr.decompose(x)
    assert [tuple(lv.shape) for lv in levels] == [(1, 2, 2, 2, 2), (1, 2, 4, 4, 4), (1, 2, 4, 8, 8)]
    torch.testing.assert_close(pyr.recompose(levels), x, atol=1e-10, rtol=0)


# -- standardisation ------------------------------------------------------------------------------------------
@FAST
@given(cases(), st.lists(st.floats(0.05, 20.0), min_size=4, max_size=4), st.integers(0, 2**16))
def test_standardized_round_trip(case, stds, seed):
    base, shape = case
    dec = Standardized(base, stds[: base.num_stages])
    x = _randn(shape, seed)
    levels = dec.decompose(x)
    for lv, blv, s in zip(levels, base.decompose(x), dec.stds):
        torch.testing.assert_close(lv * s, blv, atol=1e-10, rtol=1e-10)
    assert dec.level_shapes(shape) == base.level_shapes(shape)
    torch.testing.assert_close(dec.recompose(levels), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "base",
    [LaplacianPyramid(3), HaarWavelet(2), DCTBands(3), LaplacianPyramid(2, temporal_factors=2)],
    ids=repr,
)
def test_standardized_levels_have_unit_std_on_data(base):
    g = torch.Generator().manual_seed(0)
    # smooth data (constant in time for videos) with a small fine-scale residual: the levels' std differ a lot
    coarse = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64) * 3.0
    x = F.interpolate(coarse, size=(16, 16), mode="bilinear")
    if base.temporal_factors == (2,):
        x = x[:, :, None].expand(-1, -1, 4, -1, -1)
    x = x + 0.05 * torch.randn(*x.shape, generator=g, dtype=torch.float64)
    stds = estimate_level_std(base, x)
    assert len(stds) == base.num_stages
    for s, lv in zip(stds, base.decompose(x)):
        assert s == pytest.approx(lv.std().item(), rel=1e-5)
    assert max(stds) / min(stds) > 3  # the test data really is unbalanced
    dec = Standardized(base, stds)
    for lv in dec.decompose(x):
        assert lv.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(dec.recompose(dec.decompose(x)), x, atol=1e-10, rtol=0)


# -- dtypes and gradients -------------------------------------------------------------------------------------
ALL = [
    Identity(),
    LaplacianPyramid(3),
    LaplacianPyramid(2, factors=4, mode="bicubic"),
    LaplacianPyramid(2, mode="area"),
    HaarWavelet(3),
    DCTBands(2),
    DCTBands(2, factors=4),
    Standardized(LaplacianPyramid(2), (0.5, 0.2)),
]


@pytest.mark.parametrize("dec", ALL, ids=repr)
def test_bfloat16_runs_and_stays_close(dec):
    x32 = _randn((2, 3, 16, 16), 3, torch.float32).to(torch.bfloat16).float()  # representable in bf16
    ref = dec.decompose(x32)
    levels = dec.decompose(x32.to(torch.bfloat16))
    assert all(lv.dtype == torch.bfloat16 for lv in levels)
    for lv, r in zip(levels, ref):
        torch.testing.assert_close(lv.float(), r, atol=0.05, rtol=0.02)
    out = dec.recompose(levels)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x32, atol=0.08, rtol=0.02)


@pytest.mark.parametrize("dec", ALL + [HaarWavelet(2, temporal=True), DCTBands(2, temporal_factors=2)], ids=repr)
def test_decompose_gradcheck(dec):
    shape = (1, 1, 2, 4, 4) if dec.temporal_factors == (2,) else (1, 2, 4, 4)
    x = _randn(shape, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: tuple(dec.decompose(inp)), (x,))
    levels = [lv.detach().requires_grad_(True) for lv in dec.decompose(x.detach())]
    assert torch.autograd.gradcheck(lambda *lv: dec.recompose(list(lv)), tuple(levels))


@pytest.mark.parametrize("dec", ALL, ids=repr)
def test_grad_of_round_trip_is_ones(dec):
    x = _randn((2, 2, 8, 8), 5).requires_grad_(True)
    dec.recompose(dec.decompose(x)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x), atol=1e-10, rtol=0)


# -- shapes ---------------------------------------------------------------------------------------------------
def test_level_shapes_images():
    assert LaplacianPyramid(3).level_shapes((2, 3, 32, 48)) == [(2, 3, 8, 12), (2, 3, 16, 24), (2, 3, 32, 48)]
    assert LaplacianPyramid(2, factors=(4,)).level_shapes((1, 4, 64, 64)) == [(1, 4, 16, 16), (1, 4, 64, 64)]
    assert LaplacianPyramid(3, factors=(4, 2)).stage_sizes((64, 32)) == [(8, 4), (32, 16), (64, 32)]
    assert HaarWavelet(4).stage_sizes((16, 8)) == [(2, 1), (4, 2), (8, 4), (16, 8)]
    assert DCTBands(2, factors=4).stage_sizes((12, 8)) == [(3, 2), (12, 8)]
    assert Identity().level_shapes((5, 1, 7, 9)) == [(5, 1, 7, 9)]
    assert build_decomposition("laplacian", 1).level_shapes((5, 1, 7, 9)) == [(5, 1, 7, 9)]
    assert Standardized(HaarWavelet(2), (1.0, 2.0)).stage_sizes((4, 6)) == [(2, 3), (4, 6)]


def test_level_shapes_videos():
    assert LaplacianPyramid(2).level_shapes((1, 3, 5, 16, 16)) == [(1, 3, 5, 8, 8), (1, 3, 5, 16, 16)]
    assert LaplacianPyramid(2).stage_sizes((5, 16, 8)) == [(5, 8, 4), (5, 16, 8)]
    pyr = LaplacianPyramid(3, temporal_factors=(2, 2))
    assert pyr.level_shapes((2, 1, 8, 16, 16)) == [(2, 1, 2, 4, 4), (2, 1, 4, 8, 8), (2, 1, 8, 16, 16)]
    assert HaarWavelet(2, temporal=True).stage_sizes((4, 8, 8)) == [(2, 4, 4), (4, 8, 8)]
    assert HaarWavelet(2).stage_sizes((3, 8, 8)) == [(3, 4, 4), (3, 8, 8)]
    assert DCTBands(2, factors=4, temporal_factors=2).stage_sizes((6, 8, 16)) == [(3, 2, 4), (6, 8, 16)]
    assert Identity().stage_sizes((3, 5, 7)) == [(3, 5, 7)]


@FAST
@given(cases())
def test_stage_sizes_shrink_by_the_factors(case):
    dec, shape = case
    sizes = dec.stage_sizes(shape[2:])
    assert len(sizes) == dec.num_stages and sizes[-1] == tuple(shape[2:])
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        f = dec._spatial_factors()[i]
        assert b[-2:] == (a[-2] * f, a[-1] * f)
        if len(a) == 3:
            assert b[0] == a[0] * dec.temporal_factors[i]


# -- what the levels are --------------------------------------------------------------------------------------
@FAST
@given(st.integers(1, 4), st.sampled_from([2, 4]), st.booleans(), st.integers(0, 2**16))
def test_laplacian_preview_is_the_block_mean(stages, jump, video, seed):
    """With bilinear 2x steps every preview is the mean of the block each coarse pixel covers (no aliasing)."""
    factors = [2] * (stages - 1)
    if stages > 1:
        factors[0] = jump
    pyr = LaplacianPyramid(stages, factors=factors)
    shape = (2, 2, 3, 16, 16) if video else (2, 2, 16, 32)
    x = _randn(shape, seed)
    levels = pyr.decompose(x)
    for k, size in enumerate(pyr.stage_sizes(shape[2:])):
        frames = x.transpose(1, 2).flatten(0, 1) if video else x
        ref = F.avg_pool2d(frames, (frames.shape[-2] // size[-2], frames.shape[-1] // size[-1]))
        if video:
            ref = ref.unflatten(0, (shape[0], shape[2])).transpose(1, 2)
        torch.testing.assert_close(pyr.preview(levels, k), ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(pyr.recompose(levels[: k + 1]), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(levels[0], pyr.preview(levels, 0), atol=0, rtol=0)


@pytest.mark.parametrize("dec", ALL + [LaplacianPyramid(3, temporal_factors=2)], ids=repr)
def test_full_size_preview(dec):
    shape = (2, 1, 4, 16, 16) if dec.temporal_factors == (2, 2) else (2, 1, 16, 16)
    x = _randn(shape, 6)
    levels = dec.decompose(x)
    for k in range(dec.num_stages):
        full = dec.preview(levels, k, full_size=True)
        assert full.shape == x.shape
        small = dec.preview(levels, k)
        assert small.shape == levels[k].shape
        if k < dec.num_stages - 1:  # brought up by the decomposition's own upsampling
            up = dec.recompose([small] + [torch.zeros_like(lv) for lv in levels[k + 1 :]])
            if not isinstance(dec, Standardized):
                torch.testing.assert_close(full, up, atol=1e-10, rtol=0)
    torch.testing.assert_close(dec.preview(levels, dec.num_stages - 1, full_size=True), x, atol=1e-10, rtol=0)
    with pytest.raises(ValueError):
        dec.preview(levels, dec.num_stages)
    with pytest.raises(ValueError):
        dec.preview(levels, -1)
    if dec.num_stages > 1:
        with pytest.raises(ValueError):
            dec.preview(levels[:1], 1)
        with pytest.raises(ValueError):
            dec.preview(levels[:1], 0, full_size=True)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_haar_stage1_is_block_mean(stages):
    x = _randn((2, 3, 16, 24), 7)
    levels = HaarWavelet(stages).decompose(x)
    k = 2 ** (stages - 1)
    torch.testing.assert_close(levels[0], F.avg_pool2d(x, k), atol=1e-12, rtol=0)
    # for 2 stages, stage 1 is exactly the 2x2 block mean written out
    if stages == 2:
        manual = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 4
        torch.testing.assert_close(levels[0], manual, atol=1e-12, rtol=0)
    # finer levels are pure high-pass: zero mean over every 2x2 block
    for lv in levels[1:]:
        torch.testing.assert_close(F.avg_pool2d(lv, 2), torch.zeros_like(F.avg_pool2d(lv, 2)), atol=1e-12, rtol=0)


def test_haar_temporal_is_2x2x2_block_mean():
    x = _randn((1, 2, 4, 8, 8), 8)
    levels = HaarWavelet(2, temporal=True).decompose(x)
    torch.testing.assert_close(levels[0], F.avg_pool3d(x, 2), atol=1e-12, rtol=0)
    frame_wise = HaarWavelet(2).decompose(x)[0]
    torch.testing.assert_close(frame_wise, F.avg_pool3d(x, (1, 2, 2)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dec", [DCTBands(2), DCTBands(3), DCTBands(2, factors=4), DCTBands(2, temporal_factors=2)])
def test_dct_stage1_has_the_input_mean(dec):
    shape = (2, 3, 4, 16, 16) if dec.temporal_factors == (2,) else (2, 3, 16, 16)
    x = _randn(shape, 9) + 0.7
    dims = tuple(range(2, x.dim()))
    levels = dec.decompose(x)
    torch.testing.assert_close(levels[0].mean(dims), x.mean(dims), atol=1e-12, rtol=0)
    for k in range(1, dec.num_stages):
        torch.testing.assert_close(levels[k].mean(dims), torch.zeros_like(x.mean(dims)), atol=1e-12, rtol=0)
        torch.testing.assert_close(dec.preview(levels, k).mean(dims), x.mean(dims), atol=1e-12, rtol=0)


def test_dct_bandlimited_input_has_empty_fine_level():
    dec = DCTBands(2)
    x = _randn((2, 1, 16, 16), 10)
    low = dec.preview(dec.decompose(x), 0, full_size=True)  # only the low band, at full resolution
    levels = dec.decompose(low)
    torch.testing.assert_close(levels[1], torch.zeros_like(levels[1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(levels[0], dec.decompose(x)[0], atol=1e-12, rtol=0)
    # a constant image lives entirely in stage 1
    c = torch.full((1, 1, 8, 8), 2.5, dtype=torch.float64)
    lv = dec.decompose(c)
    torch.testing.assert_close(lv[0], torch.full((1, 1, 4, 4), 2.5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(lv[1], torch.zeros_like(lv[1]), atol=1e-12, rtol=0)


def test_build_decomposition():
    d = build_decomposition("laplacian", 3, factors=(4, 2), mode="area", temporal_factors=(1, 2))
    assert isinstance(d, LaplacianPyramid)
    assert (d.factors, d.mode, d.temporal_factors) == ((4, 2), "area", (1, 2))
    assert isinstance(build_decomposition("identity", 1), Identity)
    assert isinstance(build_decomposition("dct", 2, factors=4), DCTBands)
    h = build_decomposition("haar", 3, temporal_factors=2)
    assert isinstance(h, HaarWavelet) and h.temporal_factors == (2, 2)
    assert build_decomposition("haar", 2).temporal_factors == (1,)


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dec, shape, pattern",
    [
        (LaplacianPyramid(2), (1, 1, 15, 16), r"height 15 .*\(2,\)"),
        (LaplacianPyramid(2), (1, 1, 16, 10), None),  # 10 is divisible by 2: fine
        (LaplacianPyramid(3), (1, 1, 16, 10), r"width 10 .*\(2, 2\).*divisible by 4"),
        (LaplacianPyramid(2, factors=4), (1, 1, 18, 16), r"height 18 .*\(4,\).*divisible by 4"),
        (HaarWavelet(2), (1, 1, 8, 7), r"width 7 .*\(2,\)"),
        (DCTBands(2, factors=4), (1, 1, 8, 6), r"width 6 .*\(4,\)"),
        (LaplacianPyramid(2, temporal_factors=2), (1, 1, 3, 8, 8), r"frame count 3 .*\(2,\)"),
        (HaarWavelet(2, temporal=True), (1, 1, 5, 8, 8), r"frame count 5 .*\(2,\)"),
    ],
)
def test_unsplittable_sizes_raise(dec, shape, pattern):
    x = torch.zeros(shape)
    if pattern is None:
        dec.decompose(x)
        return
    with pytest.raises(ValueError, match=pattern):
        dec.decompose(x)
    with pytest.raises(ValueError, match=pattern):
        dec.level_shapes(shape)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LaplacianPyramid(0),
        lambda: LaplacianPyramid(-1),
        lambda: LaplacianPyramid(2.5),
        lambda: LaplacianPyramid(2, factors=0),
        lambda: LaplacianPyramid(3, factors=(2, -2)),
        lambda: LaplacianPyramid(3, factors=(2,)),
        lambda: LaplacianPyramid(2, factors=(2, 2)),
        lambda: LaplacianPyramid(2, mode="linear"),
        lambda: LaplacianPyramid(2, mode="lanczos"),
        lambda: LaplacianPyramid(2, mode="bicubic", temporal_factors=2),
        lambda: LaplacianPyramid(3, temporal_factors=(1,)),
        lambda: LaplacianPyramid(2, temporal_factors=0),
        lambda: HaarWavelet(0),
        lambda: DCTBands(0),
        lambda: DCTBands(3, factors=(4,)),
        lambda: build_decomposition("pyramid", 2),
        lambda: build_decomposition("identity", 2),
        lambda: build_decomposition("haar", 2, factors=4),
        lambda: build_decomposition("haar", 3, temporal_factors=(1, 2)),
        lambda: build_decomposition("haar", 2, temporal_factors=3),
        lambda: build_decomposition("laplacian", 2, mode="foo"),
        lambda: Standardized(LaplacianPyramid(2), (1.0,)),
        lambda: Standardized(LaplacianPyramid(2), (1.0, 0.0)),
        lambda: Standardized(LaplacianPyramid(2), (1.0, -2.0)),
        lambda: Standardized(LaplacianPyramid(2), (1.0, float("inf"))),
        lambda: Standardized(LaplacianPyramid(2), (1.0, float("nan"))),
    ],
)
def test_bad_settings_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("dec", ALL, ids=repr)
def test_bad_inputs_raise(dec):
    with pytest.raises(ValueError):
        dec.decompose(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        dec.decompose(torch.zeros(1, 1, 1, 1, 8, 8))
    with pytest.raises(ValueError):
        dec.level_shapes((8, 8))
    with pytest.raises(ValueError):
        dec.stage_sizes((8,))
    with pytest.raises(ValueError):
        dec.recompose([])
    with pytest.raises(ValueError):
        dec.recompose([torch.zeros(1, 1, 2, 2)] * (dec.num_stages + 1))


# -- aliasing -------------------------------------------------------------------------------------------------
def _checkerboard(period: int, size: int = 32) -> torch.Tensor:
    """A pattern with period ``period`` along both axes and zero mean over every period x period block."""
    i = torch.arange(size, dtype=torch.float64)
    wave = torch.where(((i + 1) // (period // 2)) % 2 == 0, 1.0, -1.0)  # +1 -1 -1 +1: its centre pair is -1 -1
    return (wave[:, None] * wave[None, :]).view(1, 1, size, size)


@pytest.mark.parametrize("factors", [(4,), (2, 2), (2, 2, 2)])
@pytest.mark.parametrize("mode", ["bilinear", "area", "bicubic"])
def test_laplacian_coarsest_level_holds_no_alias_of_a_fine_pattern(factors, mode):
    """A period-4 pattern lies above the Nyquist frequency of a 4x (or coarser) level: it must not fold into it.

    Resizing straight from full resolution by 4x with bilinear samples the centre 2x2 of each 4x4 block and keeps
    most of the pattern's RMS in the coarse level; the recursive 2x steps average whole blocks and keep none.
    """
    x = _checkerboard(4)
    pyr = LaplacianPyramid(len(factors) + 1, factors=factors, mode=mode)
    levels = pyr.decompose(x)
    rms = levels[0].pow(2).mean().sqrt().item()
    limit = 1e-12 if mode != "bicubic" else 0.05  # bicubic's 2x steps are a good low-pass, not a perfect one
    assert rms < limit, f"the coarsest level keeps RMS {rms:.3f} of a pattern it cannot represent"
    torch.testing.assert_close(pyr.recompose(levels), x, atol=1e-12, rtol=0)
    direct = F.interpolate(x, size=levels[0].shape[-2:], mode="bilinear", align_corners=False, antialias=False)
    assert direct.pow(2).mean().sqrt().item() > 0.5  # what the old one-shot resize kept: the test can fail


def test_downsample_of_a_4x_jump_averages_the_whole_block_for_videos():
    x = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64)
    from dfm.decomposition import downsample

    frames = x.transpose(1, 2).flatten(0, 1)
    ref = F.avg_pool2d(frames, 4).unflatten(0, (2, 4)).transpose(1, 2)
    torch.testing.assert_close(downsample(x, (4, 4, 4)), ref, atol=1e-12, rtol=0)
    both = downsample(x, (2, 4, 4))  # temporal and spatial 2x steps together: a 2x4x4 box
    torch.testing.assert_close(both, F.avg_pool3d(x, (2, 4, 4)), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="divide"):
        downsample(x, (4, 5, 5))


@pytest.mark.parametrize(
    "name",
    ["haar-3", "dct-4x", "dct-3", "gaussian-4x", "gaussian-3"],
)
def test_other_pyramids_keep_a_fine_pattern_out_of_the_coarsest_level(name):
    """The DWT, the DCT bands and Pyramidal Flow's Gaussian pyramid do not alias either (block means, ideal bands)."""
    from dfm.baselines.pyramidal import GaussianPyramid

    dec = {
        "haar-3": HaarWavelet(3),
        "dct-4x": DCTBands(2, factors=(4,)),
        "dct-3": DCTBands(3),
        "gaussian-4x": GaussianPyramid(2, factors=(4,)),
        "gaussian-3": GaussianPyramid(3),
    }[name]
    levels = dec.decompose(_checkerboard(4))
    assert levels[0].pow(2).mean().sqrt().item() < 1e-12
