"""A run directory, in one place: what it holds, how each layout loads, and what resuming it may change.

Layouts that :meth:`Run.open` reads::

    run/                    a training run: config.json, data_spec.json, checkpoints/ (dfm.checkpoint), metrics.jsonl,
                            samples/, and when it finished pretrained/
    run/pretrained/         the finished network (its own save_pretrained files), dfm_run.json (the run's config)
                            and data_spec.json; DFMPipeline.save_pretrained adds model_index.json and, for a latent
                            run, its autoencoder in vae/
    a save_pretrained directory of a bare DFMDiT (config.json + model.safetensors): a DFM of its stages with the
                            default sampler

``config.json`` and ``dfm_run.json`` hold a :class:`~dfm.config.RunConfig`; ``data_spec.json`` a :class:`DataSpec`,
so that a run samples without opening its data set. Directories written before 2026-12-05 (format 1: sampling
settings in the method section, preconditioning inside the network) load the same way.

Example:
    >>> run = Run.open("runs/quickstart")                                    # doctest: +SKIP
    >>> network = run.load_network()                      # EMA weights of the latest checkpoint # doctest: +SKIP
    >>> run.config.sampler.steps, run.spec.sample_shape                      # doctest: +SKIP
    ((15, 5), (1, 32, 32))
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfm.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    atomic_write_text,
    find_latest,
    first_mismatch,
    load_weights,
    non_finite,
    state_dict_error,
)
from dfm.config import FORMAT, RESUMABLE, RunConfig, config_diff
from dfm.methods import Method, get_method
from dfm.models.config import DiTConfig
from dfm.models.dit import CONFIG_NAME, WEIGHTS_NAME
from dfm.resolve import resolve

CONFIG_FILE = "config.json"
DATA_SPEC_FILE = "data_spec.json"
RUN_CONFIG_FILE = "dfm_run.json"  #: the RunConfig beside a save_pretrained network
CHECKPOINTS = "checkpoints"
PRETRAINED = "pretrained"
PIPELINE_INDEX = "model_index.json"
VAE_DIR = "vae"


@dataclass(frozen=True)
class DataSpec:
    """What a network needs to know of its data: the sample shape (C, H, W) or (C, T, H, W) in model space, the
    number of classes (0: unconditional or text), and the padding the data set added on every side (which saved
    images drop again to compare with the real data, e.g. 2 for 32x32 Fashion-MNIST)."""

    sample_shape: tuple[int, ...]
    num_classes: int
    padding: int = 0

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({**asdict(self), "sample_shape": list(self.sample_shape)}) + "\n")

    @classmethod
    def load(cls, path: Path) -> DataSpec:
        try:
            d = json.loads(path.read_text())
            return cls(tuple(int(v) for v in d["sample_shape"]), int(d["num_classes"]), int(d.get("padding", 0)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: the run's directory is incomplete") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from the run") from None


class Run:
    """An opened run directory (:meth:`open`): its resolved config, its data spec, and its weights on demand."""

    def __init__(self, path: Path, kind: str, config: RunConfig, spec: DataSpec, format: int = FORMAT) -> None:
        self.path = path
        self.kind = kind  #: "training" (a run directory), "pretrained" or "bare" (a save_pretrained directory)
        self.config = config
        self.spec = spec
        self.format = format  #: 1 for directories written before the preconditioning left the network

    # -- opening
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        """The run in ``path``: a training run, its ``pretrained/`` directory, or a bare ``DFMDiT`` directory."""
        path = Path(path)
        if (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS).is_dir():
            config, fmt = _read_config(path / CONFIG_FILE)
            return cls(path, "training", config, DataSpec.load(path / DATA_SPEC_FILE), fmt)
        if (path / RUN_CONFIG_FILE).is_file():
            config, fmt = _read_config(path / RUN_CONFIG_FILE)
            return cls(path, "pretrained", config, DataSpec.load(path / DATA_SPEC_FILE), fmt)
        if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
            return cls._bare(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: give a run directory or its pretrained/ directory")
        raise FileNotFoundError(
            f"{path} is neither a run directory (config.json + checkpoints/) nor a save_pretrained one "
            f"({RUN_CONFIG_FILE} or {CONFIG_NAME} + {WEIGHTS_NAME})"
        )

    @classmethod
    def _bare(cls, path: Path) -> Run:
        """A DFMDiT saved on its own: the default DFM (Laplacian pyramid) of its stages, or Flow Matching."""
        data = json.loads((path / CONFIG_NAME).read_text())
        precondition, data_std = bool(data.pop("precondition", False)), data.pop("data_std", None)
        data.pop("model_type", None)
        model = DiTConfig.from_dict(data)
        config = RunConfig()
        config.method.stages = model.num_stages
        config.method.precondition, config.method.data_std = precondition, data_std and tuple(data_std)
        if model.num_stages == 1:
            config.method.name, config.sampler.steps, config.sampler.thresholds = "fm", (40,), ()
        spec = DataSpec((model.in_channels, *model.input_size), model.num_classes)
        return cls(path, "bare", resolve(config), spec, 1 if precondition else 2)

    # -- what it holds
    @property
    def method(self) -> Method:
        return get_method(self.config.method.name)

    @property
    def has_ema(self) -> bool:
        """Whether a training run kept an EMA of its weights to choose from (a save_pretrained directory holds one
        set of weights: :meth:`weights_are_ema` says which)."""
        return self.kind == "training" and self.config.optim.ema

    def weights_are_ema(self, ema: bool = True) -> bool | None:
        """Whether :meth:`load_network` with ``ema`` gives EMA weights (None: a bare network does not say)."""
        if self.kind == "bare":
            return None
        return self.config.optim.ema and (ema or self.kind != "training")

    def checkpoint(self, checkpoint: str | os.PathLike[str] | None = None) -> Path | None:
        """The checkpoint a training run loads: ``checkpoint`` if given, else its latest complete one (None when it
        has none yet, and for save_pretrained directories)."""
        if self.kind != "training":
            if checkpoint is not None:
                raise ValueError(f"{self.path} is a save_pretrained directory: it has no checkpoints to choose from")
            return None
        if checkpoint is not None:
            return Path(checkpoint)
        return find_latest(self.path / CHECKPOINTS)

    # -- weights
    def load_network(
        self, ema: bool = True, checkpoint: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
    ) -> nn.Module:
        """The run's network in eval mode: the EMA weights (``ema`` and the run kept one, else the trained ones) of
        ``checkpoint`` or the latest checkpoint, or the weights of a save_pretrained directory. Refuses weights that
        hold inf or NaN."""
        if self.kind != "training":
            network = self.method.load_network(self.path, self.config, format1=self.format == 1)
            return _require_finite(network, self.path).to(device).eval()
        ckpt = self.checkpoint(checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"{self.path} has no complete checkpoint yet: train longer or pass another run")
        network = self.method.network(self.config, self.spec.sample_shape, self.spec.num_classes)
        use_ema = ema and self.has_ema
        if hasattr(network, "load_trainable_state_dict"):  # a diffusers backbone: its trainable weights only
            state = {**load_weights(ckpt, ema=False), **(load_weights(ckpt, ema=True) if use_ema else {})}
            load = network.load_trainable_state_dict
        else:
            state, load = load_weights(ckpt, ema=use_ema), network.load_state_dict
        try:
            reason = first_mismatch(network.state_dict(), state)
            if reason is None:
                load(state)
        except (RuntimeError, ValueError) as err:
            reason = state_dict_error(err)
        if reason is not None:
            raise ValueError(
                f"{ckpt} does not fit the run config {self.path / CONFIG_FILE}: {reason}; it belongs to another run, "
                "or the config was edited"
            ) from None
        return _require_finite(network, ckpt / (EMA_FILE if use_ema else MODEL_FILE)).to(device).eval()

    def velocity_model(self, network: Any) -> Any:
        """What the run's sampler integrates: the network in its method's preconditioning, if it had one."""
        return self.method.velocity_model(network, self.config.method)

    def decoder(self, device: str | torch.device = "cpu") -> Any:
        """The autoencoder that decodes a latent run's samples (a :class:`dfm.data.vae.VAE`); None for pixel runs.
        A ``DFMPipeline.save_pretrained`` directory carries its own in ``vae/``; else the one recorded by
        ``dfm prepare`` with the latents."""
        from dfm.data.latents import is_latent_dir, read_latent_info
        from dfm.data.vae import load_vae

        index = self.path / PIPELINE_INDEX
        if (self.path / VAE_DIR).is_dir() and index.is_file():
            norm = json.loads(index.read_text()).get("vae_normalisation", {})
            return load_vae(self.path / VAE_DIR, device=device, shift=norm.get("shift"), scale=norm.get("scale"))
        if not is_latent_dir(Path(self.config.data.dataset)):
            return None
        info = read_latent_info(Path(self.config.data.dataset))
        return load_vae(info["vae"], device=device, shift=info.get("shift"), scale=info.get("scale"))

    def text_encoder_record(self) -> dict[str, Any]:
        """What ``dfm prepare --text-encoder`` recorded for a text-to-image run (encoder path, max length)."""
        from dfm.data.latents import read_latent_info

        return read_latent_info(self.config.data.dataset).get("text") or {}

    # -- writing
    @staticmethod
    def save_pretrained(network: nn.Module, directory: str | os.PathLike[str], config: RunConfig,
                        spec: DataSpec) -> Path:  # fmt: skip
        """Write a save_pretrained directory that :meth:`open` reads: the network, its run config and data spec."""
        path = Path(directory)
        network.save_pretrained(path)
        atomic_write_text(path / RUN_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        spec.save(path / DATA_SPEC_FILE)
        return path


def _read_config(file: Path) -> tuple[RunConfig, int]:
    """A run config and the format it was written in, resolved (the method's options filled in)."""
    try:
        fmt = int(json.loads(file.read_text()).get("format", 1))
    except (ValueError, AttributeError):
        fmt = FORMAT  # RunConfig.load says what is wrong with it
    return resolve(RunConfig.load(file)), fmt


def _require_finite(network: nn.Module, source: Path) -> nn.Module:
    bad = non_finite(network.state_dict())
    if bad:
        raise ValueError(
            f"{source} holds inf or NaN weights ({len(bad)} tensors, e.g. {bad[0]}): the run diverged; sample an "
            "earlier checkpoint with --checkpoint, or retrain with a lower learning rate"
        )
    return network


# ------------------------------------------------------------------------------------------------ resuming
def adopt_measurements(old: RunConfig, cfg: RunConfig) -> None:
    """Copy into ``cfg``, where it leaves them open, what a run measured or decided at its start (``old``): the
    level and data stds, and e.g. the cascade's switch step."""
    for key in ("level_std", "data_std"):
        if getattr(old.method, key) is not None and getattr(cfg.method, key) is None:
            setattr(cfg.method, key, getattr(old.method, key))
    if old.method.name == cfg.method.name:
        for key in get_method(old.method.name).decided_at_start:
            if old.method.options.get(key) is not None and cfg.method.options.get(key) is None:
                cfg.method.options[key] = old.method.options[key]


def resume_conflicts(old: RunConfig, cfg: RunConfig) -> list[str]:
    """How ``cfg`` differs from the config a run was trained with (``old``), as ``key: old -> new`` lines; empty
    when it may continue that run. ``cfg`` is not changed; what the run measured at its start is not a conflict."""
    cfg = copy.deepcopy(cfg)
    adopt_measurements(old, cfg)
    return config_diff(old, cfg, ignore=RESUMABLE)
