"""Training: the phased trainer and its atomic checkpoints."""

from budget_lab.train.checkpoint import CheckpointStore
from budget_lab.train.trainer import Trainer, lr_factor, read_result

__all__ = ["Trainer", "CheckpointStore", "lr_factor", "read_result"]
