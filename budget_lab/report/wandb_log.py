"""W&B logging for training runs: one W&B run per budget-lab run, across requeues.

The W&B run id is derived from the run folder, and `resume="allow"` continues it, so a requeued
or resumed job appends to the same W&B run instead of creating a duplicate. With no API key
(WANDB_API_KEY or a ~/.netrc entry) W&B runs offline and the run can be synced later with
`wandb sync`. Credentials are never written into the run folder or the logged config.

W&B never fails a training run: WANDB_MODE=offline / disabled in the environment wins over the
recipe; an online run whose service cannot be reached (no network, a firewall) logs offline
instead; and any W&B error, at start or later, is a warning after which training goes on without
W&B (`init_wandb_run` returns None, `SafeRun` stops logging).
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from budget_lab.config import RunConfig, run_config_to_dict

__all__ = ["wandb_run_id", "wandb_mode", "init_wandb_run", "SafeRun"]

#: Seconds to reach the W&B service (a TCP connect) before logging offline instead.
PROBE_TIMEOUT_S = 3.0
#: Seconds `wandb.init` may take online (W&B's default is 90) before falling back to offline.
INIT_TIMEOUT_S = 30.0


def wandb_run_id(run_dir: str | os.PathLike[str]) -> str:
    """A stable id for the run folder (the same after a requeue, on any node)."""
    return "bl-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def wandb_mode(requested: str) -> str:
    """The mode W&B runs in. WANDB_MODE=offline (or dryrun) / disabled, or WANDB_DISABLED=true, in
    the environment wins over the recipe's `wandb.mode`; 'auto' is online only with an API key."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    if requested != "auto":
        return requested
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or (Path.home() / ".netrc").is_file()
        and ("api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore"))
    )
    return "online" if has_key else "offline"


def service_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B server (WANDB_BASE_URL), or to the proxy that reaches
    it, opens within `timeout` seconds."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class SafeRun:
    """A W&B run whose `log` and `finish` never raise: the first error is a warning and the run
    is dropped (training goes on; what was logged so far stays in the run folder)."""

    def __init__(self, run: Any):
        self.run = run

    def log(self, data: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data)
        except Exception as err:  # noqa: BLE001 - W&B never fails training
            warnings.warn(
                f"W&B logging failed ({err!r}); training goes on without W&B", stacklevel=2
            )
            self.finish()

    def finish(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B could not finish its run ({err!r})", stacklevel=2)


def init_wandb_run(cfg: RunConfig, run_dir: str | os.PathLike[str], segment: int) -> SafeRun | None:
    """Start (or resume) the W&B run of a run folder; None, with a warning, when W&B is disabled
    or cannot start at all."""
    try:
        import wandb

        run_dir = Path(run_dir)
        mode = wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return None
        if mode == "offline" and cfg.wandb.mode == "auto" and not os.environ.get("WANDB_MODE"):
            print(
                "W&B: no API key found, logging offline (sync later with `wandb sync`)", flush=True
            )
        if mode == "online" and not service_reachable():
            warnings.warn(
                f"W&B: cannot reach {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')}; "
                "logging offline (sync later with `wandb sync`)",
                stacklevel=2,
            )
            mode = "offline"

        def start(mode: str):
            return wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                id=wandb_run_id(run_dir),
                name=run_dir.name,
                resume="allow",
                mode=mode,
                dir=str(run_dir),
                config={**run_config_to_dict(cfg), "segment": segment},
                settings=wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S),
            )

        try:
            run = start(mode)
        except Exception as err:
            if mode != "online":
                raise
            warnings.warn(
                f"W&B did not start online ({type(err).__name__}: {str(err)[:200]}); logging "
                "offline (sync later with `wandb sync`)",
                stacklevel=2,
            )
            run = start("offline")
        # Dollars as an x-axis: cost_usd only grows (the job's clock counts every segment,
        # requeues included), so charts against it never fold back the way a step axis does
        # after a requeue.
        try:
            run.define_metric("train/cost_usd")
            run.define_metric("train/*", step_metric="train/cost_usd")
        except Exception as err:  # noqa: BLE001 - charts against the step instead
            warnings.warn(f"W&B: cannot set the cost axis ({err!r})", stacklevel=2)
        return SafeRun(run)
    except Exception as err:  # noqa: BLE001 - W&B never fails training
        warnings.warn(
            f"W&B could not start ({type(err).__name__}: {str(err)[:200]}); training goes on "
            "without W&B",
            stacklevel=2,
        )
        return None
