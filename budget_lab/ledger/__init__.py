"""The dollar ledger: what every run cost, what was wasted, and what a launch will cost.

- `Ledger(url)` (store.py): one row per segment (each time a job actually ran) in SQLite (WAL)
  or PostgreSQL; `upsert_segments`, `segments(...)`, `spent(...)`, `wasted(...)`, `report(by)`.
- `sync_run(ledger, run_dir, cluster)`, `sync_workspace(ledger, workspace)` (sync.py): sacct or
  segments.jsonl -> priced segments, idempotently; wasted dollars at preemptions, failures, cuts.
- `rebuild_ledger(workspace)` (rebuild.py): a lost or damaged SQLite ledger recreated from the
  run folders (`budget-lab cost sync --rebuild`); a damaged file raises `LedgerCorruptError`.
- `PriceBook` (prices.py): fixed, on-demand and AWS spot prices (piecewise over the history).
- `estimate_run(cfg, cluster, workspace)`, `format_estimate` (estimate.py) on calibrated
  throughput (calibration.py); `check_budget`, `check_figures`, `BudgetGuard` (caps.py).
- `CapPolicy` (cap_policy.py): a controller's budget-cap decisions (check, stop, kill, admit) on
  a clock passed in; `cap_sim.py` drives it through randomized simulated sweeps.
- `format_report` (report.py): `budget-lab cost report` as a table, CSV or JSON.

The names below are imported from their modules when first used (`budget_lab.lazy`): a module
of the ledger costs only what it imports itself (the calibration, which the benchmarks and the
GPU check use, loads no SQLAlchemy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from budget_lab.lazy import lazy_exports

if TYPE_CHECKING:
    from budget_lab.ledger.calibration import (
        PAPER,
        Calibration,
        CalibrationEntry,
        calibrate_benchmark,
        calibrate_from_run,
    )
    from budget_lab.ledger.cap_policy import CapJob, CapPolicy
    from budget_lab.ledger.caps import (
        BudgetError,
        BudgetGuard,
        GuardDecision,
        RunningJob,
        check_budget,
        check_figures,
        month_scope,
        month_start,
    )
    from budget_lab.ledger.estimate import (
        Estimate,
        PhaseEstimate,
        estimate_run,
        estimate_vs_settled,
        format_estimate,
        read_estimate,
        write_estimate,
    )
    from budget_lab.ledger.prices import PriceBook, Priced
    from budget_lab.ledger.rebuild import RebuildReport, rebuild_ledger
    from budget_lab.ledger.report import format_report
    from budget_lab.ledger.store import (
        Ledger,
        LedgerCorruptError,
        LedgerSchemaError,
        ReportRow,
        Segment,
    )
    from budget_lab.ledger.sync import SyncReport, sync_run, sync_workspace

_EXPORTS = {
    "PAPER": "budget_lab.ledger.calibration",
    "Calibration": "budget_lab.ledger.calibration",
    "CalibrationEntry": "budget_lab.ledger.calibration",
    "calibrate_benchmark": "budget_lab.ledger.calibration",
    "calibrate_from_run": "budget_lab.ledger.calibration",
    "CapJob": "budget_lab.ledger.cap_policy",
    "CapPolicy": "budget_lab.ledger.cap_policy",
    "BudgetError": "budget_lab.ledger.caps",
    "BudgetGuard": "budget_lab.ledger.caps",
    "GuardDecision": "budget_lab.ledger.caps",
    "RunningJob": "budget_lab.ledger.caps",
    "check_budget": "budget_lab.ledger.caps",
    "check_figures": "budget_lab.ledger.caps",
    "month_scope": "budget_lab.ledger.caps",
    "month_start": "budget_lab.ledger.caps",
    "Estimate": "budget_lab.ledger.estimate",
    "PhaseEstimate": "budget_lab.ledger.estimate",
    "estimate_run": "budget_lab.ledger.estimate",
    "estimate_vs_settled": "budget_lab.ledger.estimate",
    "format_estimate": "budget_lab.ledger.estimate",
    "read_estimate": "budget_lab.ledger.estimate",
    "write_estimate": "budget_lab.ledger.estimate",
    "PriceBook": "budget_lab.ledger.prices",
    "Priced": "budget_lab.ledger.prices",
    "RebuildReport": "budget_lab.ledger.rebuild",
    "rebuild_ledger": "budget_lab.ledger.rebuild",
    "format_report": "budget_lab.ledger.report",
    "Ledger": "budget_lab.ledger.store",
    "LedgerCorruptError": "budget_lab.ledger.store",
    "LedgerSchemaError": "budget_lab.ledger.store",
    "ReportRow": "budget_lab.ledger.store",
    "Segment": "budget_lab.ledger.store",
    "SyncReport": "budget_lab.ledger.sync",
    "sync_run": "budget_lab.ledger.sync",
    "sync_workspace": "budget_lab.ledger.sync",
}

__all__ = [
    "Ledger",
    "LedgerSchemaError",
    "LedgerCorruptError",
    "Segment",
    "ReportRow",
    "sync_run",
    "sync_workspace",
    "SyncReport",
    "rebuild_ledger",
    "RebuildReport",
    "PriceBook",
    "Priced",
    "estimate_run",
    "format_estimate",
    "write_estimate",
    "read_estimate",
    "estimate_vs_settled",
    "Estimate",
    "PhaseEstimate",
    "Calibration",
    "CalibrationEntry",
    "calibrate_benchmark",
    "calibrate_from_run",
    "PAPER",
    "check_budget",
    "check_figures",
    "BudgetError",
    "BudgetGuard",
    "RunningJob",
    "CapPolicy",
    "CapJob",
    "GuardDecision",
    "month_start",
    "month_scope",
    "format_report",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
