"""W&B logging for training runs: one W&B run per budget-lab run, across requeues.

The W&B run id is derived from the run folder, and `resume="allow"` continues it, so a requeued
or resumed job appends to the same W&B run instead of creating a duplicate. With no API key
(WANDB_API_KEY or a ~/.netrc entry) W&B runs offline and the run can be synced later with
`wandb sync`. Credentials are never written into the run folder or the logged config.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from budget_lab.config import RunConfig, run_config_to_dict

__all__ = ["wandb_run_id", "wandb_mode", "init_wandb_run"]


def wandb_run_id(run_dir: str | os.PathLike[str]) -> str:
    """A stable id for the run folder (the same after a requeue, on any node)."""
    return "bl-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def wandb_mode(requested: str) -> str:
    """'online' only when asked and a key is available; 'auto' picks offline without a key."""
    if requested != "auto":
        return requested
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or (Path.home() / ".netrc").is_file()
        and ("api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore"))
    )
    return "online" if has_key else "offline"


def init_wandb_run(cfg: RunConfig, run_dir: str | os.PathLike[str], segment: int) -> Any:
    import wandb

    run_dir = Path(run_dir)
    mode = wandb_mode(cfg.wandb.mode)
    if mode == "offline" and cfg.wandb.mode == "auto":
        print("W&B: no API key found, logging offline (sync later with `wandb sync`)", flush=True)
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        id=wandb_run_id(run_dir),
        name=run_dir.name,
        resume="allow",
        mode=mode,
        dir=str(run_dir),
        config={**run_config_to_dict(cfg), "segment": segment},
        settings=wandb.Settings(silent=True, console="off"),
    )
    # Dollars as an x-axis: cost_usd only grows (the job's clock counts every segment, requeues
    # included), so charts against it never fold back the way a step axis does after a requeue.
    run.define_metric("train/cost_usd")
    run.define_metric("train/*", step_metric="train/cost_usd")
    return run
