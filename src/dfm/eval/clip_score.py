"""CLIP score of text-conditioned samples (Hessel et al., 2021; Radford et al., 2021).

    CLIPScore(image, text) = 100 * max(cos(E_img(image), E_txt(text)), 0)

averaged over samples (the 100 x scale is the common reporting convention, e.g. torchmetrics).
The model is our own module whose parameter names match OpenAI's released CLIP checkpoints
(`ViT-B-32.pt`, `ViT-L-14.pt`, ...); the sizes are read from the checkpoint, as OpenAI's code does.
Text is tokenised with CLIP's byte-level BPE, which needs the vocabulary file
`bpe_simple_vocab_16e6.txt.gz` from the openai/CLIP repository.

Image preprocessing: bicubic resize of the shorter side to the model resolution (antialiased),
centre crop, CLIP mean/std normalisation.
"""

from __future__ import annotations

import gzip
import html
import math
import os
import re
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfm.checkpoint import state_dict_error

from .weights import WeightsNotFoundError, load_state_dict, sha256_file

__all__ = ["CLIP", "BPETokenizer", "load_clip", "clip_score"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_WEIGHTS_ENV, CLIP_VOCAB_ENV = "DFM_CLIP_WEIGHTS", "DFM_CLIP_VOCAB"

# ---------------------------------------------------------------- tokenizer


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map used by byte-level BPE (whitespace/control bytes moved)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _token_pattern():
    try:
        import regex

        letters, numbers = r"\p{L}+", r"\p{N}"
        return regex.compile(
            rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|{letters}|{numbers}|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
    except ImportError:  # `re` has no \p{..}: letters are word characters minus digits and underscore
        return re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.I)


class BPETokenizer:
    """CLIP's tokenizer: lower-cased, whitespace-normalised text -> byte-level BPE ids with SOT/EOT."""

    def __init__(self, vocab_path: str | Path) -> None:
        with gzip.open(vocab_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
        vocab = list(_bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.pattern = _token_pattern()
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(text)).strip().split()).lower()
        byte_map = _bytes_to_unicode()
        ids = []
        for token in self.pattern.findall(text):
            token = "".join(byte_map[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token))
        return ids

    def __call__(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        """(len(texts), context_length) int64 ids: SOT, tokens (truncated), EOT, zero padding."""
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text)][: context_length - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


# ---------------------------------------------------------------- model


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), with OpenAI's parameter names."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((resolution // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (N, T, W)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (N, E)


class CLIP(nn.Module):
    """OpenAI CLIP with a ViT image tower; `encode_image`, `encode_text` return unnormalised embeddings."""

    def __init__(
        self,
        embed_dim: int = 512,
        resolution: int = 224,
        vision_layers: int = 12,
        vision_width: int = 768,
        patch: int = 32,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int = 512,
        text_heads: int = 8,
        text_layers: int = 12,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.visual = VisionTransformer(resolution, patch, vision_width, vision_layers, vision_width // 64, embed_dim)
        self.transformer = Transformer(text_width, text_layers, text_heads)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> CLIP:
        """Build with the sizes implied by an OpenAI checkpoint and load it strictly."""
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)

        def count(prefix: str) -> int:  # number of distinct block indices under prefix
            return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

        text_width = state["ln_final.weight"].shape[0]
        model = cls(
            embed_dim=state["text_projection"].shape[1],
            resolution=patch * grid,
            vision_layers=count("visual.transformer.resblocks."),
            vision_width=width,
            patch=patch,
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            text_width=text_width,
            text_heads=text_width // 64,
            text_layers=count("transformer.resblocks."),
        )
        state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> shorter side resized to the model resolution, centre-cropped, normalised."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.resolution / min(h, w)
        size = (max(self.resolution, round(h * scale)), max(self.resolution, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
        x = x[..., top : top + self.resolution, left : left + self.resolution]
        return (x - x.new_tensor(CLIP_MEAN)[:, None, None]) / x.new_tensor(CLIP_STD)[:, None, None]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.preprocess(images.to(self.logit_scale.device)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.logit_scale.device)
        x = self.token_embedding(tokens) + self.positional_embedding  # (N, L, W)
        causal = torch.full((x.shape[1], x.shape[1]), float("-inf"), device=x.device).triu(1)
        x = self.ln_final(self.transformer(x, causal))
        return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ self.text_projection  # features at the EOT token


# ---------------------------------------------------------------- loading and the score


def _required_file(path: str | Path | None, env: str, what: str, how: str) -> Path:
    candidate = path or os.environ.get(env)
    if not candidate:
        raise WeightsNotFoundError(f"CLIP score needs {what}: pass it or export {env}=PATH ({how})")
    candidate = Path(candidate).expanduser()
    if not candidate.is_file():
        raise WeightsNotFoundError(f"CLIP {what} {candidate} does not exist; fix the path or unset ${env}")
    return candidate


def load_clip(weights: str | Path | None = None, vocab: str | Path | None = None) -> tuple[CLIP, BPETokenizer, dict]:
    """CLIP model, tokenizer and a protocol entry, from local files only (no download)."""
    weights = _required_file(weights, CLIP_WEIGHTS_ENV, "weights", "an OpenAI CLIP checkpoint such as ViT-L-14.pt")
    vocab = _required_file(vocab, CLIP_VOCAB_ENV, "a BPE vocabulary", "bpe_simple_vocab_16e6.txt.gz from openai/CLIP")
    try:  # OpenAI ships TorchScript archives; a plain state dict also works
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.jit.load(str(weights), map_location="cpu").state_dict()
    except RuntimeError:
        state = load_state_dict(weights)
    try:
        model = CLIP.from_state_dict(state).eval().requires_grad_(False)
    except (KeyError, RuntimeError, ValueError, AttributeError, IndexError, TypeError) as error:
        reason = f"no weight {error}" if isinstance(error, KeyError) else state_dict_error(error)
        raise ValueError(f"CLIP weights {weights} are not an OpenAI CLIP checkpoint ({reason}); pass one such as "
                         f"ViT-L-14.pt with --weights clip=PATH or ${CLIP_WEIGHTS_ENV}") from None  # fmt: skip
    protocol = {
        "name": "clip",
        "weights": str(weights),
        "weights_sha256": sha256_file(weights),
        "vocab_sha256": sha256_file(vocab),
        "resolution": model.resolution,
        "preprocessing": "bicubic shorter side + centre crop, CLIP mean/std",
    }
    return model, BPETokenizer(vocab), protocol


@torch.no_grad()
def clip_score(
    model: CLIP, tokenizer: BPETokenizer, images: torch.Tensor, prompts: list[str], batch_size: int = 64
) -> float:
    """Mean over samples of 100 * max(cos(image embedding, prompt embedding), 0)."""
    if len(prompts) != len(images):
        raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
    context = model.positional_embedding.shape[0]
    total = 0.0
    for start in range(0, len(images), batch_size):
        img = F.normalize(model.encode_image(images[start : start + batch_size]), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts[start : start + batch_size], context)), dim=-1)
        total += (100.0 * (img * txt).sum(-1).clamp_min(0)).sum().item()
    return total / len(images)
