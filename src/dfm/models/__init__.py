"""Backbones: the DFM-DiT family (a DiT with per-stage embeddings and heads) and its name registry."""

from dfm.models.config import DiTConfig
from dfm.models.dit import DFMDiT
from dfm.models.precondition import Preconditioned, flow_preconditioning
from dfm.models.registry import MODEL_REGISTRY, count_parameters, create_config, create_model

__all__ = [
    "MODEL_REGISTRY",
    "DFMDiT",
    "DiTConfig",
    "Preconditioned",
    "count_parameters",
    "create_config",
    "create_model",
    "flow_preconditioning",
]
