"""Training: the loop (:class:`Trainer`) and, beside it, distributed wrapping, the EMA, checkpoint I/O and data."""

from dfm.training.distributed import Dist, finish_distributed, init_distributed
from dfm.training.state import TrainingError
from dfm.training.trainer import Trainer

__all__ = ["Dist", "Trainer", "TrainingError", "finish_distributed", "init_distributed"]
