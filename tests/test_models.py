"""Tests of the DFM-DiT model family (dfm.models)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.eval import seam_ratio
from dfm.models import MODEL_REGISTRY, DFMDiT, DiTConfig, count_parameters, create_config, create_model
from dfm.models.layers import LabelEmbedder, StageLinear, overlap_unpatchify, patchify, tent_window, unpatchify
from dfm.models.positions import apply_rope, rope_tables
from dfm.models.precondition import Preconditioned, flow_preconditioning

TINY = dict(input_size=(16, 16), in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def tiny_config(**overrides: object) -> DiTConfig:
    return DiTConfig(**{**TINY, **overrides})


def perturbed(model: DFMDiT, seed: int = 0) -> DFMDiT:
    """Replace the exact-zero initialisation (adaLN-Zero, zero heads) by small noise so that signals flow."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def random_inputs(config: DiTConfig, batch: int, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    levels = [
        torch.randn(batch, config.in_channels, *config.stage_input_size(s), generator=gen).to(device)
        for s in range(config.num_stages)
    ]
    t = torch.rand(batch, config.num_stages, generator=gen).to(device)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=gen).to(device)
    main_stage = torch.randint(0, config.num_stages, (batch,), generator=gen).to(device)
    return levels, t, y, main_stage


# ----------------------------------------------------------------------------- registry and shapes


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_registry_entry_gives_per_stage_shapes_on_meta(name: str) -> None:
    config = create_config(name)
    with torch.device("meta"):
        model = create_model(name)
        levels, t, y, main_stage = random_inputs(config, batch=2, device="meta")
        out = model(levels, t, y, main_stage)
    assert [o.shape for o in out] == [lv.shape for lv in levels]
    # every stage produces the same token grid
    assert config.num_tokens == (config.input_size[0] // config.patch_size) * (
        config.input_size[1] // config.patch_size
    )
    assert model.num_stages == (1 if name.startswith("DiT-") else 2)
    assert model.null_class == model.num_classes == config.num_classes


def test_registry_sizes_match_the_dit_paper_and_presets() -> None:
    for size, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16)}.items():
        cfg = create_config(f"DFM-DiT-{size}/4")
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, width, heads, 4)
    cfg = create_config("DFM-DiT-XL/2")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.stage_factors) == (28, 1152, 16, (2, 1))
    assert [cfg.stage_patch_size(s) for s in range(2)] == [1, 2]
    # Official DiT-XL/2 prints 675,129,632 parameters: it also predicts sigma (4 more output channels per
    # pixel: 2*2*4 weights per width + 16 biases) and stores its fixed 256x1152 sin-cos table as a parameter.
    dit_extra = 1152 * 16 + 16 + 256 * 1152
    assert count_parameters("DiT-XL/2") + dit_extra == 675_129_632
    ratio = count_parameters("DFM-DiT-XL/2") / count_parameters("DiT-XL/2")
    assert 1.0 < ratio < 1.01
    assert 1.2e6 < count_parameters("DFM-DiT-Tiny") < 1.45e6
    assert 6.5e6 < count_parameters("DFM-DiT-Mini") < 8e6
    assert create_config("DFM-DiT-Tiny").num_tokens == 64


def test_create_model_errors_and_overrides() -> None:
    with pytest.raises(ValueError, match="DFM-DiT-XL/2"):
        create_model("DFM-DiT-XL2")
    with pytest.raises(ValueError, match="bad override"):
        create_config("DFM-DiT-Tiny", hidden=3)
    cfg = create_config("DFM-DiT-B/4", input_size=(64, 64), num_classes=10)
    assert cfg.input_size == (64, 64) and cfg.num_classes == 10 and cfg.hidden_size == 768


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(patch_size=2, stage_factors=(4, 2, 1)), "not divisible by the resolution factor 4"),
        (dict(stage_factors=(1, 2)), "strictly decreasing|end with 1"),
        (dict(input_size=(15, 16)), "not divisible by patch_size"),
        (dict(pos="learned"), "pos='learned'"),
        (dict(specialise="ffn"), "specialise='ffn'"),
        (dict(hidden_size=33), "not divisible by num_heads"),
    ],
)
def test_bad_config_raises_a_clear_value_error(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_forward_rejects_wrong_shapes() -> None:
    model = DFMDiT(tiny_config())
    levels, t, y, main_stage = random_inputs(model.config, 2)
    with pytest.raises(ValueError, match="level 1 has shape"):
        model([levels[0], levels[0]], t, y, main_stage)
    with pytest.raises(ValueError, match="got 1 levels"):
        model(levels[:1], t, y, main_stage)
    with pytest.raises(ValueError, match="t has shape"):
        model(levels, t[:, 0], y, main_stage)


def test_video_shapes_and_3d_positions() -> None:
    for pos in ("rope", "sincos"):
        cfg = tiny_config(input_size=(3, 8, 8), pos=pos)
        assert cfg.token_grid == (3, 4, 4)
        model = perturbed(DFMDiT(cfg))
        levels, t, y, main_stage = random_inputs(cfg, 2)
        out = model(levels, t, y, main_stage)
        assert [o.shape for o in out] == [(2, 2, 3, 4, 4), (2, 2, 3, 8, 8)]
        # frames are not independent: changing frame 0 changes the other frames' outputs (attention over time)
        levels2 = [lv.clone() for lv in levels]
        levels2[0][:, :, 0] += 1.0
        out2 = model(levels2, t, y, torch.ones(2, dtype=torch.long))
        out1 = model(levels, t, y, torch.ones(2, dtype=torch.long))
        assert not torch.allclose(out1[1][:, :, 2], out2[1][:, :, 2])


# ----------------------------------------------------------------------------- stage semantics


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(pos="sincos", use_stage_embedding=False),
        dict(stage_factors=(4, 2, 1), patch_size=4, data_std=(0.6, 0.3, 0.2)),
        dict(specialise="all"),
    ],
)
def test_inactive_stages_have_no_effect_on_any_output(overrides: dict) -> None:
    """Also through the preconditioning wrapper (``data_std``): the model contract holds for the velocity model."""
    std = overrides.pop("data_std", None)
    cfg = tiny_config(**overrides)
    model = perturbed(DFMDiT(cfg))
    if std is not None:
        model = Preconditioned(model, std)
    levels, t, y, _ = random_inputs(cfg, 4, seed=1)
    main_stage = torch.tensor([0, 0, 1, cfg.num_stages - 1])
    ref = model(levels, t, y, main_stage)
    garbage_levels = [lv.clone() for lv in levels]
    garbage_t = t.clone()
    for s in range(1, cfg.num_stages):
        inactive = main_stage < s
        garbage_levels[s][inactive] = torch.randn_like(garbage_levels[s][inactive]) * 100
        garbage_levels[s][inactive, 0, 0, 0] = float("nan")
        garbage_t[inactive, s] = 0.77
    out = model(garbage_levels, garbage_t, y, main_stage)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... while an active stage's input does change the outputs
    changed = [lv.clone() for lv in levels]
    changed[-1][-1] += 1.0
    assert not torch.equal(model(changed, t, y, main_stage)[0][-1], ref[0][-1])


def test_fresh_model_outputs_exactly_zero() -> None:
    for overrides in (dict(), dict(stage_factors=(1,)), dict(input_size=(2, 8, 8))):
        cfg = tiny_config(**overrides)
        levels, t, y, main_stage = random_inputs(cfg, 3)
        for out in DFMDiT(cfg)(levels, t, y, main_stage):
            assert torch.count_nonzero(out) == 0


def test_fresh_preconditioned_model_outputs_the_skip_term() -> None:
    cfg, std = tiny_config(), (0.6, 0.2)
    levels, t, y, _ = random_inputs(cfg, 3)
    main_stage = torch.tensor([0, 1, 1])
    out = Preconditioned(DFMDiT(cfg), std)(levels, t, y, main_stage)
    for s in range(2):
        active = (main_stage >= s).float()
        ts = t[:, s] * active
        c_skip = (ts * std[s] ** 2 - (1 - ts)) / (ts**2 * std[s] ** 2 + (1 - ts) ** 2)
        expected = c_skip.view(-1, 1, 1, 1) * levels[s] * active.view(-1, 1, 1, 1)
        torch.testing.assert_close(out[s], expected, rtol=1e-6, atol=1e-6)


def test_preconditioning_coefficients_give_unit_variance() -> None:
    sigma = 0.3
    for t_val in (0.0, 0.2, 0.5, 0.9, 1.0):
        t = torch.tensor([t_val], dtype=torch.float64)
        c_in, c_skip, c_out = flow_preconditioning(t, sigma)
        var_xt = t_val**2 * sigma**2 + (1 - t_val) ** 2
        assert c_in.item() == pytest.approx(var_xt**-0.5)
        # Var(c_in X_t) = 1; the network's ideal target F = (v - c_skip X_t) / c_out has variance exactly 1.
        var_target = ((1 - c_skip * t_val) ** 2 * sigma**2 + (1 + c_skip * (1 - t_val)) ** 2) / c_out**2
        assert var_target.item() == pytest.approx(1.0)
        # and it is uncorrelated with the input (c_skip is the least-squares skip)
        cov = (1 - c_skip * t_val) * t_val * sigma**2 - (1 + c_skip * (1 - t_val)) * (1 - t_val)
        assert cov.item() == pytest.approx(0.0, abs=1e-12)


def test_stage_embedding_tells_the_main_stage_apart() -> None:
    levels, t, y, _ = random_inputs(tiny_config(), 2)
    levels[1].zero_()
    t[:, 1] = 0.0
    for use, differs in ((True, True), (False, False)):
        model = perturbed(DFMDiT(tiny_config(use_stage_embedding=use)))
        a = model(levels, t, y, torch.zeros(2, dtype=torch.long))
        b = model(levels, t, y, torch.ones(2, dtype=torch.long))
        assert (not torch.equal(a[0], b[0])) == differs


def test_one_stage_model_is_a_plain_dit() -> None:
    model = DFMDiT(tiny_config(stage_factors=(1,)))
    assert model.stage_embedder is None
    assert len(model.x_embedders) == len(model.t_embedders) == len(model.final_layers) == 1
    perturbed(model)
    x = torch.randn(2, 2, 16, 16)
    t = torch.rand(2)
    y = torch.tensor([1, 4])
    torch.testing.assert_close(model([x], t, y)[0], model([x], t[:, None], y, torch.zeros(2, dtype=torch.long))[0])


# ----------------------------------------------------------------------------- classes


def test_null_class_path() -> None:
    model = perturbed(DFMDiT(tiny_config()))
    levels, t, _, main_stage = random_inputs(model.config, 3)
    null = torch.full((3,), model.null_class, dtype=torch.long)
    for a, b in zip(model(levels, t, None, main_stage), model(levels, t, null, main_stage)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = model(levels, t, torch.tensor([0, 1, 2]), main_stage)
    assert not torch.equal(other[0], model(levels, t, None, main_stage)[0])


def test_label_embedder_never_drops_labels_itself() -> None:
    """Label dropout is the trainer's (seeded per step); the network maps every label to its own row."""
    embedder = LabelEmbedder(num_classes=10, hidden_size=4).train()
    y = torch.arange(10).repeat(100)
    torch.testing.assert_close(embedder(y, len(y), y.device), embedder.embedding.weight[y], rtol=0, atol=0)
    null = embedder(None, 3, y.device)
    torch.testing.assert_close(null, embedder.embedding.weight[10].expand(3, 4), rtol=0, atol=0)


def test_a_config_with_the_preconditioning_inside_is_refused_and_names_the_loader() -> None:
    data = tiny_config().to_dict()
    assert DiTConfig.from_dict({**data, "precondition": False, "data_std": None}) == tiny_config()
    with pytest.raises(ValueError, match="load its directory with dfm.Run"):
        DiTConfig.from_dict({**data, "precondition": True, "data_std": [0.6, 0.2]})
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiTConfig.from_dict({**data, "dropout_typo": 0.1})


# ----------------------------------------------------------------------------- specialisation


@pytest.mark.parametrize("specialise", ["mlp", "attention", "all"])
def test_specialisation_changes_only_its_stage(specialise: str) -> None:
    cfg = tiny_config(specialise=specialise)
    model = perturbed(DFMDiT(cfg))
    experts = [m for m in model.modules() if isinstance(m, StageLinear) and m.expert_weight is not None]
    assert len(experts) == {"mlp": 2, "attention": 2, "all": 5}[specialise] * cfg.depth
    levels, t, y, _ = random_inputs(cfg, 4)
    main_stage = torch.tensor([0, 1, 0, 1])
    before = model(levels, t, y, main_stage)
    with torch.no_grad():
        for m in experts:
            m.expert_weight[1].mul_(3.0)
    after = model(levels, t, y, main_stage)
    for a, b in zip(before, after):
        torch.testing.assert_close(a[main_stage == 0], b[main_stage == 0], rtol=0, atol=0)
        assert not torch.allclose(a[main_stage == 1], b[main_stage == 1])


def test_fresh_experts_reproduce_the_shared_model() -> None:
    plain = perturbed(DFMDiT(tiny_config()))
    special = DFMDiT(tiny_config(specialise="all"))
    missing, unexpected = special.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("expert" in k for k in missing)
    for m in special.modules():
        if isinstance(m, StageLinear):
            m.reset_experts()
    levels, t, y, main_stage = random_inputs(plain.config, 4)
    for a, b in zip(plain(levels, t, y, main_stage), special.eval()(levels, t, y, main_stage)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gradients, dtypes, compile


@pytest.mark.parametrize("overrides", [dict(), dict(specialise="all", data_std=(0.6, 0.2))])
def test_every_parameter_receives_gradient(overrides: dict) -> None:
    std = overrides.pop("data_std", None)
    model = perturbed(DFMDiT(tiny_config(**overrides))).train()
    velocity = model if std is None else Preconditioned(model, std)
    levels, t, _, _ = random_inputs(model.config, 4)
    y = torch.arange(4) % (model.num_classes + 1)
    y[0] = model.null_class
    main_stage = torch.tensor([0, 1, 0, 1])
    loss = sum((o**2).mean() for o in velocity(levels, t, y, main_stage))
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []


def test_bf16_autocast_forward_matches_float32() -> None:
    model = perturbed(DFMDiT(tiny_config()))
    levels, t, y, main_stage = random_inputs(model.config, 2)
    ref = model(levels, t, y, main_stage)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(levels, t, y, main_stage)
    for a, b in zip(ref, out):
        assert b.dtype == torch.bfloat16
        assert torch.isfinite(b).all()
        assert (a - b.float()).abs().max() < 0.05 * a.abs().max()


@pytest.mark.skipif(not os.environ.get("DFM_TEST_COMPILE"), reason="torch.compile takes ~40 s on 2 CPU cores")
def test_torch_compile_matches_eager() -> None:
    model = perturbed(DFMDiT(tiny_config()))
    levels, t, y, main_stage = random_inputs(model.config, 2)
    compiled = torch.compile(model)
    for a, b in zip(model(levels, t, y, main_stage), compiled(levels, t, y, main_stage)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path) -> None:
    cfg = tiny_config(specialise="mlp", input_size=(2, 8, 8))
    model = perturbed(DFMDiT(cfg))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DFMDiT.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == cfg
    levels, t, y, main_stage = random_inputs(cfg, 3)
    for a, b in zip(model(levels, t, y, main_stage), loaded(levels, t, y, main_stage)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_json_round_trip() -> None:
    cfg = create_config("DFM-DiT-Mini", input_size=(4, 32, 32), specialise="mlp")
    assert DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown DiTConfig fields \\['widht'\\]"):
        DiTConfig.from_dict({**cfg.to_dict(), "widht": 3})


def test_from_pretrained_with_a_mismatching_config_raises(tmp_path) -> None:
    DFMDiT(tiny_config()).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "depth": 3}))
    with pytest.raises(ValueError, match="do not match the config.*missing: \\['blocks.2"):
        DFMDiT.from_pretrained(tmp_path)
    config_file.write_text(json.dumps({**data, "hidden_size": 64}))
    with pytest.raises(ValueError, match="shape"):
        DFMDiT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        DFMDiT.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- building blocks


@settings(max_examples=25, deadline=None)
@given(
    video=st.booleans(),
    patch=st.sampled_from([1, 2, 4]),
    h=st.integers(1, 3),
    w=st.integers(1, 3),
    c=st.integers(1, 3),
)
def test_patchify_round_trip_and_token_order(video: bool, patch: int, h: int, w: int, c: int) -> None:
    size = (2, h * patch, w * patch) if video else (h * patch, w * patch)
    x = torch.randn(2, c, *size)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, (2 if video else 1) * h * w, c * patch * patch)
    torch.testing.assert_close(unpatchify(tokens, size, c, patch), x, rtol=0, atol=0)
    # the last token is the bottom-right patch of the last frame, flattened as (C, p, p)
    last = x[:, :, -1] if video else x
    torch.testing.assert_close(tokens[:, -1], last[..., -patch:, -patch:].reshape(2, -1), rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(6, 5), (3, 4, 4)])
def test_rope_scores_depend_only_on_relative_position(grid: tuple[int, ...]) -> None:
    head_dim = 14  # not a multiple of 2 * axes for 3D: the leftover pair must stay unrotated
    cos, sin = rope_tables(grid, head_dim)
    n = cos.shape[0]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=gen, dtype=torch.float64).expand(1, 1, n, head_dim)
    k = torch.randn(head_dim, generator=gen, dtype=torch.float64).expand(1, 1, n, head_dim)
    rq, rk = apply_rope(q, cos.double(), sin.double())[0, 0], apply_rope(k, cos.double(), sin.double())[0, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q[0, 0].norm(dim=-1))  # rotations keep norms
    scores = rq @ rk.T
    index = torch.arange(n).reshape(grid)
    for axis, size in enumerate(grid):  # shifting both tokens by one along any axis keeps the score
        a, b = index.narrow(axis, 0, size - 1).reshape(-1), index.narrow(axis, 1, size - 1).reshape(-1)
        torch.testing.assert_close(scores[a[:, None], a[None, :]], scores[b[:, None], b[None, :]], rtol=0, atol=1e-6)
    # ... but the score does change with the offset along every axis
    for axis in range(len(grid)):
        step = index.select(axis, 1).reshape(-1)[0]
        assert not torch.isclose(scores[0, 0], scores[0, step])


# ----------------------------------------------------------------------------- the overlapping head (head_overlap)


@pytest.mark.parametrize("patch, size", [(2, (8, 8)), (4, (16, 12)), (4, (2, 8, 16))])
def test_overlap_heads_rebuild_an_image_whose_windows_agree(patch: int, size: tuple) -> None:
    # Windows cut from one image (2p x 2p around each patch, zero outside the image) add up to that image exactly.
    frames = size[0] if len(size) == 3 else 1
    image = torch.randn(3 * frames, 2, *size[-2:], generator=torch.Generator().manual_seed(0))
    windows = torch.nn.functional.unfold(image, 2 * patch, stride=patch, padding=patch // 2)  # (B t, C k k, L)
    tokens = windows.transpose(1, 2).reshape(3, -1, 2 * (2 * patch) ** 2)  # (B, t L, C k k) in token order
    out = overlap_unpatchify(tokens, size, 2, patch)
    expected = image.view(3, frames, 2, *size[-2:]).transpose(1, 2) if len(size) == 3 else image
    torch.testing.assert_close(out, expected.reshape(out.shape), rtol=1e-5, atol=1e-5)
    tent = tent_window(patch).diagonal().sqrt()  # the 1-D tent w (the window is w(i) w(j))
    torch.testing.assert_close(tent[:patch] + tent[patch:], torch.ones(patch))  # windows every p pixels sum to 1


def test_overlap_head_turns_a_mosaic_of_tokens_into_a_smooth_image() -> None:
    # Every token paints a flat window of its own value: the plain head gives flat tiles, the overlapping one exactly
    # the bilinear upsampling of the token grid (linear between patch centres, constant beyond the outer ones).
    patch, values = 4, torch.randn(8, 256, 1, generator=torch.Generator().manual_seed(1))
    mosaic = unpatchify(values.expand(-1, -1, patch * patch), (64, 64), 1, patch)
    with pytest.raises(ValueError, match="constant inside every tile"):
        seam_ratio(mosaic, patch)
    blended = overlap_unpatchify(values.expand(-1, -1, (2 * patch) ** 2), (64, 64), 1, patch)
    bilinear = torch.nn.functional.interpolate(values.view(8, 1, 16, 16), scale_factor=patch, mode="bilinear")
    torch.testing.assert_close(blended, bilinear, rtol=0, atol=1e-5)


@pytest.mark.parametrize("patch, size", [(2, (8, 8)), (4, (16, 12)), (4, (2, 8, 16))])
def test_mirrored_border_blends_every_pixel_with_weights_summing_to_one(patch: int, size: tuple) -> None:
    # Windows cut from the image mirrored at its border (so a window's outside part is what folding back adds)
    # rebuild the image exactly, and flat windows of one value give that value everywhere, border included.
    frames = size[0] if len(size) == 3 else 1
    image = torch.randn(3 * frames, 2, *size[-2:], generator=torch.Generator().manual_seed(0))
    m = patch // 2
    mirrored = torch.cat([image[..., :m, :].flip(-2), image, image[..., -m:, :].flip(-2)], dim=-2)
    mirrored = torch.cat([mirrored[..., :m].flip(-1), mirrored, mirrored[..., -m:].flip(-1)], dim=-1)
    windows = torch.nn.functional.unfold(mirrored, 2 * patch, stride=patch)  # (B t, C k k, L)
    tokens = windows.transpose(1, 2).reshape(3, -1, 2 * (2 * patch) ** 2)
    out = overlap_unpatchify(tokens, size, 2, patch, border="mirror")
    expected = image.view(3, frames, 2, *size[-2:]).transpose(1, 2) if len(size) == 3 else image
    torch.testing.assert_close(out, expected.reshape(out.shape), rtol=1e-5, atol=1e-5)
    flat = overlap_unpatchify(torch.full_like(tokens, 0.7), size, 2, patch, border="mirror")
    torch.testing.assert_close(flat, torch.full_like(flat, 0.7))
    # The border pixels now depend on the window's outside part too; with "crop" they do not
    outside = torch.zeros(2 * patch, 2 * patch, dtype=torch.bool)
    outside[:m] = True  # the top rows of every window: outside the image for the first row of tokens
    poked = tokens.view(3, -1, 2, 2 * patch, 2 * patch).clone()
    poked[:, :, :, outside] += 1.0
    poked = poked.reshape(tokens.shape)
    for border, changes in (("crop", False), ("mirror", True)):
        a = overlap_unpatchify(tokens, size, 2, patch, border=border)[..., 0, :]
        b = overlap_unpatchify(poked, size, 2, patch, border=border)[..., 0, :]
        assert (not torch.allclose(a, b)) is changes
    with pytest.raises(ValueError, match="choose one of crop, mirror"):
        overlap_unpatchify(tokens, size, 2, patch, border="reflect")


def test_dit_with_overlapping_heads() -> None:
    cfg = tiny_config(stage_factors=(4, 2, 1), patch_size=4, head_overlap=True)  # patches 1, 2, 4
    model = DFMDiT(cfg)
    widths = [head.linear.out_features for head in model.final_layers]
    assert widths == [2 * 1, 2 * 4**2, 2 * 8**2]  # patch 1 keeps the plain head
    levels, t, y, main_stage = random_inputs(cfg, 3)
    assert all(torch.count_nonzero(o) == 0 for o in model(levels, t, y, main_stage))  # zero heads: zero output
    model = perturbed(model)
    out = model(levels, t, y, main_stage)
    assert [tuple(o.shape) for o in out] == [tuple(lv.shape) for lv in levels]
    plain = perturbed(DFMDiT(tiny_config(stage_factors=(4, 2, 1), patch_size=4)))
    assert seam_ratio(out[-1], 4) < seam_ratio(plain(levels, t, y, main_stage)[-1], 4)
    assert (
        DiTConfig.from_dict(cfg.to_dict()) == cfg and DiTConfig.from_dict(tiny_config().to_dict()).head_overlap is False
    )
    # The mirrored border: the same weights, another image along the border only; a config without the field
    # (every checkpoint before it) decodes as trained, with "crop"
    mirror = DFMDiT(dataclasses.replace(cfg, head_border="mirror"))
    mirror.load_state_dict(model.state_dict())
    other = mirror(levels, t, y, main_stage)[-1]
    torch.testing.assert_close(other[..., 2:-2, 2:-2], out[-1][..., 2:-2, 2:-2])
    assert not torch.allclose(other[..., :2, :], out[-1][..., :2, :])
    old = {k: v for k, v in cfg.to_dict().items() if k != "head_border"}
    assert (
        DiTConfig.from_dict(old).head_border == "crop" and DiTConfig.from_dict(mirror.config.to_dict()) == mirror.config
    )
    with pytest.raises(ValueError, match="head_border='edge': choose one of crop, mirror"):
        dataclasses.replace(cfg, head_border="edge")
