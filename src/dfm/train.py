"""The training loop: one process or many (torchrun, DDP or FSDP2), bf16 autocast, EMA, atomic checkpoints.

Run it as ``dfm train --preset quickstart`` or ``torchrun --nproc_per_node 8 -m dfm train --preset ...``.

Reproducibility: all randomness of step k (which images, main stages, times, noise, label dropout) is drawn from
generators seeded by (seed, k) for the whole global batch, and each rank takes its slice. A run resumed from a
checkpoint therefore continues exactly as if it had never stopped, and 2 processes compute the same steps as 1
process at the same global batch. Data augmentation (flips, latent posterior draws) is the exception: each rank
draws it for its own slice from the step's data generator, so it matches across world sizes only in distribution.

Diffusers backbones (``model.backbone=flux|sd3``, :mod:`dfm.adapters`, set up by ``dfm finetune --from DIR``): the
model is the transformer of ``model.pretrained`` converted to the method's stages, trained on text latents
(``dfm prepare --text-encoder``) whose batches are :class:`~dfm.text.TextCondition`; label dropout becomes caption
dropout (a dropped caption is replaced by the empty prompt's embedding). Only parameters that require grad are
optimised (with LoRA: the LoRA weights and the new stage modules), and checkpoints hold only those (and the empty
prompt): the frozen weights come from ``model.pretrained`` again on resume. The EMA is optional (``optim.ema``; of
the trainable parameters only). FSDP2 shards every transformer block named by the transformer's
``_no_split_modules`` (:func:`dfm.adapters.fsdp_wrap_modules`), then the root, with a bf16-parameter / fp32-reduce
mixed-precision policy under ``train.precision=bf16``; our DiT shards its ``blocks`` as before. The finished model
is the adapter's ``save_pretrained`` in ``pretrained/``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfm.checkpoint import (
    atomic_write_text,
    clean_leftovers,
    ensure_writable,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from dfm.config import RunConfig
from dfm.data import build_dataset
from dfm.data.subset import ClassSubset
from dfm.decomposition import estimate_level_std
from dfm.factory import make_decomposition, make_model, make_objective
from dfm.finetune import init_from_one_stage
from dfm.generate import METHOD_FILE, load_run, sample_grid_files
from dfm.methods import get_method
from dfm.models import DFMDiT
from dfm.objective import DFMObjective
from dfm.text import TextCondition
from dfm.visual import plot_losses, read_metrics

CONFIG_FILE = "config.json"
DATA_SPEC_FILE = "data_spec.json"
METRICS_FILE = "metrics.jsonl"
#: Floor of a measured per-stage std: a level that is (nearly) constant in the data, e.g. the fine level of
#: flat-coloured images, would otherwise get an infinite input scale from the preconditioning.
MIN_DATA_STD = 1e-3
# Settings that only the sampler reads: a resumed run may change them (training does not depend on them).
SAMPLING_SETTINGS = {"method.steps", "method.thresholds", "method.solver", "method.guidance", "method.time_shift"}


class TrainingError(RuntimeError):
    """A problem the user can act on (bad data, diverged loss, mismatching checkpoint)."""


# ------------------------------------------------------------------------------------------------ distributed
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
    gloo/nccl group alive, and its teardown at interpreter exit can abort the process (seen as SIGABRT on CPU).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ randomness
def step_seed(seed: int, step: int, stream: int) -> int:
    """A seed for (run seed, step, stream) that never collides across steps of the same run."""
    return (seed * 1_000_003 + step) * 8 + stream


class EpochIndexer:
    """Global batch indices for any step: epochs are seeded permutations, so no state is needed to resume."""

    def __init__(self, size: int, batch: int, seed: int) -> None:
        self.size, self.batch, self.seed = size, batch, seed
        self._cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            self._cache = {
                epoch: torch.randperm(
                    self.size, generator=torch.Generator().manual_seed(step_seed(self.seed, epoch, 7))
                )
            }
        return self._cache[epoch]

    def __call__(self, step: int) -> Tensor:
        out, start = [], step * self.batch
        need = self.batch
        while need:
            epoch, off = divmod(start, self.size)
            take = self._perm(epoch)[off : off + need]
            out.append(take)
            need -= len(take)
            start += len(take)
        return torch.cat(out)


# ------------------------------------------------------------------------------------------------ EMA
@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


class TrainableEMA:
    """EMA of a model's trainable parameters only (diffusers backbones: frozen weights never change, and a copy of
    a 12B transformer would double the memory). Its state dict is keyed by the model's parameter names."""

    def __init__(self, model: nn.Module) -> None:
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def parameters(self):
        return iter(self.shadow.values())

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise RuntimeError(f"EMA keys differ: missing {sorted(set(self.shadow) - set(state))[:3]}, unexpected "
                               f"{sorted(set(state) - set(self.shadow))[:3]}")  # fmt: skip
        for name, value in state.items():
            self.shadow[name].copy_(value)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at optimiser step ``step`` (1-based); the warm-up keeps short runs from averaging the init."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Train a DFM (or Flow Matching) model as configured by a :class:`RunConfig` into ``run_dir``."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        resume: str | None = None,
        dist_info: Dist | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.method = get_method(cfg.method.method)
        self.run_dir = Path(run_dir)
        self.d = dist_info or Dist()
        self.progress = progress
        self._check_batch_and_output()
        self.dataset = self._open_dataset()
        self.sample_shape = tuple(self.dataset.sample_shape)
        self.num_classes = int(self.dataset.num_classes)
        self.adapter = cfg.model.backbone != "dit"  # a diffusers FLUX / SD3 transformer (dfm.adapters)
        self.empty_prompt = self._check_text()
        ckpt = self._resolve_resume(resume)
        # Pretrained weights to start from (fine-tuning); a resumed run has its own in the checkpoint.
        self.source = self._load_source() if cfg.train.init_from and ckpt is None else None
        self._measure_and_build_objective()
        ck = load_checkpoint(ckpt, map_location="cpu") if ckpt is not None else None
        self._build_model(ck, ckpt)
        self._build_optimizer()
        if ck is not None:
            self._load_state(ck, ckpt)
        self.indexer = EpochIndexer(len(self.dataset), cfg.train.batch_size, cfg.train.seed)
        if self.d.main:
            self._write_run_files()

    # -- setup steps (in the order __init__ runs them) ---------------------------------------------------------
    def _check_batch_and_output(self) -> None:
        """Threads, the per-rank batch, and a writable run directory (before any long work)."""
        tc = self.cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.batch_size % (self.d.world * tc.grad_accum):
            raise TrainingError(
                f"train.batch_size={tc.batch_size} must be divisible by world size x grad_accum "
                f"= {self.d.world} x {tc.grad_accum}"
            )
        self.local_batch = tc.batch_size // self.d.world
        self.micro_batch = self.local_batch // tc.grad_accum
        if self.d.main:  # a read-only --out fails now, not at the first checkpoint after hours of training
            for folder in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "samples"):
                ensure_writable(folder)
            clean_leftovers(self.run_dir / "checkpoints")

    def _open_dataset(self):
        """The training set; augmentation draws from a generator seeded per step (see train_step), so resumes
        are exact."""
        data = self.cfg.data
        extra = {"skip_bad": True} if data.skip_bad else {}
        try:
            dataset = build_dataset(
                data.dataset,
                data.resolution,
                train=True,
                data_dir=data.data_dir,
                random_flip=data.random_flip,
                frames=data.frames,
                num_clips=data.num_clips,
                **extra,
            )
        except TypeError:
            if not extra:
                raise
            raise TrainingError(f"data.skip_bad applies to image folders; {data.dataset!r} is not one") from None
        if data.classes is not None:
            dataset = ClassSubset(dataset, data.classes)
        if len(dataset) == 0:
            raise TrainingError(f"dataset {data.dataset!r} is empty")
        return dataset

    def _check_text(self) -> TextCondition | None:
        """Text latents go with a diffusers backbone and the reverse; the empty prompt of text latents."""
        text = getattr(self.dataset, "text", None) is not None
        if self.adapter and not text:
            raise TrainingError(
                f"model.backbone={self.cfg.model.backbone} trains on captioned latents: prepare the data with "
                "dfm prepare --text-encoder <model directory>"
            )
        if text and not self.adapter:
            raise TrainingError(
                f"{self.cfg.data.dataset} holds text embeddings: train a diffusers model on it (dfm finetune --from "
                "<FLUX or SD3 directory>)"
            )
        return self.dataset.empty_prompt if text else None

    def _measure_and_build_objective(self) -> None:
        """Measure what the config leaves to the data (level and data stds), then the decomposition and the
        objective; what the method decides at the start (the cascade's switch step) goes into the config."""
        m = self.cfg.method
        if m.standardize and m.level_std is None:
            m.level_std = self._estimate_level_std()
        self.decomposition = make_decomposition(m)
        needs_std = m.precondition or m.loss_weighting == "edm"
        if needs_std and m.data_std is None:
            m.data_std = self._estimate_data_std()
            if self.source is not None and self.source.config.precondition:
                # the pretrained model's input scaling: its std for the stage(s) it becomes (dfm.finetune)
                src_std = tuple(self.source.config.data_std)
                m.data_std = src_std if len(src_std) == len(m.data_std) else (src_std[0], *m.data_std[1:])
        self.objective: DFMObjective = make_objective(m, self.decomposition, self.cfg.train.steps)
        self.method.decide_at_start(m, self.objective)  # saved in config.json; a resumed run keeps it
        self.level_shapes_1 = self.decomposition.level_shapes((1, *self.sample_shape))

    def _build_model(self, ck: dict | None, ckpt: Path | None) -> None:
        """The model and its EMA (seeded), with the checkpoint's weights, then wrapped for DDP/FSDP/compile."""
        torch.manual_seed(self.cfg.train.seed)
        self.model = self._fresh_model().to(self.d.device)
        if self.source is not None:
            self._init_from_source()
        self.step = 0
        if not self.cfg.optim.ema:
            self.ema = None
        elif self.adapter:
            self.ema = TrainableEMA(self.model)
        else:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        if ck is not None:  # weights go in before sharding, so FSDP needs no special path for them
            self._load_weights(self.model, ck["model"], ckpt)
            if self.ema is not None:
                self._load_weights(self.ema, ck["ema"], ckpt)
        self.net = self._wrap(self.model)  # FSDP2 shards self.model (and the EMA alike) in place

    def _fresh_model(self) -> nn.Module:
        """The configured model (a diffusers backbone: converted from model.pretrained, with the empty prompt)."""
        model = make_model(self.cfg, self.sample_shape, self.num_classes)
        if self.adapter:
            model.set_empty_prompt(self.empty_prompt)
        return model

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_source(self) -> nn.Module:
        """The model of ``train.init_from`` (EMA weights of a run, or a ``pretrained/`` directory)."""
        path = self.cfg.train.init_from
        try:
            source, _ = load_run(path)
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(f"train.init_from: {err}") from None
        if not isinstance(source, DFMDiT):
            raise TrainingError(
                f"train.init_from={path}: fine-tuning starts from a DFM-DiT (not {type(source).__name__})"
            )
        m = self.cfg.method
        if source.config.precondition != m.precondition:
            on = str(source.config.precondition).lower()
            raise TrainingError(
                f"train.init_from={path} was trained with precondition={on}: set -o method.precondition={on} "
                "(dfm finetune does this for you)"
            )
        return source

    def _init_from_source(self) -> None:
        """Copy (same stages) or convert (one stage -> the method's stages) the pretrained weights."""
        source, path = self.source, self.cfg.train.init_from
        try:
            if source.config.num_stages == self.model.config.num_stages:
                if source.config != self.model.config:
                    raise ValueError("its config differs from this run's model: fine-tune the same model")
                self.model.load_state_dict(source.state_dict())
            else:
                init_from_one_stage(self.model, source)
        except ValueError as err:
            raise TrainingError(f"train.init_from={path}: {err}") from None

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        params = self.model.parameters()
        if self.adapter:  # LoRA: the LoRA weights and the new stage modules only
            params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        warm = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warm) if warm > 0 else 1.0
        )

    def _write_run_files(self) -> None:
        """config.json (with what was measured) and data_spec.json; drop log lines past the resumed step."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        # What the model needs to be rebuilt without opening the data set again (dfm sample, the benches).
        spec = {"sample_shape": list(self.sample_shape), "num_classes": self.num_classes,
                "padding": int(getattr(self.dataset, "padding", 0))}  # fmt: skip
        atomic_write_text(self.run_dir / DATA_SPEC_FILE, json.dumps(spec) + "\n")
        self._truncate_metrics()

    # -- setup helpers ---------------------------------------------------------------------------------------
    def _resolve_resume(self, resume: str | None) -> Path | None:
        if resume in (None, "", "none"):
            if (self.run_dir / "checkpoints").is_dir() and find_latest(self.run_dir / "checkpoints"):
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints: pass --resume auto to continue it, "
                    "or choose another --out"
                )
            return None
        path = find_latest(self.run_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            return None  # --resume auto on a fresh run directory starts from scratch
        if not path.is_dir():
            raise TrainingError(f"checkpoint {path} does not exist")
        saved = self.run_dir / CONFIG_FILE if resume == "auto" else path.parent.parent / CONFIG_FILE
        if saved.is_file():
            old = RunConfig.load(saved)
            adopt_run_measurements(old, self.cfg)
            diffs = resume_conflicts(old, self.cfg)
            if diffs:
                raise TrainingError(
                    f"checkpoint {path} was trained with another config ({'; '.join(diffs[:4])}): "
                    "resume with the same settings or start a new run"
                )
            changed = [d for d in _config_diff(old, self.cfg, ignore=set()) if d.split(":")[0] in SAMPLING_SETTINGS]
            if changed and self.d.main:
                print(
                    f"note: sampling settings changed on resume ({'; '.join(changed)}); they do not affect training",
                    file=sys.stderr,
                )
        return path

    def _std_batch(self) -> Tensor:
        """Up to 2,048 training samples, the same for a given seed: what per-stage stds are measured on."""
        n = min(len(self.dataset), 2048)
        idx = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.train.seed))[:n]
        return self.dataset.get_batch(idx, augment=False)[0]

    def _estimate_level_std(self) -> tuple[float, ...]:
        base = make_decomposition(self.cfg.method, standardized=False)
        return tuple(round(s, 6) for s in estimate_level_std(base, self._std_batch()))

    def _estimate_data_std(self) -> tuple[float, ...]:
        """The std of what each stage's network sees, for preconditioning: the (standardised) levels of the
        decomposition; for the cascade, the low-resolution image and the full image."""
        stds = self.method.measure_data_std(self.cfg.method, self.decomposition, self._std_batch())
        if min(stds) < MIN_DATA_STD and self.d.main:
            print(f"note: measured level stds {tuple(round(s, 6) for s in stds)}: a (nearly) constant level is "
                  f"preconditioned as if its std were {MIN_DATA_STD}", file=sys.stderr)  # fmt: skip
        return tuple(round(max(s, MIN_DATA_STD), 6) for s in stds)

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.d.world > 1:
            if self.cfg.train.distributed == "fsdp" and self.adapter:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                from dfm.adapters import fsdp_wrap_modules

                policy = MixedPrecisionPolicy()
                if self.cfg.train.precision == "bf16":
                    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                classes = fsdp_wrap_modules(model)
                for block in [m for m in model.modules() if isinstance(m, classes)]:
                    fully_shard(block, mp_policy=policy)
                fully_shard(model, mp_policy=policy)
            elif self.cfg.train.distributed == "fsdp":
                from torch.distributed.fsdp import fully_shard

                # The EMA is sharded like the model so that its update is local to each rank.
                for module in (model, self.ema):
                    for block in getattr(module, "blocks", []):
                        fully_shard(block)
                    fully_shard(module)
            else:
                net = nn.parallel.DistributedDataParallel(
                    model,
                    device_ids=[self.d.local_rank] if self.d.device.type == "cuda" else None,
                    find_unused_parameters=self.method.unused_parameters,
                )
        if self.cfg.train.compile:
            net = torch.compile(net)
        return net

    def _full_state(self, module: nn.Module) -> dict[str, Tensor]:
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return module.state_dict()

    def _model_state(self) -> dict[str, Tensor]:
        """The model's checkpointed weights: all of them; a diffusers backbone's trainable ones and the empty prompt
        (its frozen weights are model.pretrained's). A collective under FSDP."""
        state = self._full_state(self.model)
        if self.adapter:
            keep = self._trainable_names()
            state = {k: v for k, v in state.items() if k in keep or k.startswith("empty_")}
        return state

    @property
    def _fsdp(self) -> bool:
        return self.d.world > 1 and self.cfg.train.distributed == "fsdp"

    def _load_weights(self, module: nn.Module, state: dict[str, Tensor], path: Path) -> None:
        try:
            if self.adapter and module is self.model:  # trainable weights and the empty prompt only
                expected = self._trainable_names() | {"empty_prompt_embeds", "empty_pooled"}
                if set(state) != expected:
                    raise RuntimeError(f"it holds other weights than the trainable ones: missing "
                                       f"{sorted(expected - set(state))[:3]}, unexpected "
                                       f"{sorted(set(state) - expected)[:3]}")  # fmt: skip
                module.load_state_dict(state, strict=False)
            else:
                module.load_state_dict(state)
        except RuntimeError as err:
            raise TrainingError(f"checkpoint {path} does not fit this model: {str(err).splitlines()[0]}") from None

    def _load_state(self, ck: dict, path: Path) -> None:
        st = ck["state"]
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer, st["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng_cpu"])
        self.step = int(st["step"])
        if self.d.main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint we resumed from (they will be written again), and a last
        line torn by a crash or a full disk."""
        f = self.run_dir / METRICS_FILE
        if not f.is_file():
            return
        keep = [row for row in read_metrics(f) if row.get("step", 0) <= self.step]
        atomic_write_text(f, "".join(json.dumps(row) + "\n" for row in keep))

    # -- one step --------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        B = cfg.train.batch_size
        index = self.indexer(step)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1))
        shapes = [(B, *s[1:]) for s in self.level_shapes_1]
        self.objective.begin_step(step, self.model, self.ema)  # the cascade switches from stage 1 to 2 here
        draw = self.objective.draw(shapes, generator=gen)
        drop = torch.rand(B, generator=gen) < cfg.method.label_dropout
        data_gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 2))
        torch.manual_seed(step_seed(cfg.train.seed, step, 3))  # anything else random inside the step

        lo = self.d.rank * self.local_batch
        # Augmentation (flips, latent posterior draws) uses a generator seeded per step, so resumes are exact.
        x_all, y_all = self.dataset.get_batch(index[lo : lo + self.local_batch], generator=data_gen)
        if isinstance(y_all, TextCondition):  # caption dropout: the empty prompt instead
            y_all = y_all.where(drop[lo : lo + self.local_batch], self.empty_prompt)
        else:
            y_all = torch.where(drop[lo : lo + self.local_batch], torch.full_like(y_all, self.num_classes), y_all)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        stage_sum = torch.zeros(self.objective.num_stages)
        count_sum = torch.zeros(self.objective.num_stages)
        loss_sum = 0.0
        accum = cfg.train.grad_accum
        for m in range(accum):
            a, b = m * self.micro_batch, (m + 1) * self.micro_batch
            x = x_all[a:b].to(self.d.device, non_blocking=True)
            y = (
                y_all[a:b].to(self.d.device)
                if isinstance(y_all, TextCondition)
                else y_all[a:b].to(self.d.device, non_blocking=True)
            )
            sub = draw[lo + a : lo + b]
            sub.main_stage, sub.t = sub.main_stage.to(self.d.device), sub.t.to(self.d.device)
            sub.noise = [n.to(self.d.device) for n in sub.noise]
            sync = contextlib.nullcontext()
            if m < accum - 1 and isinstance(self.net, nn.parallel.DistributedDataParallel):
                sync = self.net.no_sync()
            with sync, self._autocast():
                out = self.objective.loss(self.net, x, y, draw=sub)
            (out.loss / accum).backward()
            loss_sum += float(out.loss.detach()) / accum
            stage_sum += (out.stage_losses.float() * out.stage_counts.float()).cpu()
            count_sum += out.stage_counts.float().cpu()
        stats = torch.cat([torch.tensor([loss_sum]), stage_sum, count_sum])
        if self.d.world > 1:
            dist.all_reduce(stats)
            stats[0] /= self.d.world
        loss = float(stats[0])
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {step + 1}: lower optim.lr, keep optim.grad_clip on, or use "
                "train.precision=fp32; the last checkpoint is intact"
            )
        clip = cfg.optim.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf")))
        if not math.isfinite(grad_norm):
            raise TrainingError(
                f"the gradient norm became {grad_norm} at step {step + 1}: lower optim.lr, keep optim.grad_clip on, "
                "or use train.precision=fp32; the last checkpoint is intact"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        decay = ema_decay_at(self.step, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        if isinstance(self.ema, TrainableEMA):
            self.ema.update(self.model, decay)
        elif self.ema is not None:
            update_ema(self.ema, self.model, decay)
        s = self.objective.num_stages
        stage_loss = (stats[1 : 1 + s] / stats[1 + s :].clamp(min=1)).tolist()
        return {
            "step": self.step,
            "loss": loss,
            "stage_loss": stage_loss,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
        }

    # -- checkpoints and samples -------------------------------------------------------------------------------
    def _weights_finite(self) -> bool:
        """Whether the weights, the EMA and the optimizer moments are all finite, on every rank."""
        tensors = [*self.model.parameters(), *(self.ema.parameters() if self.ema is not None else [])]
        tensors += [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        local = [v.to_local() if hasattr(v, "to_local") else v for v in tensors]  # FSDP: this rank's shard
        local = [v for v in local if v.is_floating_point()]
        ok = torch.tensor([float(all(bool(torch.isfinite(v).all()) for v in local))], device=self.d.device)
        if self.d.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def save(self) -> Path | None:
        """Write a checkpoint; refuse (``TrainingError``) when the state holds inf or NaN, so that ``latest``
        always names weights that can be resumed and sampled."""
        if not self._weights_finite():
            last = find_latest(self.run_dir / "checkpoints")
            kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
            raise TrainingError(
                f"the weights became inf or NaN by step {self.step}: lower optim.lr or keep optim.grad_clip on; "
                f"not saving them: {kept}"
            )
        model_state = self._model_state()
        if self.ema is None:
            ema_state = {}  # no EMA: samples use the model's weights
        elif isinstance(self.ema, TrainableEMA):
            ema_state = self.ema.state_dict()
        else:
            ema_state = self._full_state(self.ema)
        optim_state = self.optimizer.state_dict()
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        if not self.d.main:
            return None
        state = {
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "step": self.step,
        }
        path = save_checkpoint(
            self.run_dir / "checkpoints", self.step, model_state, ema_state, state, self.cfg.train.keep_last
        )
        return path

    def ema_model(self) -> nn.Module | None:
        """An unsharded EMA model on rank 0 (a collective under FSDP: call it on every rank); without an EMA
        (``optim.ema=false``), the model's weights."""
        if isinstance(self.ema, TrainableEMA):  # not with FSDP (config.validate)
            if not self.d.main:
                return None
            full = copy.deepcopy(self.model)
            full.load_state_dict(self.ema.state_dict(), strict=False)
            return full.eval()
        source = self.model if self.ema is None else self.ema
        if not self._fsdp:
            return source if self.d.main else None
        state = self._model_state() if self.ema is None else self._full_state(self.ema)
        if not self.d.main:
            return None
        full = self._fresh_model()
        full.load_state_dict(state, strict=not self.adapter)
        return full.to(self.d.device).eval()

    def write_samples(self) -> Path | None:
        ema = self.ema_model()
        if ema is None:
            return None
        return sample_grid_files(
            ema,
            self.decomposition,
            self.cfg,
            self.run_dir / "samples",
            self.step,
            self.num_classes,
            self.sample_shape,
            self.cfg.train.num_sample_images,
            decoder=getattr(self.dataset, "decode", None),
            text=self._sample_captions(),
        )

    def _sample_captions(self) -> TextCondition | None:
        """Text runs: the periodic samples show the first training captions (cycled), sampled with guidance."""
        if self.empty_prompt is None:
            return None
        n = self.cfg.train.num_sample_images
        return self.dataset.text_condition(torch.arange(n) % len(self.dataset))

    # -- loop ------------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg = self.cfg
        tc = cfg.train
        bar = None
        if self.d.main and self.progress:
            bar = tqdm(total=tc.steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0)
        writer = None
        if self.d.main and tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise TrainingError(
                    "train.tensorboard needs the tensorboard package: pip install 'dfm[tensorboard]'"
                ) from err
            writer = SummaryWriter(str(self.run_dir / "tb"))
        metrics = open(self.run_dir / METRICS_FILE, "a") if self.d.main else None
        tic, imgs = time.perf_counter(), 0
        try:
            while self.step < tc.steps:
                row = self.train_step()
                imgs += tc.batch_size
                if bar is not None:
                    bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    now = time.perf_counter()
                    row["images_per_s"] = imgs / max(now - tic, 1e-9)
                    tic, imgs = now, 0
                    if metrics is not None:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    if bar is not None:
                        stages = " ".join(f"{v:.3f}" for v in row["stage_loss"])
                        bar.set_postfix_str(f"loss {row['loss']:.4f} [{stages}] {row['images_per_s']:.0f} img/s")
                    if writer is not None:
                        writer.add_scalar("loss", row["loss"], self.step)
                        for s, v in enumerate(row["stage_loss"]):
                            writer.add_scalar(f"stage_loss/{s + 1}", v, self.step)
                        writer.add_scalar("lr", row["lr"], self.step)
                if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or self.step == tc.steps:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step != tc.steps:
                    self.write_samples()
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        self.write_samples()
        ema = self.ema_model()
        if ema is not None:
            plot_losses(self.run_dir / METRICS_FILE, self.run_dir / "loss.png")
            ema.save_pretrained(self.run_dir / "pretrained")
            self.cfg.save(self.run_dir / "pretrained" / METHOD_FILE)
            shutil.copyfile(self.run_dir / DATA_SPEC_FILE, self.run_dir / "pretrained" / DATA_SPEC_FILE)
        return self.run_dir


#: Settings a resumed run may change: bookkeeping, threads, the preset's name and what only the sampler reads.
RESUMABLE_SETTINGS = {
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.tensorboard",
    "train.threads",
    "train.num_sample_images",
    "preset",
    *SAMPLING_SETTINGS,
}


def adopt_run_measurements(old: RunConfig, cfg: RunConfig) -> None:
    """Copy into ``cfg``, where it leaves them open, what a run measured or decided at its start (``old``): the
    level and data stds, and e.g. the cascade's switch step."""

    for key in ("level_std", "data_std"):
        if getattr(old.method, key) is not None and getattr(cfg.method, key) is None:
            setattr(cfg.method, key, getattr(old.method, key))
    if old.method.method == cfg.method.method:
        for key in get_method(old.method.method).decided_at_start:
            if old.method.options.get(key) is not None and cfg.method.options.get(key) is None:
                cfg.method.options[key] = old.method.options[key]


def resume_conflicts(old: RunConfig, cfg: RunConfig) -> list[str]:
    """How ``cfg`` differs from the config a run was trained with (``old``), as ``key: old -> new`` lines; empty
    when it may continue that run. ``cfg`` is not changed; what the run measured at its start is not a conflict."""

    cfg = copy.deepcopy(cfg)
    adopt_run_measurements(old, cfg)
    return _config_diff(old, cfg, ignore=RESUMABLE_SETTINGS)


def _config_diff(a: RunConfig, b: RunConfig, ignore: set[str]) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    out = []
    for section in da:
        if isinstance(da[section], dict):
            for k in sorted(set(da[section]) | set(db.get(section, {}))):
                key = f"{section}.{k}"
                va, vb = da[section].get(k), db[section].get(k)
                if key not in ignore and _norm(va) != _norm(vb):
                    out.append(f"{key}: {va} -> {vb}")
        elif section not in ignore and da[section] != db.get(section):
            out.append(f"{section}: {da[section]} -> {db.get(section)}")
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


if __name__ == "__main__":  # the entry point of earlier versions; the command line is `dfm` (python -m dfm)
    sys.exit("dfm.train is a library module: run `dfm train ...`, `python -m dfm train ...` or "
             "`torchrun ... -m dfm train ...`")  # fmt: skip
