"""How many parameters the DFM conversion adds to full-size FLUX.1-dev and SD3-medium, and how many LoRA trains.

Builds each diffusers transformer from its published configuration on the meta device (shapes only, no memory, no
weights needed), converts it with the package's adapter (stage factors (2, 1)) and counts the parameters of the real
modules: the pretrained transformer, the new stage modules (``StageAdapter.stage_parameters``: the fine stage's
patch embedding, timestep embedder, final norm, output head and the stage embedding), and the LoRA weights that
``add_lora`` adds at ``--rank`` with the default targets (:data:`dfm.adapters.DEFAULT_LORA_TARGETS`). A ``--lora``
fine-tune trains the LoRA weights plus the new stage modules. Pure CPU, seconds:

    python benchmarks/adapter_params.py [--rank 16] [--json out.json]

Configurations used (the ``transformer/config.json`` of the diffusers repositories):

- FLUX.1-dev (``black-forest-labs/FLUX.1-dev``): patch_size 1, in_channels 64, 19 double-stream and 38
  single-stream blocks, 24 heads x 128, joint_attention_dim 4096 (T5-XXL), pooled_projection_dim 768 (CLIP-L),
  guidance_embeds True, axes_dims_rope (16, 56, 56).
- SD3-medium (``stabilityai/stable-diffusion-3-medium-diffusers``): sample_size 128, patch_size 2, in_channels 16,
  out_channels 16, 24 joint blocks, 24 heads x 64, joint_attention_dim 4096, caption_projection_dim 1536,
  pooled_projection_dim 2048 (CLIP-L 768 + CLIP-G 1280), pos_embed_max_size 192 (no dual attention, no QK norm:
  those are SD3.5's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}  # fmt: skip


def count(params) -> int:
    return sum(p.numel() for p in params)


def measure(kind: str, rank: int) -> dict[str, object]:
    """Parameter counts of one full-size model, converted on the meta device."""
    import diffusers

    from dfm.adapters import FluxDFMAdapter, SD3DFMAdapter, add_lora

    transformer_cls, config, adapter_cls = {
        "flux": (diffusers.FluxTransformer2DModel, FLUX_DEV, FluxDFMAdapter),
        "sd3": (diffusers.SD3Transformer2DModel, SD3_MEDIUM, SD3DFMAdapter),
    }[kind]
    with torch.device("meta"):
        transformer = transformer_cls(**config)
        base = count(transformer.parameters())
        adapter = adapter_cls(transformer, (2, 1))
        new = dict(adapter.stage_parameters())
        if set(map(id, new.values())) & {id(p) for n, p in transformer.named_parameters() if ".base." in n}:
            raise RuntimeError("a stage parameter is a pretrained one")
        total = count(adapter.parameters())
        targets = add_lora(adapter, rank, float(rank))
    lora = count(p for n, p in adapter.named_parameters() if ".lora_" in n)
    per_module: dict[str, int] = {}
    for name, p in new.items():
        module = name.split(".stages.")[0].split(".stage_embedding")[0]
        per_module[module] = per_module.get(module, 0) + p.numel()
    if total != base + count(new.values()):
        raise RuntimeError(f"{kind}: converted model has {total} parameters, expected {base} + {count(new.values())}")
    return {"model": kind, "base": base, "new_stage": count(new.values()), "new_by_module": per_module,
            "lora_rank": rank, "lora_targets": len(targets), "lora": lora}  # fmt: skip


def human(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha = rank)")
    parser.add_argument("--json", type=Path, help="also write the counts as JSON")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [measure("flux", args.rank), measure("sd3", args.rank)]
    names = {"flux": "FLUX.1-dev", "sd3": "SD3-medium"}
    print(f"DFM conversion with stage factors (2, 1); LoRA rank {args.rank} on the default targets")
    header = (
        f"{'model':<12} {'base params':>16} {'new-stage params':>17} {'new %':>7} {'LoRA params':>14} {'LoRA %':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base, new, lora = r["base"], r["new_stage"], r["lora"]
        print(f"{names[r['model']]:<12} {base:>16,} {new:>17,} {100 * new / base:>6.3f}% {lora:>14,} "
              f"{100 * lora / base:>6.3f}%")  # fmt: skip
    print()
    for r in rows:
        parts = ", ".join(f"{k} {human(v)}" for k, v in r["new_by_module"].items())
        trainable = r["lora"] + r["new_stage"]
        print(f"{names[r['model']]}: base {human(r['base'])}; new stage modules: {parts}; LoRA on "
              f"{r['lora_targets']} Linear layers; a --lora {args.rank} run trains {human(trainable)} "
              f"({100 * trainable / r['base']:.3f}% of the base)")  # fmt: skip
    print(f"\n(meta device, {time.perf_counter() - start:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
