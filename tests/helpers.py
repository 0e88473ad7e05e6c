"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from budget_lab.config import compose_run


def tiny_run_config(data_dir, *extra):
    """The nano recipe cut to two tiny phases (6 masked + 4 finetune steps at batch 8) on the
    `train_data_dir` fixture's data, checkpointing every 3 steps and logging every step."""
    return compose_run(
        "nano",
        [
            f"data.path={data_dir}",
            "phases.0.steps=6",
            "phases.0.warmup_steps=2",
            "phases.0.batch_size=8",
            "phases.1.steps=4",
            "phases.1.batch_size=8",
            "checkpoint.every=3",
            "log_every=1",
            "eval.grid_size=0",
            *extra,
        ],
    )
