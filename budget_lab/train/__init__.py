"""Training: the phased trainer, its optimizer and its atomic checkpoints.

trainer.py      `Trainer`: the phases of a run, resumed from the latest checkpoint
optim.py        AdamW's parameter groups and the learning-rate schedule (`lr_factor`)
checkpoint.py   `CheckpointStore` (never half-written) and what a checkpoint holds (`TrainState`)
"""

from budget_lab.rundir import read_result
from budget_lab.train.checkpoint import CheckpointStore, TrainState
from budget_lab.train.optim import lr_factor
from budget_lab.train.trainer import Trainer

__all__ = ["Trainer", "CheckpointStore", "TrainState", "lr_factor", "read_result"]
