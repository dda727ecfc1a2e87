"""One process or many (torchrun): the process group, and DDP / FSDP2 / ``torch.compile`` around a model.

FSDP2 (``fully_shard``) shards every transformer block, then the root: our DiT's ``blocks`` (and the EMA alike, so
that its update stays local to each rank); a diffusers backbone's blocks named by its ``_no_split_modules``
(:func:`dfm.adapters.fsdp_wrap_modules`) with a bf16-parameter / fp32-reduce policy under bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, local_rank, device)


def finish_distributed() -> None:
    """Let every rank finish together, then leave the process group.

    Without this a rank that is done early (rank 0 still writes samples and the pretrained model) exits with the
    gloo/nccl group alive, and its teardown at interpreter exit can abort the process.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ema: nn.Module | None, d: Dist, strategy: str, precision: str, compile: bool,
         unused_parameters: bool = False) -> nn.Module:  # fmt: skip
    """The module the training step calls: ``model`` under DDP or sharded in place by FSDP2 (with the EMA),
    compiled if asked."""
    net = model
    if d.world > 1:
        if strategy == "fsdp" and hasattr(model, "trainable_state_dict"):  # a diffusers backbone
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            from dfm.adapters import fsdp_wrap_modules

            policy = MixedPrecisionPolicy()
            if precision == "bf16":
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            classes = fsdp_wrap_modules(model)
            for block in [m for m in model.modules() if isinstance(m, classes)]:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        elif strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for module in (model, ema):
                for block in getattr(module, "blocks", []):
                    fully_shard(block)
                fully_shard(module)
        else:
            net = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                find_unused_parameters=unused_parameters,
            )
    if compile:
        net = torch.compile(net)
    return net


def full_state_dict(module: nn.Module, fsdp: bool) -> dict[str, Tensor]:
    """The whole state dict of ``module`` (gathered to the CPU under FSDP: a collective, call it on every rank)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return module.state_dict()


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer's whole state (gathered under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # fmt: skip
    return optimizer.state_dict()


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def all_finite(tensors: list[Tensor], d: Dist) -> bool:
    """Whether every floating-point tensor (this rank's shard of a sharded one) is finite, on every rank."""
    local = [v.to_local() if hasattr(v, "to_local") else v for v in tensors]
    ok = all(bool(torch.isfinite(v).all()) for v in local if v.is_floating_point())
    flag = torch.tensor([float(ok)], device=d.device)
    if d.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
