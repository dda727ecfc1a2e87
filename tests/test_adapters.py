"""FLUX / SD3 -> DFM adapters on tiny random diffusers transformers (CPU, float32, eval mode)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402

from dfm.adapters import (  # noqa: E402
    FluxDFMAdapter,
    SD3DFMAdapter,
    TextCondition,
    add_lora,
    flux_image_ids,
    fsdp_wrap_modules,
    pack,
    unpack,
)
from dfm.adapters.common import lift, pool  # noqa: E402
from dfm.schedule import flux_mu, flux_time_shift, shift_time  # noqa: E402

B, H, W, L = 2, 8, 12, 5  # batch, fine latent size, text tokens


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip


ADAPTERS = {"flux": (tiny_flux, FluxDFMAdapter), "sd3": (tiny_sd3, SD3DFMAdapter)}


def make(kind: str, **kwargs):
    """(converted adapter, untouched copy of the pretrained transformer)."""
    build, cls = ADAPTERS[kind]
    transformer = build()
    original = copy.deepcopy(transformer)
    return cls(transformer, **kwargs).eval(), original


def inputs(seed: int = 1, factors=(2, 1)):
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(B, 16, H // f, W // f, generator=g) for f in factors]
    t = torch.rand(B, len(factors), generator=g)
    y = TextCondition(torch.randn(B, L, 32, generator=g), torch.randn(B, 16, generator=g))
    return levels, t, y


def pretrained_coarse_velocity(kind: str, original, coarse, t0, y, factor: int = 2):
    """The pretrained model on the lifted coarse level, pooled, in our sign and time convention."""
    sigma = 1 - t0
    x = lift(coarse, factor)
    with torch.no_grad():
        if kind == "flux":
            out = original(
                hidden_states=pack(x, 2), encoder_hidden_states=y.prompt_embeds, pooled_projections=y.pooled,
                timestep=sigma, img_ids=flux_image_ids(H // 2, W // 2), txt_ids=torch.zeros(L, 3),
                guidance=torch.ones(B), return_dict=False,
            )[0]  # fmt: skip
            out = unpack(out, 2, (H, W))
        else:
            out = original(hidden_states=x, encoder_hidden_states=y.prompt_embeds, pooled_projections=y.pooled,
                           timestep=sigma * 1000, return_dict=False)[0]  # fmt: skip
    return -pool(out, factor)


# ------------------------------------------------------------------------------------------------ exactness at init
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_coarse_stage_is_the_pretrained_model_and_fine_stage_is_zero(kind):
    adapter, original = make(kind)
    levels, t, y = inputs()
    with torch.no_grad():
        v = adapter(levels, t, y)
    expected = pretrained_coarse_velocity(kind, original, levels[0], t[:, 0], y)
    assert expected.abs().max() > 0.1  # a non-trivial reference
    torch.testing.assert_close(v[0], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(v[1], torch.zeros_like(v[1]))
    assert [tuple(o.shape) for o in v] == [tuple(lv.shape) for lv in levels]


def test_sd3_three_stages_coarse_stage_exact():
    adapter, original = make("sd3", stage_factors=(4, 2, 1))
    levels, t, y = inputs(factors=(4, 2, 1))
    with torch.no_grad():
        v = adapter(levels, t, y)
    expected = pretrained_coarse_velocity("sd3", original, levels[0], t[:, 0], y, factor=4)
    torch.testing.assert_close(v[0], expected, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in v[1:])


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_inactive_fine_stage_has_no_effect(kind):
    adapter, _ = make(kind)
    for p in adapter.stage_parameters():  # give the new modules weights, so the fine input could matter
        torch.nn.init.normal_(p[1], std=0.1)
    levels, t, y = inputs()
    main = torch.zeros(B, dtype=torch.long)
    other = [levels[0], torch.randn_like(levels[1])]
    other_t = torch.stack([t[:, 0], torch.rand(B)], dim=1)
    with torch.no_grad():
        a, b = adapter(levels, t, y, main), adapter(other, other_t, y, main)
        full = adapter(levels, t, y, torch.ones(B, dtype=torch.long))
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    assert not torch.equal(a[0], full[0])  # while active, the fine level does matter


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_empty_prompt_is_used_for_y_none(kind):
    adapter, _ = make(kind)
    levels, t, _ = inputs()
    empty = TextCondition(torch.randn(1, L, 32), torch.randn(1, 16))
    with pytest.raises(ValueError, match="set_empty_prompt"):
        adapter(levels, t)
    adapter.set_empty_prompt(empty)
    with torch.no_grad():
        v_none = adapter(levels, t)
        v_explicit = adapter(
            levels, t, TextCondition(empty.prompt_embeds.expand(B, -1, -1), empty.pooled.expand(B, -1))
        )
    assert all(torch.equal(x, z) for x, z in zip(v_none, v_explicit))


# ------------------------------------------------------------------------------------------------ training
def named_grads(adapter):
    return {n: p.grad for n, p in adapter.stage_parameters()}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_gradients_reach_new_stage_modules(kind):
    adapter, _ = make(kind)
    levels, t, y = inputs()
    v = adapter(levels, t, y)
    (v[0].square().mean() + (v[1] - 1).square().mean()).backward()
    grads = named_grads(adapter)
    head = "proj_out.stages.0"
    embed = "x_embedder.stages.0" if kind == "flux" else "pos_embed.proj.stages.0"
    nonzero = [f"{head}.weight", f"{head}.bias", f"{embed}.weight", "time_text_embed.stages.0.linear_2.weight",
               "time_text_embed.stage_embedding.weight"]  # fmt: skip
    for name in nonzero:  # zero modules whose output feeds a non-zero path get gradients at once
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # behind a zero layer the gradient is exactly zero until that layer moves
    for name in ("time_text_embed.stages.0.linear_1.weight", "norm_out.stages.0.linear.weight"):
        assert grads[name] is None or grads[name].abs().sum() == 0, name


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_gradient_checkpointing_gives_same_outputs_and_grads(kind):
    results = []
    for checkpointing in (False, True):
        adapter, _ = make(kind)
        if checkpointing:
            adapter.enable_gradient_checkpointing()
            assert adapter.transformer.gradient_checkpointing
        levels, t, y = inputs()
        v = adapter(levels, t, y)
        (v[0].square().mean() + (v[1] - 1).square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in v], grads))
    (v_off, g_off), (v_on, g_on) = results
    assert all(torch.equal(a, b) for a, b in zip(v_off, v_on))
    assert g_off.keys() == g_on.keys() and len(g_off) > 20
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_lora_keeps_init_outputs_and_trains_only_lora_and_new_stages(kind):
    pytest.importorskip("peft")
    adapter, _ = make(kind)
    levels, t, y = inputs()
    with torch.no_grad():
        before = adapter(levels, t, y)
    names = add_lora(adapter, rank=4, alpha=4)
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    if kind == "flux":
        assert "single_transformer_blocks.0.proj_out" in names and "transformer_blocks.0.attn.to_q" in names
    with torch.no_grad():
        after = adapter(levels, t, y)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    stage = {f"transformer.{n}" for n, _ in adapter.stage_parameters()}
    trainable = {n for n, p in adapter.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert lora and trainable == lora | stage
    v = adapter(levels, t, y)
    (v[0].square().mean() + (v[1] - 1).square().mean()).backward()
    assert all(p.grad is None for n, p in adapter.named_parameters() if n not in trainable)


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_save_load_round_trip(kind, with_lora, tmp_path):
    if with_lora:
        pytest.importorskip("peft")
    adapter, _ = make(kind)
    if with_lora:
        add_lora(adapter, rank=2, alpha=4)
    torch.manual_seed(3)
    with torch.no_grad():  # move every new module and LoRA weight off its initial value
        for name, p in adapter.named_parameters():
            if p.requires_grad and (".stages." in name or "stage_embedding" in name or "lora_" in name):
                p.add_(0.05 * torch.randn_like(p))
    adapter.set_empty_prompt(TextCondition(torch.randn(1, L, 32), torch.randn(1, 16)))
    levels, t, y = inputs()
    main = torch.tensor([0, 1])
    with torch.no_grad():
        expected = adapter(levels, t, None, main)
    adapter.save_pretrained(tmp_path / "model")
    adapter.save_pretrained(tmp_path / "model")  # overwriting an existing save works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = type(adapter).from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        got = loaded(levels, t, None, main)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert loaded.stage_factors == adapter.stage_factors and loaded.lora_settings == adapter.lora_settings
    # the saved transformer is a plain diffusers one (no wrapper nor LoRA keys)
    keys = load_file(tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in keys if "lora" in k or "base" in k or "stages" in k]
    plain = type(adapter.transformer).from_pretrained(tmp_path / "model" / "transformer")
    assert type(plain.proj_out) is torch.nn.Linear


# ------------------------------------------------------------------------------------------------ helpers
def test_pack_helpers_match_flux_pipeline():
    pytest.importorskip("transformers")
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    x = torch.randn(B, 16, H, W)
    packed = FluxPipeline._pack_latents(x, B, 16, H, W)
    assert torch.equal(pack(x, 2), packed)
    assert torch.equal(unpack(packed, 2, (H, W)), FluxPipeline._unpack_latents(packed, H * 8, W * 8, 8))
    ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
    assert torch.equal(flux_image_ids(H // 2, W // 2), ids)


def test_sd3_shift_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (3.0, 0.5):  # SD3's shift, and one below 1 (more steps near the data)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)  # its training sigmas, shifted
        sigma = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
        torch.testing.assert_close((1 - shift_time(1 - sigma, shift)).float(), scheduler.sigmas.float())


def test_flux_time_shift_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    for seq_len in (256, 1024, 4096):
        mu = flux_mu(seq_len)
        sigma = scheduler.time_shift(mu, 1.0, 1 - t)
        torch.testing.assert_close(flux_time_shift(t, seq_len), 1 - sigma)
    assert flux_time_shift(torch.tensor([0.0, 1.0]), 4096).tolist() == [0.0, 1.0]
    try:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    except ImportError:  # the pipeline module needs transformers
        return
    for seq_len in (256, 1000, 4096):
        assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len))


def test_fsdp_wrap_modules_are_the_blocks():
    adapter, _ = make("flux")
    classes = fsdp_wrap_modules(adapter)
    assert sorted(c.__name__ for c in classes) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]
    assert [c.__name__ for c in fsdp_wrap_modules(tiny_sd3())] == ["JointTransformerBlock"]


def test_clear_errors():
    adapter, _ = make("flux")
    levels, t, y = inputs()
    with pytest.raises(ValueError, match="latent channels"):
        adapter([levels[0][:, :4], levels[1][:, :4]], t, y)
    with pytest.raises(ValueError, match="divisible"):
        adapter([torch.randn(B, 16, 4, 6), torch.randn(B, 16, 9, 12)], t, y)
    with pytest.raises(ValueError, match="set_empty_prompt"):
        adapter(levels, t, None)
    with pytest.raises(ValueError, match="2 stages"):
        adapter(levels[:1], t, y)
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        FluxDFMAdapter(tiny_flux(), stage_factors=(4, 2, 1))
    with pytest.raises(TypeError, match="TextCondition"):
        adapter(levels, t, torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------ package integration
def test_objective_and_sampler_run_the_adapter():
    from dfm.config import SamplerConfig
    from dfm.decomposition import LaplacianPyramid
    from dfm.objective import DFMObjective
    from dfm.sampling import StageSampler

    adapter, _ = make("flux")
    _, _, y = inputs()
    adapter.set_empty_prompt(TextCondition(y.prompt_embeds[:1], y.pooled[:1]))
    pyramid = LaplacianPyramid(2)
    out = DFMObjective(pyramid).loss(adapter, torch.randn(B, 16, H, W), y=y, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with torch.no_grad():
        settings, sampler = SamplerConfig((2, 1), (0.7,)), StageSampler(pyramid)
        result = sampler.sample(adapter, (B, 16, H, W), settings=settings, seeds=[0, 1])  # y=None: the empty prompt
        text = sampler.sample(adapter, (B, 16, H, W), y, settings=settings, seeds=[0, 1])
    assert result.images.shape == text.images.shape == (B, 16, H, W)
    assert torch.isfinite(result.images).all() and not torch.equal(result.images, text.images)
