"""The training loop: one process or many (torchrun, DDP or FSDP2), bf16 autocast, EMA, atomic checkpoints.

Run it as ``dfm train --preset quickstart`` or ``torchrun --nproc_per_node 8 -m dfm train --preset ...``.

The loop knows nothing of the method: the run's method (:mod:`dfm.methods`) gives the network, the velocity model
around it (preconditioning), the objective and the callbacks it needs between steps (the cascade's stage switch).
Distributed wrapping, the EMA, checkpoint I/O and the data (with the stds measured at the start) live in the
modules beside this one; :mod:`dfm.training.data` states the reproducibility guarantee (a resumed run continues
exactly as if it had never stopped).

Diffusers backbones (``model.backbone=flux|sd3``, :mod:`dfm.adapters`, set up by ``dfm finetune --from DIR``) train
on text latents (``dfm prepare --text-encoder``) whose batches are :class:`~dfm.text.TextCondition`; label dropout
becomes caption dropout (a dropped caption is replaced by the empty prompt's embedding). Only parameters that
require grad are optimised, and checkpoints hold only those and the empty prompt (the model's
``trainable_state_dict``): the frozen weights come from ``model.pretrained`` again on resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dfm.checkpoint import atomic_write_text, clean_leftovers, ensure_writable, find_latest, load_checkpoint
from dfm.config import RunConfig
from dfm.finetune import load_source, source_data_std
from dfm.generate import Generator, write_sample_grid
from dfm.methods import get_method
from dfm.resolve import resolve
from dfm.run import CHECKPOINTS, CONFIG_FILE, DATA_SPEC_FILE, PRETRAINED, DataSpec, Run
from dfm.text import TextCondition
from dfm.training.data import EpochIndexer, measure_stds, open_dataset, step_seed
from dfm.training.distributed import Dist, all_finite, wrap
from dfm.training.ema import TrainableEMA, create_ema, ema_decay_at, update_ema
from dfm.training.log import METRICS_FILE, TrainingLog, truncate_log
from dfm.training.state import (
    TrainingError,
    ema_state,
    load_training_state,
    load_weights_into,
    model_state,
    resume_checkpoint,
    save,
)
from dfm.visual import plot_losses


class Trainer:
    """Train the model of a :class:`RunConfig` into ``run_dir`` (``resume``: None, ``"auto"`` or a checkpoint)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = None, dist_info: Dist | None = None,
                 progress: bool = True) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.d, self.progress = resolve(cfg), Path(run_dir), dist_info or Dist(), progress
        tc, m = cfg.train, cfg.method
        self.method = get_method(m.name)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.batch_size % (self.d.world * tc.grad_accum):
            raise TrainingError(f"train.batch_size={tc.batch_size} must be divisible by world size x grad_accum "
                                f"= {self.d.world} x {tc.grad_accum}")  # fmt: skip
        self.local_batch = tc.batch_size // self.d.world
        self.micro_batch = self.local_batch // tc.grad_accum
        if self.d.main:  # a read-only --out fails now, not at the first checkpoint after hours of training
            for folder in (self.run_dir, self.run_dir / CHECKPOINTS, self.run_dir / "samples"):
                ensure_writable(folder)
            clean_leftovers(self.run_dir / CHECKPOINTS)
        self.dataset = open_dataset(cfg.data)
        self.spec = DataSpec(tuple(self.dataset.sample_shape), int(self.dataset.num_classes),
                             int(getattr(self.dataset, "padding", 0)))  # fmt: skip
        self.empty_prompt = self._check_text()
        ckpt = resume_checkpoint(self.run_dir, resume, cfg, self.d.main)
        # Pretrained weights to start from (fine-tuning); a resumed run has its own in the checkpoint.
        source, source_network = self._source() if tc.init_from and ckpt is None else (None, None)
        measured = m.data_std is None
        measure_stds(self.method, m, self.dataset, tc.seed, self.d.main)
        if source is not None and measured:
            m.data_std = source_data_std(source.config, m, m.data_std)
        self.decomposition = self.method.decomposition(m)
        self.objective = self.method.objective(m, self.decomposition, tc.steps)
        self.method.decide_at_start(m, self.objective)  # saved in config.json; a resumed run keeps it
        self.callbacks = self.method.callbacks(m, self.objective)
        self.level_shapes_1 = self.decomposition.level_shapes((1, *self.spec.sample_shape))

        torch.manual_seed(tc.seed)
        self.model = self._fresh_model().to(self.d.device)
        if source is not None:
            try:
                load_source(self.model, source_network, source.config, cfg)
            except ValueError as err:
                raise TrainingError(str(err)) from None
        self.ema = create_ema(self.model, cfg.optim.ema)
        checkpoint = load_checkpoint(ckpt, map_location="cpu") if ckpt is not None else None
        if checkpoint is not None:  # weights go in before sharding, so FSDP needs no special path for them
            load_weights_into(self.model, self.ema, checkpoint, ckpt)
        self.net = wrap(self.model, self.ema, self.d, tc.distributed, tc.precision, tc.compile,
                        self.method.unused_parameters)  # fmt: skip
        self.velocity = self.method.velocity_model(self.net, m)
        o = cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: its weights and the new stages
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        warm = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warm) if warm > 0 else 1.0
        )
        self.step = 0
        if checkpoint is not None:
            self.step = load_training_state(checkpoint, self.model, self.optimizer, self.scheduler, self._fsdp, ckpt)
            if self.d.main:
                print(f"resumed from {ckpt} at step {self.step}", file=sys.stderr)
        self.indexer = EpochIndexer(len(self.dataset), tc.batch_size, tc.seed)
        if self.d.main:  # config.json holds what was measured; data_spec.json lets a run sample without its data
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
            self.spec.save(self.run_dir / DATA_SPEC_FILE)
            truncate_log(self.run_dir, self.step)

    @property
    def _fsdp(self) -> bool:
        return self.d.world > 1 and self.cfg.train.distributed == "fsdp"

    def _source(self) -> tuple[Run, nn.Module]:
        """The run of ``train.init_from`` and its network (EMA weights)."""
        try:
            source = Run.open(self.cfg.train.init_from)
            return source, source.load_network()
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(f"train.init_from: {err}") from None

    def _check_text(self) -> TextCondition | None:
        """Text latents go with a diffusers backbone and the reverse; the empty prompt of text latents."""
        text = getattr(self.dataset, "text", None) is not None
        adapter = self.cfg.model.backbone != "dit"
        if adapter and not text:
            raise TrainingError(f"model.backbone={self.cfg.model.backbone} trains on captioned latents: prepare the "
                                "data with dfm prepare --text-encoder <model directory>")  # fmt: skip
        if text and not adapter:
            raise TrainingError(f"{self.cfg.data.dataset} holds text embeddings: train a diffusers model on it (dfm "
                                "finetune --from <FLUX or SD3 directory>)")  # fmt: skip
        return self.dataset.empty_prompt if text else None

    def _fresh_model(self) -> nn.Module:
        model = self.method.network(self.cfg, self.spec.sample_shape, self.spec.num_classes)
        if self.empty_prompt is not None:
            model.set_empty_prompt(self.empty_prompt)
        return model

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- one step --------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, step, dev = self.cfg, self.step, self.d.device
        B = cfg.train.batch_size
        index = self.indexer(step)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1))
        for callback in self.callbacks:
            callback.on_step_begin(step, self.model, self.ema)
        draw = self.objective.draw([(B, *s[1:]) for s in self.level_shapes_1], generator=gen, step=step)
        drop = torch.rand(B, generator=gen) < cfg.method.label_dropout
        data_gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 2))
        torch.manual_seed(step_seed(cfg.train.seed, step, 3))  # anything else random inside the step

        lo = self.d.rank * self.local_batch
        # Augmentation (flips, latent posterior draws) uses a generator seeded per step, so resumes are exact.
        x_all, y_all = self.dataset.get_batch(index[lo : lo + self.local_batch], generator=data_gen)
        dropped = drop[lo : lo + self.local_batch]
        if isinstance(y_all, TextCondition):  # caption dropout: the empty prompt instead
            y_all = y_all.where(dropped, self.empty_prompt)
        else:
            y_all = torch.where(dropped, torch.full_like(y_all, self.spec.num_classes), y_all)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        s_count, accum = self.objective.num_stages, cfg.train.grad_accum
        stage_sum, count_sum, loss_sum = torch.zeros(s_count), torch.zeros(s_count), 0.0
        for k in range(accum):
            a, b = k * self.micro_batch, (k + 1) * self.micro_batch
            x, y = x_all[a:b].to(dev, non_blocking=True), y_all[a:b].to(dev)
            sub = draw[lo + a : lo + b]
            sub.main_stage, sub.t, sub.noise = sub.main_stage.to(dev), sub.t.to(dev), [n.to(dev) for n in sub.noise]
            sync = contextlib.nullcontext()
            if k < accum - 1 and isinstance(self.net, nn.parallel.DistributedDataParallel):
                sync = self.net.no_sync()
            with sync, self._autocast():
                out = self.objective.loss(self.velocity, x, y, draw=sub)
            (out.loss / accum).backward()
            loss_sum += float(out.loss.detach()) / accum
            stage_sum += (out.stage_losses.float() * out.stage_counts.float()).cpu()
            count_sum += out.stage_counts.float().cpu()
        stats = torch.cat([torch.tensor([loss_sum]), stage_sum, count_sum])
        if self.d.world > 1:
            dist.all_reduce(stats)
            stats[0] /= self.d.world
        loss = float(stats[0])
        clip = cfg.optim.grad_clip
        grad_norm = float("nan")
        if math.isfinite(loss):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
            raise TrainingError(f"{what} at step {step + 1}: lower optim.lr, keep optim.grad_clip on, or use "
                                "train.precision=fp32; the last checkpoint is intact")  # fmt: skip
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        update_ema(self.ema, self.model, ema_decay_at(self.step, cfg.optim.ema_decay, cfg.optim.ema_warmup))
        stage_loss = (stats[1 : 1 + s_count] / stats[1 + s_count :].clamp(min=1)).tolist()
        return {"step": self.step, "loss": loss, "stage_loss": stage_loss, "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0]}  # fmt: skip

    # -- checkpoints and samples -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint; refuse (``TrainingError``) when the weights, the EMA or the optimizer moments hold
        inf or NaN, so that ``latest`` always names weights that can be resumed and sampled."""
        tensors = [*self.model.parameters(), *(self.ema.parameters() if self.ema is not None else [])]
        tensors += [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        if not all_finite(tensors, self.d):
            last = find_latest(self.run_dir / CHECKPOINTS)
            kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
            raise TrainingError(f"the weights became inf or NaN by step {self.step}: lower optim.lr or keep "
                                f"optim.grad_clip on; not saving them: {kept}")  # fmt: skip
        return save(self.run_dir, self.step, self.model, self.ema, self.optimizer, self.scheduler, self.d,
                          self._fsdp, self.cfg.train.keep_last)  # fmt: skip

    def ema_model(self) -> nn.Module | None:
        """An unsharded EMA model on rank 0 (a collective under FSDP: call it on every rank); without an EMA
        (``optim.ema=false``), the model's weights."""
        if isinstance(self.ema, TrainableEMA):  # not with FSDP (resolve refuses it)
            return self.ema.copy_into(self.model) if self.d.main else None
        source = self.model if self.ema is None else self.ema
        if not self._fsdp:
            return source if self.d.main else None
        weights = model_state(self.model, True) if self.ema is None else ema_state(self.ema, True)
        if not self.d.main:
            return None
        full = self._fresh_model()
        full.load_state_dict(weights)
        return full.to(self.d.device).eval()

    def write_samples(self) -> Path | None:
        ema = self.ema_model()
        if ema is None:
            return None
        text = None
        if self.empty_prompt is not None:  # text runs: the first training captions (cycled)
            n = self.cfg.train.num_sample_images
            text = self.dataset.text_condition(torch.arange(n) % len(self.dataset))
        decoder = self.dataset.autoencoder(self.d.device) if hasattr(self.dataset, "autoencoder") else None
        generator = Generator(ema, self.cfg, self.spec, decoder)
        return write_sample_grid(generator, self.run_dir / "samples", self.step, self.cfg.train.num_sample_images,
                                 text, self.cfg.train.precision)  # fmt: skip

    # -- loop ------------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        tc = self.cfg.train
        log = None
        if self.d.main:
            log = TrainingLog(self.run_dir, tc.steps, self.step, self.progress, tc.tensorboard)
        tic, imgs = time.perf_counter(), 0
        try:
            while self.step < tc.steps:
                row = self.train_step()
                imgs += tc.batch_size
                if log is not None:
                    log.step()
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    now = time.perf_counter()
                    row["images_per_s"] = imgs / max(now - tic, 1e-9)
                    tic, imgs = now, 0
                    if log is not None:
                        log.write(row)
                if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or self.step == tc.steps:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step != tc.steps:
                    self.write_samples()
        finally:
            if log is not None:
                log.close()
        self.write_samples()
        ema = self.ema_model()
        if ema is not None:
            plot_losses(self.run_dir / METRICS_FILE, self.run_dir / "loss.png")
            Run.save_pretrained(ema, self.run_dir / PRETRAINED, self.cfg, self.spec)
        return self.run_dir
