"""The real diffusers text-encoder path (`dfm.text.load_text_encoder`) on tiny FLUX and SD3 pipelines built offline.

No model hub here, so every piece is made locally in a fixture: CLIP tokenizer folders in the layout of FLUX's and
SD3's ``tokenizer/`` (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``, a few dozen byte-level BPE pieces),
T5 tokenizer folders with a ``tokenizer.json`` (a Unigram model over a few dozen pieces, built with ``tokenizers``)
as their ``tokenizer_2/`` (FLUX) / ``tokenizer_3/`` (SD3) hold besides ``spiece.model``, tiny random ``CLIPTextModel`` /
``CLIPTextModelWithProjection`` / ``T5EncoderModel``, a tiny FLUX / SD3 transformer whose text dimensions match them,
a 16-channel ``AutoencoderKL`` and a ``FlowMatchEulerDiscreteScheduler``, saved with the pipeline's
``save_pretrained``. The encoder is checked against the pipeline's own ``encode_prompt`` and run end to end through
``dfm prepare --text-encoder``, ``dfm finetune --from`` and ``dfm sample --prompt``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dfm.cli import main as cli  # noqa: E402
from dfm.data.latents import LatentDataset  # noqa: E402
from dfm.text import TextCondition, load_text_encoder  # noqa: E402

CLIP_TOKENS = 77  #: the pipelines' CLIP length (the CLIP tokenizer's model_max_length)
D_T5, D_POOLED = 32, 16  #: joint_attention_dim (T5 d_model), pooled_projection_dim
SD3_CLIP = ((8, 8), (16, 8))  #: SD3's (hidden, projection) of CLIP-L and CLIP-G: 8 + 16 <= D_T5, 8 + 8 = D_POOLED
WORDS = ("a", "red", "blue", "square", "circle", "cat", "dog", "caption", "number", "photo", "of")
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PROMPTS = ["a red square", "a blue circle", "a red square", ""]
CAPTIONS = ["a photo of a cat", "a dog", "red square number 1", "a blue circle, a red square", "", "caption 5"]


# ------------------------------------------------------------------------------------------------ tiny pipelines
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE pieces (every character alone and word-final, the WORDS merged left to right), specials last."""
    vocab = {c: i for i, c in enumerate(CHARACTERS)}
    vocab.update({c + "</w>": len(CHARACTERS) + i for i, c in enumerate(CHARACTERS)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = word[0]
        for i, ch in enumerate(word[1:], start=2):
            right = ch + "</w>" if i == len(word) else ch
            if (piece, right) not in merges:
                merges.append((piece, right))
            piece += right
            vocab.setdefault(piece, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return vocab, merges


def write_clip_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer folder as FLUX's and SD3's ``tokenizer/``: vocab.json, merges.txt, tokenizer_config.json."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_TOKENS, "do_lower_case": True,
              "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def clip_tokenizer(root: Path):
    write_clip_tokenizer(root / "clip_tokenizer")
    return transformers.CLIPTokenizer.from_pretrained(root / "clip_tokenizer")


def write_t5_tokenizer(folder: Path) -> None:
    """A T5 tokenizer folder as FLUX's ``tokenizer_2/`` (its tokenizer.json and tokenizer_config.json): a Unigram
    model over whole WORDS and single characters, ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in CHARACTERS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def t5_tokenizer(root: Path):
    write_t5_tokenizer(root / "t5_tokenizer")
    return transformers.T5TokenizerFast.from_pretrained(root / "t5_tokenizer")


def clip_model(tokenizer, hidden: int, projection: int | None = None):
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_TOKENS, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if projection is None:
        return transformers.CLIPTextModel(config)
    return transformers.CLIPTextModelWithProjection(config)


def t5_model(tokenizer):
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=D_T5, d_kv=8, d_ff=2 * D_T5, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip


def tiny_vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=16,
    )  # fmt: skip


def build_flux(root: Path) -> Path:
    torch.manual_seed(0)
    clip, t5 = clip_tokenizer(root), t5_tokenizer(root)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=D_T5, pooled_projection_dim=D_POOLED, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), transformer=transformer,
        text_encoder=clip_model(clip, D_POOLED), tokenizer=clip, text_encoder_2=t5_model(t5), tokenizer_2=t5,
    )  # fmt: skip
    path = root / "flux"
    pipe.save_pretrained(path)
    write_clip_tokenizer(path / "tokenizer")  # the published layout (no tokenizer.json)
    write_t5_tokenizer(path / "tokenizer_2")
    return path


def build_sd3(root: Path) -> Path:
    torch.manual_seed(0)
    clip, t5 = clip_tokenizer(root), t5_tokenizer(root)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=D_T5, caption_projection_dim=32, pooled_projection_dim=D_POOLED, out_channels=16,
        pos_embed_max_size=16,
    )  # fmt: skip
    (h1, p1), (h2, p2) = SD3_CLIP
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=clip_model(clip, h1, p1), tokenizer=clip, text_encoder_2=clip_model(clip, h2, p2),
        tokenizer_2=clip, text_encoder_3=t5_model(t5), tokenizer_3=t5,
    )  # fmt: skip
    path = root / "sd3"
    pipe.save_pretrained(path)
    write_clip_tokenizer(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer_2")
    write_t5_tokenizer(path / "tokenizer_3")
    return path


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Saved tiny FLUX and SD3 pipelines and a captioned 16x16 image folder."""
    root = tmp_path_factory.mktemp("pipelines")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "text": caption}))
    (images / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return {"flux": build_flux(root), "sd3": build_sd3(root), "images": images}


def prompt_length(kind: str, max_length: int) -> int:
    """Tokens of a prompt embedding: T5's for FLUX; SD3 puts its 77 CLIP tokens before them."""
    return max_length if kind == "flux" else CLIP_TOKENS + max_length


def t5_part(kind: str, cond: TextCondition) -> torch.Tensor:
    return cond.prompt_embeds if kind == "flux" else cond.prompt_embeds[:, CLIP_TOKENS:]


# ------------------------------------------------------------------------------------------------ the encoder
def test_tiny_tokenizers_see_the_words(tmp_path):
    """The handmade vocabularies tokenize the test words as words (not as unknowns): prompts really differ."""
    clip = clip_tokenizer(tmp_path)
    assert clip.convert_ids_to_tokens(clip("A red  Square").input_ids) == [BOS, "a</w>", "red</w>", "square</w>", EOS]
    assert clip.model_max_length == CLIP_TOKENS
    t5 = t5_tokenizer(tmp_path)
    assert t5.convert_ids_to_tokens(t5("a blue circle").input_ids) == ["\u2581a", "\u2581blue", "\u2581circle", "</s>"]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_encoder_equals_the_pipelines_encode_prompt(pipelines, kind):
    encode = load_text_encoder(pipelines[kind], max_length=8)
    cond = encode(PROMPTS)
    assert isinstance(cond, TextCondition) and cond.prompt_embeds.dtype == cond.pooled.dtype == torch.float32
    assert cond.prompt_embeds.shape == (4, prompt_length(kind, 8), D_T5) and cond.pooled.shape == (4, D_POOLED)
    assert torch.isfinite(cond.prompt_embeds).all() and torch.isfinite(cond.pooled).all()
    # the full pipeline (transformer and VAE loaded too), called as diffusers users call it
    cls = diffusers.FluxPipeline if kind == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(pipelines[kind])
    with torch.no_grad():
        if kind == "flux":
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=8)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=8)  # fmt: skip
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_equal_prompts_agree_different_prompts_differ_empty_prompt_works(pipelines, kind):
    encode = load_text_encoder(pipelines[kind], max_length=8)
    cond = encode(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds[0], cond.prompt_embeds[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled[0], cond.pooled[2], rtol=0, atol=1e-6)
    for x in (cond.prompt_embeds, cond.pooled, t5_part(kind, cond)):
        assert (x[0] - x[1]).abs().max() > 1e-3 and (x[0] - x[3]).abs().max() > 1e-3
    # a prompt's embedding does not depend on the rest of the batch (everything is padded to fixed lengths)
    alone = encode(["a blue circle"])
    torch.testing.assert_close(alone.prompt_embeds[0], cond.prompt_embeds[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone.pooled[0], cond.pooled[1], rtol=0, atol=1e-6)
    empty = encode([""])
    assert empty.prompt_embeds.shape == (1, prompt_length(kind, 8), D_T5)
    torch.testing.assert_close(empty.pooled[0], cond.pooled[3], rtol=0, atol=1e-6)
    if kind == "sd3":  # CLIP-L and CLIP-G hidden states side by side, zero-padded to T5's width
        clip_width = SD3_CLIP[0][0] + SD3_CLIP[1][0]
        assert (cond.prompt_embeds[:, :CLIP_TOKENS, clip_width:] == 0).all()
        assert (cond.prompt_embeds[:, :CLIP_TOKENS, :clip_width] != 0).any(-1).all()


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_max_length_truncates_and_pads_the_t5_tokens(pipelines, kind):
    short, long = load_text_encoder(pipelines[kind], max_length=4), load_text_encoder(pipelines[kind], max_length=12)
    prompts = ["a red square", "a red square and then a blue circle and a cat"]
    s, g = short(prompts), long(prompts)
    assert s.prompt_embeds.shape == (2, prompt_length(kind, 4), D_T5)
    assert g.prompt_embeds.shape == (2, prompt_length(kind, 12), D_T5)
    # truncated to 4 T5 tokens ("a red square </s>"), the long prompt's T5 tokens are the short one's
    torch.testing.assert_close(t5_part(kind, s)[1], t5_part(kind, s)[0], rtol=0, atol=1e-6)
    assert (t5_part(kind, g)[1] - t5_part(kind, g)[0]).abs().max() > 1e-3  # not at 12 tokens
    assert (s.pooled[1] - s.pooled[0]).abs().max() > 1e-3  # CLIP saw the whole prompt
    torch.testing.assert_close(s.pooled, g.pooled, rtol=0, atol=1e-6)  # max_length is T5's alone
    if kind == "sd3":
        torch.testing.assert_close(s.prompt_embeds[:, :CLIP_TOKENS], g.prompt_embeds[:, :CLIP_TOKENS], rtol=0,
                                   atol=1e-6)  # fmt: skip


def test_bfloat16_encoders_return_float32(pipelines):
    encode = load_text_encoder(pipelines["flux"], max_length=8, dtype=torch.bfloat16)
    cond, ref = encode(PROMPTS[:2]), load_text_encoder(pipelines["flux"], max_length=8)(PROMPTS[:2])
    assert cond.prompt_embeds.dtype == cond.pooled.dtype == torch.float32
    assert not torch.equal(cond.prompt_embeds, ref.prompt_embeds)  # the encoders did run in bfloat16
    torch.testing.assert_close(cond.prompt_embeds, ref.prompt_embeds, rtol=0.05, atol=0.05)
    torch.testing.assert_close(cond.pooled, ref.pooled, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_prepare_finetune_sample_with_the_real_encoder(pipelines, tmp_path, kind):
    model = pipelines[kind]
    latents, run = tmp_path / "latents", tmp_path / "run"
    assert cli(["prepare", "--data", str(pipelines["images"]), "--vae", str(model), "--out", str(latents),
                "--resolution", "16", "--batch-size", "4", "--device", "cpu", "--text-encoder", str(model),
                "--max-text-length", "6"]) == 0  # fmt: skip
    ds = LatentDataset(latents)
    assert ds.text == {"encoder": str(model.resolve()), "max_length": 6}
    encode = load_text_encoder(model, max_length=6)
    x, y = ds.get_batch(torch.arange(len(CAPTIONS)), augment=False)
    assert x.shape == (len(CAPTIONS), 16, 8, 8) and isinstance(y, TextCondition)
    expected = encode(CAPTIONS)
    torch.testing.assert_close(y.prompt_embeds, expected.prompt_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(y.pooled, expected.pooled, rtol=0, atol=1e-6)
    empty = encode([""])
    torch.testing.assert_close(ds.empty_prompt.prompt_embeds, empty.prompt_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ds.empty_prompt.pooled, empty.pooled, rtol=0, atol=1e-6)

    assert cli(["finetune", "--from", str(model), "--method", "dfm", "--data", str(latents), "--out", str(run),
                "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--no-progress",
                "-o", "train.num_sample_images=2", "-o", "train.threads=1",
                "-o", "sampler.steps=2,1"]) == 0  # fmt: skip

    def sample(out: Path, *prompts: str) -> np.ndarray:
        args = [a for p in prompts for a in ("--prompt", p)]
        assert cli(["sample", str(run), *args, "--seeds", "0-1", "--out", str(out), "--npz"]) == 0
        return np.load(out / "samples.npz")["arr_0"]

    a = sample(tmp_path / "a", "a red square", "a blue circle")
    assert a.shape == (2, 16, 16, 3) and len(list((tmp_path / "a" / "images").glob("*.png"))) == 2
    assert json.loads((tmp_path / "a" / "sampling.json").read_text())["prompts"] == ["a red square", "a blue circle"]
    b = sample(tmp_path / "b", "a red square", "a red square")
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])  # the prompt, encoded, steers the image
