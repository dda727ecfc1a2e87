"""LoRA (peft, through diffusers' ``add_adapter``) on the transformer blocks of a DFM adapter."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

#: suffixes of the Linear layers inside transformer blocks that LoRA targets by default (FLUX and SD3 names)
DEFAULT_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)  # fmt: skip


def block_classes(transformer: nn.Module) -> tuple[type[nn.Module], ...]:
    """The module classes named in ``transformer._no_split_modules`` that occur in it (its transformer blocks)."""
    names = set(getattr(transformer, "_no_split_modules", None) or ())
    found: dict[str, type[nn.Module]] = {}
    for module in transformer.modules():
        if type(module).__name__ in names:
            found.setdefault(type(module).__name__, type(module))
    return tuple(found.values())


def lora_target_names(transformer: nn.Module, suffixes: Sequence[str] = DEFAULT_LORA_TARGETS) -> list[str]:
    """Sorted full names of the ``nn.Linear`` layers inside transformer blocks whose name is or ends with one of
    ``suffixes`` (full names, so that the adapter's ``proj_out`` wrapper and new stage modules are never targeted)."""
    classes = block_classes(transformer)
    blocks = [name for name, m in transformer.named_modules() if isinstance(m, classes)]
    names = []
    for name, module in transformer.named_modules():
        inside = any(name.startswith(block + ".") for block in blocks)
        if inside and isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    return sorted(names)


def add_lora(
    adapter: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] | None = None,
    adapter_name: str = "dfm",
) -> list[str]:
    """Add LoRA (peft, via diffusers' ``add_adapter``) to the transformer blocks and freeze the pretrained weights.

    ``target_modules``: name suffixes (default :data:`DEFAULT_LORA_TARGETS`) or full names, resolved to full names
    inside transformer blocks. Afterwards only the LoRA weights and the new stage modules require grad; LoRA's B
    starts at zero, so the outputs are unchanged. Returns the targeted module names.
    """
    from peft import LoraConfig

    transformer = adapter.transformer
    names = lora_target_names(transformer, tuple(target_modules or DEFAULT_LORA_TARGETS))
    if not names:
        raise ValueError(f"no Linear layer in the transformer blocks matches {target_modules}")
    transformer.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=names, init_lora_weights=True)
    transformer.add_adapter(config, adapter_name=adapter_name)
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
    for _, param in adapter.stage_parameters():
        param.requires_grad_(True)
    adapter.lora_settings = {"rank": int(rank), "alpha": float(alpha), "target_modules": names,
                             "adapter_name": adapter_name}  # fmt: skip
    return names
