"""Sync: turn a run folder into priced ledger segments, idempotently.

    segments = sync_run(ledger, "workspace/runs/mask_ratio-007", cluster,
                        price_cache_dir=workspace.prices_cache_dir)
    report = sync_workspace(ledger, workspace)     # every run folder with a launch.json

Where the time comes from:

- Slurm (`launch.json` executor "slurm"): `sacct -X -D` lists every run of each job id (those of
  launch.json and of segments.jsonl, so earlier launches of the run count too); GPU-seconds =
  ElapsedRaw x gres/gpu (a CPU-only job counts one device per node). Right after a run ends its
  last row may still be missing or RUNNING: sync polls sacct for up to `sacct_wait_s`.
- local: the job wrapper's `segments.jsonl`, wall clock x devices (a CPU-only machine is 1). A
  segment without an end row was killed hard; it ends at its last sign of life (a metrics or
  checkpoint row), or is still running if its process is alive on this host: the rule of
  `budget_lab.rundir.segment_rows`, which a job's own spend so far uses too.

Wasted dollars (part of the cost, reported apart from useful spend):
- a segment that ended without finishing (preempted, requeued, timed out, killed, failed) wastes
  the time since its last checkpoint (checkpoints.jsonl) - that work is redone;
- every segment of a run whose result.json says "failed" is wasted;
- every segment of a run "cut" by a cap is wasted (a sweep trial stopped at its own planned trial
  budget is not: that stop is the trial's result).

Where the dollars went (`Segment.parts`): each segment's cost is split over the run's own clock,
`activity.jsonl` (budget_lab.launch.activity: startup, train per phase, checkpoint, eval,
sample_grid, idle), priced over time as the segment is (a spot price change between two spans is
honoured). Time no span covers is start-up before the first span, "other" after the trainer's
end, and, in a segment that ended without finishing or still runs, training in the last phase
seen. Time after a STOP request (the STOP file's time) is idle. Wasted dollars are split the same
way, so a preemption's lost work lands in the phase (and activity) that lost it. A segment without
any span (a run from before activity.jsonl) is training in its phase if it logged metrics, else
start-up. The parts always sum to the segment's cost and wasted dollars.

Every segment is keyed, so syncing again updates rows (a running segment grows, a fallback price
is replaced by the real one) and never duplicates them; a controller that crashes just syncs
again. A real price already in the ledger is never replaced by a catalog estimate.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budget_lab.errors import ConfigError, UserError
from budget_lab.io import read_jsonl
from budget_lab.launch.cluster import load_cluster
from budget_lab.launch.local import segment_alive
from budget_lab.ledger.calibration import learn_from_run
from budget_lab.ledger.prices import ClusterLike, PriceBook, Priced, PricePiece
from budget_lab.ledger.sacct import SacctRecord, poll_sacct, sacct_records
from budget_lab.ledger.store import Ledger, LedgerCorruptError, Segment, SegmentPart
from budget_lab.rundir import (
    PLANNED_CUTS,
    RunDir,
    cut_kind,
    read_launch,
    read_result,
    read_stop,
    segment_rows,
)
from budget_lab.workspace import Workspace

__all__ = ["sync_run", "sync_workspace", "SyncReport", "TERMINAL_RUN_STATUSES"]

#: result.json statuses after which nothing of the run runs any more.
TERMINAL_RUN_STATUSES = frozenset({"completed", "failed", "cut"})
# Segment states that end without the work since the last checkpoint being kept.
_LOSSY_STATES = frozenset(
    {
        "PREEMPTED",
        "REQUEUED",
        "TIMEOUT",
        "FAILED",
        "NODE_FAIL",
        "CANCELLED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "KILLED",
        "INTERRUPTED",
    }
)


@dataclass
class _Span:
    """One time the job ran, before pricing."""

    job_id: str
    key: str
    start: float
    seconds: float  # time held (Slurm: ElapsedRaw)
    gpus: int  # devices held over all nodes
    nodes: int
    state: str
    partition: str | None = None

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclass
class SyncReport:
    """What `sync_workspace` did."""

    runs: int = 0  # run folders synced
    skipped: list[str] = field(default_factory=list)  # run folders without launch.json
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # run -> error message
    warnings: list[str] = field(default_factory=list)
    learned: list[str] = field(default_factory=list)  # settled runs the calibration learned from


# -- where the time comes from -------------------------------------------------------------------


def _segment_rows(run_dir: Path, *, ended_at_last_sign_of_life: bool) -> list[dict[str, Any]]:
    """segments.jsonl through the job's own reader (`budget_lab.rundir.segment_rows`), so that
    the ledger and a job's spend-so-far apply one rule: a segment without an end row whose process
    is gone was killed hard and ends at its last sign of life."""
    live = (lambda seg, last: segment_alive(seg)) if ended_at_last_sign_of_life else None
    try:
        return segment_rows(run_dir, live)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{RunDir(run_dir).segments} has a malformed row ({type(err).__name__}: {err}); it "
            "is written by the job wrapper only: restore it from a backup or move the run folder "
            "out of the workspace"
        ) from None


def _local_spans(run_dir: Path, cluster: ClusterLike, run: str, now: float) -> list[_Span]:
    spans = []
    for seg in _segment_rows(run_dir, ended_at_last_sign_of_life=True):
        start, end, state = float(seg["start"]), seg["end"], str(seg["status"]).upper()
        if end is None:  # no end row and its process is alive here: still running
            end, state = now, "RUNNING"
        job_id = str(seg.get("job_id") or "")
        spans.append(
            _Span(
                job_id=job_id,
                key=f"{cluster.name}/{run}/{job_id}/{seg['attempt']}",
                start=start,
                seconds=max(float(end) - start, 0.0),
                gpus=max(int(seg.get("devices") or 1), 1),
                nodes=1,
                state=state,
            )
        )
    return spans


def _slurm_spans(
    job_ids: Sequence[str],
    cluster: ClusterLike,
    run_finished: bool,
    now: float,
    sacct_wait_s: float,
    query: Callable[[Sequence[str]], list[SacctRecord]],
) -> list[_Span]:
    def complete(records: list[SacctRecord]) -> bool:
        """Whether each job's last record is a final one (a run that is over never ends on a
        requeue: its next run's record is still to come)."""
        if not run_finished:  # a live run: what sacct says now is what there is
            return True
        for job in job_ids:
            mine = [r for r in records if r.job_id == job]
            if not mine or any(r.start is None for r in mine):
                return False
            last = max(mine, key=lambda r: r.start or 0.0)
            if not last.finished or last.state in ("REQUEUED", "PREEMPTED"):
                return False
        return True

    records = poll_sacct(job_ids, complete, timeout_s=sacct_wait_s, query=query)
    spans = []
    for r in records:
        if r.start is None:  # pending: nothing ran, nothing to pay
            continue
        devices = r.gpus if r.gpus > 0 else max(r.nodes, 1)
        seconds = float(r.elapsed_s)
        state = r.state
        if r.end is None:
            state = "RUNNING"
            seconds = max(seconds, now - r.start)
        spans.append(
            _Span(
                job_id=r.job_id,
                key=f"{cluster.name}/{r.job_id}/{int(r.start)}",
                start=r.start,
                seconds=seconds,
                gpus=devices,
                nodes=r.nodes,
                state=state,
                partition=r.partition,
            )
        )
    return spans


# -- what it was for, and what was lost ----------------------------------------------------------


def _phase(
    span: _Span, metrics: list[dict[str, Any]], checkpoints: list[dict[str, Any]]
) -> str | None:
    """The phase the span trained most (by metrics rows), else the one it resumed into."""
    inside = Counter(
        str(r["phase"])
        for r in [*metrics, *checkpoints]
        if "phase" in r and span.start <= float(r.get("time", -1)) <= span.end
    )
    if inside:
        return inside.most_common(1)[0][0]
    before = [
        r for r in [*metrics, *checkpoints] if "phase" in r and float(r.get("time", 0)) < span.start
    ]
    if before:
        return str(max(before, key=lambda r: float(r["time"]))["phase"])
    return None


def _waste(
    span: _Span,
    priced: Priced,
    run_status: str | None,
    result: dict[str, Any],
    checkpoint_times: list[float],
) -> tuple[float, str | None]:
    if run_status == "failed":
        return priced.cost_usd, "run failed"
    # A planned cut (a trial's stop at its own budget, a pruned trial) is not waste; others are.
    if run_status == "cut" and cut_kind(result) not in PLANNED_CUTS:
        return priced.cost_usd, f"run cut ({result.get('cut_reason') or 'budget cap'})"
    if span.state not in _LOSSY_STATES:
        return 0.0, None
    saved = [t for t in checkpoint_times if span.start <= t <= span.end]
    since = max(saved, default=span.start)
    lost = priced.cost_between(since, span.end)
    what = "last checkpoint" if saved else "segment start (no checkpoint in it)"
    return lost, f"{span.state.lower()}: {(span.end - since) / 60:.1f} min since {what}"


def _lost_since(span: _Span, checkpoint_times: list[float]) -> float:
    """When the work a lossy segment threw away began: its last checkpoint, else its start."""
    return max((t for t in checkpoint_times if span.start <= t <= span.end), default=span.start)


def _timeline(
    span: _Span,
    activity: list[dict[str, Any]],
    phase: str | None,
    has_metrics: bool,
    stop_time: float | None,
) -> list[tuple[float, float, str, str | None]]:
    """[(t0, t1, activity, phase)] covering the span, from the activity rows inside it."""
    rows = sorted(
        (
            (max(float(r["start"]), span.start), min(float(r["end"]), span.end), r)
            for r in activity
            if float(r["end"]) > span.start and float(r["start"]) < span.end
        ),
        key=lambda x: x[0],
    )
    out: list[tuple[float, float, str, str | None]] = []
    cursor, last_phase = span.start, phase
    for t0, t1, row in rows:
        row_phase = row.get("phase") if row.get("phase") is not None else last_phase
        if t0 > cursor:  # before the first span: start-up; between two: the job's own time
            out.append((cursor, t0, "startup" if not out else "other", row_phase))
        if t1 > max(t0, cursor):
            out.append((max(t0, cursor), t1, str(row["activity"]), row_phase))
            cursor = t1
        last_phase = row_phase
    if cursor < span.end:
        if not out:
            what = "train" if has_metrics else "startup"
        elif span.state == "RUNNING" or span.state in _LOSSY_STATES:
            what = "train"  # the open span a kill or the clock cut short: most likely training
        else:
            what = "other"
        out.append((cursor, span.end, what, last_phase))
    if stop_time is not None and span.start < stop_time < span.end:
        cut = []
        for t0, t1, what, ph in out:
            if t1 <= stop_time or what == "eval":  # a final FID after a planned stop is paid for
                cut.append((t0, t1, what, ph))
            elif t0 >= stop_time:
                cut.append((t0, t1, "idle", ph))
            else:
                cut += [(t0, stop_time, what, ph), (stop_time, t1, "idle", ph)]
        out = cut
    return out


def _split(
    span: _Span,
    priced: Priced,
    wasted: float,
    wasted_from: float | None,
    timeline: list[tuple[float, float, str, str | None]],
) -> list[SegmentPart]:
    """The segment's cost and wasted dollars over its timeline, one part per (activity, phase).
    `wasted_from`: the wasted dollars are the time after it (None: spread over the whole
    segment in proportion to cost). The sums are exactly the segment's."""
    acc: dict[tuple[str, str | None], list[float]] = {}
    for t0, t1, what, ph in timeline:
        cost = priced.cost_between(t0, t1)
        lost = 0.0
        if wasted_from is not None:
            lost = priced.cost_between(max(t0, wasted_from), t1) if t1 > wasted_from else 0.0
        entry = acc.setdefault((what, ph), [0.0, 0.0, 0.0])
        entry[0] += t1 - t0
        entry[1] += cost
        entry[2] += lost
    if not acc:
        return []
    total_cost = sum(e[1] for e in acc.values())
    total_lost = sum(e[2] for e in acc.values())
    parts = []
    for (what, ph), (seconds, cost, lost) in acc.items():
        share = cost / total_cost if total_cost > 0 else seconds / max(span.seconds, 1e-9)
        cost_usd = share * priced.cost_usd
        if wasted_from is None:
            wasted_usd = share * wasted
        else:
            wasted_usd = (lost / total_lost * wasted) if total_lost > 0 else 0.0
        parts.append(SegmentPart(what, ph, seconds, cost_usd, min(wasted_usd, cost_usd)))
    # Rounding: the largest part takes what is left, so the sums are the segment's, exactly.
    big = max(range(len(parts)), key=lambda i: parts[i].cost_usd)
    rest = sum(p.cost_usd for i, p in enumerate(parts) if i != big)
    parts[big].cost_usd = priced.cost_usd - rest
    rest_w = sum(p.wasted_usd for i, p in enumerate(parts) if i != big)
    parts[big].wasted_usd = min(max(wasted - rest_w, 0.0), parts[big].cost_usd)
    return parts


def _stop_time(run_path: Path) -> float | None:
    stop = read_stop(run_path)
    return stop.time if stop is not None else None


def _reuse_price(priced: Priced, old: Segment | None, span: _Span) -> Priced:
    """Keep a real price already in the ledger rather than replace it by a catalog estimate."""
    if not priced.estimate or old is None or old.price_estimate:
        return priced
    if abs(old.start - span.start) > 1 or old.gpus != span.gpus:
        return priced
    rate = old.usd_per_gpu_hour
    return Priced(
        cost_usd=span.gpus * span.seconds / 3600 * rate,
        usd_per_gpu_hour=rate,
        source=old.price_source,
        price_time=old.price_time,
        estimate=False,
        pieces=(PricePiece(span.start, span.end, rate),),
        gpus=span.gpus,
    )


# -- sync ----------------------------------------------------------------------------------------


def sync_run(
    ledger: Ledger,
    run_dir: str | os.PathLike[str],
    cluster: ClusterLike,
    *,
    price_cache_dir: str | os.PathLike[str] | None = None,
    prices: PriceBook | None = None,
    sacct_wait_s: float = 30.0,
    now: float | None = None,
    sacct_query: Callable[[Sequence[str]], list[SacctRecord]] = sacct_records,
) -> list[Segment]:
    """Price every segment of one launched run folder and upsert it. Returns the segments.

    `prices` (a shared `PriceBook`) wins over `price_cache_dir`, which defaults to the
    workspace's cache/prices when the run folder is workspace/runs/<run>. `sacct_wait_s`: how long
    to poll sacct when the run is over but its last rows are not in yet (a controller polling on
    its own may pass 0). `sacct_query` is where Slurm records come from (tests and sites with a
    wrapper can replace it).
    """
    run_path = Path(run_dir)
    launch = read_launch(run_path)
    if launch is None:
        raise ConfigError(
            f"{run_path} has no launch.json: only runs started with `budget-lab launch` (or a "
            "sweep) are in the ledger; launch it that way, or pass the right run folder"
        )
    now = time.time() if now is None else now
    home = Workspace.of_run(run_path)
    if price_cache_dir is None and home is not None:
        price_cache_dir = home.prices_cache_dir
    prices = prices or PriceBook(cache_dir=price_cache_dir)
    files = RunDir(run_path)
    run = launch.run or run_path.name
    executor = launch.executor
    result = read_result(run_path) or {}
    status = result.get("status")
    metrics = read_jsonl(files.metrics)
    checkpoints = read_jsonl(files.checkpoint_log)
    checkpoint_times = sorted(float(c["time"]) for c in checkpoints if "time" in c)
    activity = [r for r in read_jsonl(files.activity) if {"activity", "start", "end"} <= r.keys()]
    stop_time = _stop_time(run_path) if status == "cut" else None

    if executor == "slurm":
        job_ids = list(launch.job_ids)
        for seg in _segment_rows(run_path, ended_at_last_sign_of_life=False):  # earlier launches
            jid = str(seg.get("job_id") or "")
            if jid and jid not in job_ids:
                job_ids.append(jid)
        spans = _slurm_spans(
            job_ids, cluster, status in TERMINAL_RUN_STATUSES, now, sacct_wait_s, sacct_query
        )
    elif executor == "local":
        spans = _local_spans(run_path, cluster, run, now)
    else:
        raise ConfigError(
            f"{files.launch}: executor={executor!r} is unknown; expected slurm or local"
        )

    existing = {s.key: s for s in ledger.segments(run=run)}
    trial = launch.trial
    segments = []
    for span in spans:
        live = span.state == "RUNNING"
        priced = prices.price(cluster, span.start, span.seconds, span.gpus, live=live)
        priced = _reuse_price(priced, existing.get(span.key), span)
        wasted, reason = _waste(span, priced, status, result, checkpoint_times)
        wasted = min(wasted, priced.cost_usd)
        phase = _phase(span, metrics, checkpoints)
        has_metrics = any(span.start <= float(r.get("time", -1)) <= span.end for r in metrics)
        timeline = _timeline(span, activity, phase, has_metrics, stop_time)
        lossy_only = wasted > 0 and span.state in _LOSSY_STATES and status != "failed"
        lossy_only = lossy_only and not (reason or "").startswith("run cut")
        wasted_from = _lost_since(span, checkpoint_times) if lossy_only else None
        segments.append(
            Segment(
                key=span.key,
                job_id=span.job_id,
                cluster=cluster.name,
                start=span.start,
                end=span.end,
                gpus=span.gpus,
                gpu_seconds=span.seconds * span.gpus,
                cost_usd=priced.cost_usd,
                usd_per_gpu_hour=priced.usd_per_gpu_hour,
                price_source=priced.source,
                price_time=priced.price_time,
                price_estimate=priced.estimate,
                wasted_usd=wasted,
                waste_reason=reason,
                state=span.state,
                partition=span.partition
                or getattr(getattr(cluster, "slurm", None), "partition", None),
                capacity=getattr(cluster, "capacity", None) or getattr(cluster.price, "kind", None),
                gpu_type=getattr(cluster, "gpu_type", None),
                nodes=span.nodes,
                run=run,
                phase=phase,
                sweep=launch.sweep,
                trial=int(trial) if trial is not None else None,
                launch_id=launch.launch_id or None,
                parts=_split(span, priced, wasted, wasted_from, timeline),
            )
        )
    ledger.upsert_segments(segments)
    return segments


def _load_cluster(name: str) -> ClusterLike:
    return load_cluster(name)


def sync_workspace(
    ledger: Ledger,
    workspace: Any,
    *,
    runs: Sequence[str] | None = None,
    clusters: Callable[[str], ClusterLike] | None = None,
    prices: PriceBook | None = None,
    sacct_wait_s: float = 30.0,
    sacct_query: Callable[[Sequence[str]], list[SacctRecord]] = sacct_records,
    learn: bool = True,
) -> SyncReport:
    """Sync every launched run folder of a workspace (or only `runs`). One run's error (printed
    in the report) does not stop the others. `learn`: a run found settled (ended, every segment
    accounted) updates the workspace's calibration (`learn_from_run`, once per run), so that
    the next estimate of a plain launch learns from it as a sweep's next trial does."""
    clusters = clusters or _load_cluster
    prices = prices or PriceBook(cache_dir=workspace.prices_cache_dir)
    report = SyncReport()
    known: dict[str, ClusterLike] = {}
    folders = workspace.run_dirs() if runs is None else [workspace.run_dir(r) for r in runs]
    for folder in folders:
        try:
            launch = read_launch(folder)
        except UserError as err:  # a damaged launch.json: this run cannot be priced, others can
            report.errors[folder.name] = str(err)
            continue
        if launch is None:
            report.skipped.append(folder.name)
            continue
        name = launch.cluster
        before = {s.key: s for s in ledger.segments(run=launch.run or folder.name)}
        try:
            if name not in known:
                known[name] = clusters(name)
            segments = sync_run(
                ledger,
                folder,
                known[name],
                prices=prices,
                sacct_wait_s=sacct_wait_s,
                sacct_query=sacct_query,
            )
        except LedgerCorruptError:  # the ledger, not this run: no other run can be synced either
            raise
        except UserError as err:
            report.errors[folder.name] = str(err)
            continue
        report.runs += 1
        if learn and _settled(folder, segments):
            try:
                if learn_from_run(workspace, folder, known[name], ledger):
                    report.learned.append(folder.name)
            except UserError as err:  # a damaged calibration.json: the sync itself stands
                message = f"calibration not updated from run {folder.name}: {err}"
                report.warnings.append(message)
                logging.getLogger(__name__).warning(message)
        for seg in segments:
            old = before.get(seg.key)
            if old is None:
                report.inserted += 1
            elif old == seg:
                report.unchanged += 1
            else:
                report.updated += 1
    report.warnings = [*prices.warnings, *report.warnings]
    return report


def _settled(run_dir: Path, segments: list[Segment]) -> bool:
    """Whether a synced run is over and accounted: a final result.json and no running segment."""
    result = read_result(run_dir) or {}
    return (
        bool(segments)
        and result.get("status") in TERMINAL_RUN_STATUSES
        and not any(s.state == "RUNNING" for s in segments)
    )
