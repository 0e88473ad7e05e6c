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
"""

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
