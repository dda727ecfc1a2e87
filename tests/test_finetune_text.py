"""Text-conditioned fine-tuning of diffusers FLUX models end to end (tiny random configs, CPU): `dfm prepare` with
captions, `dfm finetune --from <diffusers dir>` as DFM and as FM, LoRA, exact resume, caption dropout, true CFG with
text, `dfm sample --prompt`, and the one-line errors.

No model hub here: the pipeline's tokenizers and text encoders cannot be downloaded, so captions are encoded by a
fake text encoder (deterministic random embeddings per prompt), passed to `prepare_latents` and patched in for
`dfm sample` through `dfm.text.load_text_encoder`. The diffusers-pipeline encoder itself is not exercised here.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")

from dfm import text as text_module  # noqa: E402
from dfm.adapters import FluxDFMAdapter, TextCondition  # noqa: E402
from dfm.checkpoint import find_latest  # noqa: E402
from dfm.cli import main as cli  # noqa: E402
from dfm.config import RunConfig  # noqa: E402
from dfm.data.prepare import prepare_latents  # noqa: E402
from dfm.sampling import guided_velocity, prepare_guidance  # noqa: E402

L, D_TEXT, D_POOLED = 5, 32, 16
N_IMAGES = 6


def fake_encoder(prompts: list[str]) -> TextCondition:
    """Random embeddings seeded by each prompt's text: the same prompt always gives the same embedding."""
    embeds, pooled = [], []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        embeds.append(torch.randn(1, L, D_TEXT, generator=g))
        pooled.append(torch.randn(1, D_POOLED, generator=g))
    return TextCondition(torch.cat(embeds), torch.cat(pooled))


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=D_TEXT, pooled_projection_dim=D_POOLED, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A diffusers-style FLUX directory, a 16-channel VAE, a captioned image folder and its prepared latents."""
    root = tmp_path_factory.mktemp("text")
    flux = root / "flux"
    tiny_flux().save_pretrained(flux / "transformer")
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=16,
    ).save_pretrained(root / "vae")  # fmt: skip
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "text": f"caption number {i}"}))
    (images / "captions.jsonl").write_text("\n".join(rows) + "\n")
    latents = prepare_latents(str(images), str(root / "vae"), root / "latents", 16, batch_size=4,
                              text_encoder=fake_encoder, text_encoder_source="fake", progress=False)  # fmt: skip
    return {"root": root, "flux": flux, "latents": latents, "images": images}


@pytest.fixture(autouse=True)
def patched_encoder(monkeypatch):
    monkeypatch.setattr(text_module, "load_text_encoder", lambda source, max_length, device="cpu": fake_encoder)


def finetune(setup, out: Path, method: str = "dfm", steps: int = 2, *extra: str) -> int:
    sampling = ["-o", "sampler.steps=2,1"] if method == "dfm" else ["-o", "sampler.steps=3"]
    return cli(["finetune", "--from", str(setup["flux"]), "--method", method, "--data", str(setup["latents"]),
                "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--precision", "fp32", "--no-progress",
                "-o", "train.log_every=1", "-o", "train.num_sample_images=2", "-o", "train.threads=1",
                *sampling, *extra])  # fmt: skip


def sample_npz(run: Path, out: Path, *extra: str) -> np.ndarray:
    assert cli(["sample", str(run), "--prompt", "a red square", "--prompt", "a blue circle", "--seeds", "0-2",
                "--out", str(out), "--npz", *extra]) == 0  # fmt: skip
    return np.load(out / "samples.npz")["arr_0"]


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_stores_caption_embeddings_and_the_empty_prompt(setup):
    from dfm.data.latents import LatentDataset

    ds = LatentDataset(setup["latents"])
    assert ds.text == {"encoder": "fake", "max_length": 128} and ds.num_classes == 0
    x, y = ds.get_batch(torch.tensor([4, 1]), augment=False)
    assert x.shape == (2, 16, 8, 8) and isinstance(y, TextCondition)
    expected = fake_encoder(["caption number 4", "caption number 1"])
    assert torch.equal(y.prompt_embeds, expected.prompt_embeds) and torch.equal(y.pooled, expected.pooled)
    empty = fake_encoder([""])
    assert torch.equal(ds.empty_prompt.prompt_embeds, empty.prompt_embeds)


def test_prepare_with_txt_captions_and_missing_captions(setup, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        if i != 1:
            (folder / f"{i}.txt").write_text(f"text {i}\n")
    with pytest.raises(ValueError, match=r"1 of 3 images have no caption.*1\.png"):
        prepare_latents(str(folder), str(setup["root"] / "vae"), tmp_path / "lat", 16, text_encoder=fake_encoder,
                        progress=False)  # fmt: skip
    (folder / "1.txt").write_text("text 1")
    out = prepare_latents(str(folder), str(setup["root"] / "vae"), tmp_path / "lat", 16, text_encoder=fake_encoder,
                          progress=False)  # fmt: skip
    from dfm.data.latents import LatentDataset

    y = LatentDataset(out).text_condition(torch.tensor([1]))
    assert torch.equal(y.pooled, fake_encoder(["text 1"]).pooled)
    # the CLI says it in one line
    (folder / "1.txt").unlink()
    code = cli(["prepare", "--data", str(folder), "--vae", str(setup["root"] / "vae"), "--out", str(tmp_path / "l2"),
                "--resolution", "16", "--text-encoder", str(setup["flux"])])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no caption" in err


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", ["dfm", "fm"])
def test_finetune_sample_with_prompts_and_reload(setup, tmp_path, method):
    run = tmp_path / "run"
    assert finetune(setup, run, method) == 0
    cfg = RunConfig.load(run / "config.json")
    assert cfg.model.backbone == "flux" and cfg.method.stages == (2 if method == "dfm" else 1)
    assert not cfg.method.precondition and cfg.sampler.guidance == (3.0,) and cfg.optim.lr == 1e-5
    assert cfg.optim.betas == (0.9, 0.99) and cfg.method.label_dropout == 0.1 and not cfg.optim.ema
    assert (run / "pretrained" / "dfm_adapter.json").is_file() and list((run / "samples").glob("step_*.png"))
    a = sample_npz(run, tmp_path / "a")
    assert a.shape == (3, 16, 16, 3)  # 16-channel latents decoded by the VAE
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 3
    settings = json.loads((tmp_path / "a" / "sampling.json").read_text())
    assert settings["prompts"] == ["a red square", "a blue circle"] and settings["guidance"] == [3.0]  # cycled
    b = sample_npz(run / "pretrained", tmp_path / "b")  # the saved model gives the same images
    assert np.array_equal(a, b)
    if method == "dfm":  # the FLUX time shift changes the grid, hence the images
        c = sample_npz(run, tmp_path / "c", "--time-shift")
        assert not np.array_equal(a, c)


def test_sd3_finetunes_and_samples(setup, tmp_path):
    torch.manual_seed(0)
    sd3 = tmp_path / "sd3"
    diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=D_TEXT, caption_projection_dim=32, pooled_projection_dim=D_POOLED, out_channels=16,
        pos_embed_max_size=16,
    ).save_pretrained(sd3 / "transformer")  # fmt: skip
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    run = tmp_path / "run"
    assert finetune({**setup, "flux": sd3}, run, "dfm") == 0
    assert RunConfig.load(run / "config.json").model.backbone == "sd3"
    a = sample_npz(run, tmp_path / "a")
    assert a.shape == (3, 16, 16, 3) and np.array_equal(a, sample_npz(run / "pretrained", tmp_path / "b"))


def test_converted_model_is_the_pretrained_flux_at_step_zero(setup):
    """The trainer's model at step 0, one stage (fm) vs two stages (dfm) on the coarse level: the FM adapter is the
    diffusers transformer unchanged."""
    from dfm.adapters import load_adapter, pack, unpack
    from dfm.adapters.flux import flux_image_ids

    fm = load_adapter(setup["flux"], (1,)).eval()
    original = tiny_flux().eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, 1, generator=g)
    y = fake_encoder(["a", "b"])
    with torch.no_grad():
        v = fm([x], t, y)[0]
        ref = original(hidden_states=pack(x, 2), encoder_hidden_states=y.prompt_embeds, pooled_projections=y.pooled,
                       timestep=1 - t[:, 0], img_ids=flux_image_ids(4, 4), txt_ids=torch.zeros(L, 3),
                       guidance=torch.ones(2), return_dict=False)[0]  # fmt: skip
    assert torch.equal(v, -unpack(ref, 2, (8, 8)))


def test_lora_run_trains_only_lora_and_new_stage_params(setup, tmp_path):
    pytest.importorskip("peft")
    run = tmp_path / "lora"
    assert finetune(setup, run, "dfm", 2, "--lora", "2") == 0
    saved = load_file(find_latest(run / "checkpoints") / "model.safetensors")
    weights = {k for k in saved if not k.startswith("empty_")}
    assert weights and all(".lora_" in k or ".stages." in k or "stage_embedding" in k for k in weights)
    assert any(".lora_" in k for k in weights) and any(".stages." in k for k in weights)
    # the pretrained weights did not move: the saved plain transformer is the original one
    original = load_file(setup["flux"] / "transformer" / "diffusion_pytorch_model.safetensors")
    final = load_file(run / "pretrained" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert original.keys() == final.keys() and all(torch.equal(original[k], final[k]) for k in original)
    lora = load_file(run / "pretrained" / "dfm_lora.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # LoRA B left zero
    a = sample_npz(run, tmp_path / "a")
    assert np.array_equal(a, sample_npz(run / "pretrained", tmp_path / "b"))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(setup, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert finetune(setup, whole, "dfm", 4, "-o", "train.ckpt_every=2", "--ema") == 0
    assert finetune(setup, parts, "dfm", 2, "-o", "train.ckpt_every=2", "--ema") == 0
    assert finetune(setup, parts, "dfm", 4, "-o", "train.ckpt_every=2", "--ema", "--resume", "auto") == 0
    for name in ("model.safetensors", "ema.safetensors"):  # the EMA (of the trainable weights) resumes too
        a = load_file(whole / "checkpoints" / "step_00000004" / name)
        b = load_file(parts / "checkpoints" / "step_00000004" / name)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (whole, parts)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 4


# ------------------------------------------------------------------------------------------------ training details
def test_caption_dropout_replaces_about_ten_percent_by_the_empty_prompt(setup, tmp_path):
    from dfm.finetune import diffusers_finetune_config
    from dfm.training import Trainer

    cfg = diffusers_finetune_config(setup["flux"], "dfm", steps=20, data=str(setup["latents"]))
    cfg.train.batch_size, cfg.train.precision, cfg.train.threads = 8, "fp32", 1
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    seen = []

    def loss(net, x, y, draw=None):
        seen.append(y)
        return original(net, x, y, draw=draw)

    original, trainer.objective.loss = trainer.objective.loss, loss
    for _ in range(20):
        trainer.train_step()
    empty = trainer.empty_prompt.pooled[0]
    dropped = torch.cat([(y.pooled == empty).all(1) for y in seen])
    assert dropped.shape == (160,) and 8 <= int(dropped.sum()) <= 26  # 10% of 160 = 16
    # a dropped row is the empty prompt in full, a kept row its caption
    y = seen[int(np.argmax([bool((s.pooled == empty).all(1).any()) for s in seen]))]
    row = int((y.pooled == empty).all(1).nonzero()[0])
    assert torch.equal(y.prompt_embeds[row], trainer.empty_prompt.prompt_embeds[0])


def test_true_cfg_with_text_equals_the_formula():
    adapter = FluxDFMAdapter(tiny_flux().eval()).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in adapter.stage_parameters():  # the fine stage outputs something too
            p.normal_(std=0.1)
    adapter.set_empty_prompt(fake_encoder([""]))
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 8, 8, generator=g)]
    t, main = torch.rand(2, 2, generator=g), torch.tensor([1, 1])
    y = fake_encoder(["a cat", "a dog"])
    scales, null, y = prepare_guidance(adapter, y, 2, [3.0, 2.0])
    assert scales == [3.0, 2.0] and torch.equal(null.pooled, fake_encoder([""]).pooled.expand(2, -1))
    with torch.no_grad():
        guided = guided_velocity(lambda a, lab: adapter(a[:-2], a[-2], lab, a[-1]), [*levels, t, main], y, scales, null)
        cond, uncond = adapter(levels, t, y, main), adapter(levels, t, None, main)
    for w, v, c, u in zip([3.0, 2.0], guided, cond, uncond):
        assert (c - u).abs().max() > 1e-3
        torch.testing.assert_close(v, u + w * (c - u), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_one_line_errors(setup, tmp_path, capsys):
    unet = tmp_path / "sd15"
    (unet / "transformer").mkdir(parents=True)
    (unet / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (unet / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert cli(["finetune", "--from", str(unet), "--data", str(setup["latents"]), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neither FLUX nor SD3" in err

    from dfm.models import DFMDiT, DiTConfig

    DFMDiT(DiTConfig(input_size=(8, 8), in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                     num_classes=3, stage_factors=(2, 1))).save_pretrained(tmp_path / "dit")  # fmt: skip
    assert cli(["sample", str(tmp_path / "dit"), "--prompt", "a cat", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not text-conditioned" in err


@pytest.mark.slow
def test_fsdp2_shards_the_flux_blocks_and_matches_one_process(setup, tmp_path):
    """2 CPU processes (gloo) with FSDP2 over the FLUX blocks train the same steps as 1 process, and resume.

    The latents' posterior std is zeroed: a posterior draw depends on the rank's slice of the batch (the latent data
    set draws noise for the indices it is given), so only the posterior means are the same for 1 and 2 processes."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import save_file

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    latents = tmp_path / "latents"
    shutil.copytree(setup["latents"], latents)
    for shard in latents.glob("train-*.safetensors"):
        tensors = load_file(shard)
        tensors["std"] = torch.zeros_like(tensors["std"])
        save_file(tensors, shard)
    setup = {**setup, "latents": latents}
    one, two = tmp_path / "one", tmp_path / "fsdp"
    assert finetune(setup, one, "dfm", 4) == 0
    args = ["finetune", "--from", str(setup["flux"]), "--data", str(setup["latents"]), "--out", str(two),
            "--batch-size", "2", "--precision", "fp32", "--no-progress", "-o", "train.log_every=1",
            "-o", "train.num_sample_images=2", "-o", "train.threads=1", "-o", "sampler.steps=2,1",
            "-o", "train.distributed=fsdp", "-o", "train.ckpt_every=2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for steps, extra in ((2, []), (4, ["--resume", "auto"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dfm",
               *args, "--steps", str(steps), *extra]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    losses = [[json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    a = load_file(find_latest(one / "checkpoints") / "model.safetensors")
    b = load_file(find_latest(two / "checkpoints") / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
