"""The run folder and the sweep folder: every file name in them, and their records' readers.

A run folder is the contract every part of budget-lab shares: the trainer writes it, the job
wrapper appends segments, status reads it, the ledger prices it, the sweep follows it, the report
shows it. This module is the one place that names its files (`RunDir`), says what their rows hold
(the `TypedDict`s below) and reads them; no other module spells a run-folder file name (a test
greps for it). The same for a sweep's folder (`SweepDir`).

    runs/<run>/
      config.yaml          the resolved run config (trainer; first write wins, resumes must match)
      launch.json          where the run went: `LaunchRecord` (launcher; before it submits)
      segments.jsonl       one start and one end row per time the job ran (job wrapper, rank 0)
      activity.jsonl       what each segment's seconds went to: start-up, train, eval, checkpoint
      metrics.jsonl        a `MetricsRow` every log_every steps (trainer, rank 0)
      checkpoints.jsonl    a `CheckpointRow` per checkpoint written (prices work lost at a kill)
      checkpoints/         the checkpoint store (`budget_lab.train.checkpoint` owns its insides)
      rungs.jsonl          a `RungRow` per FID a sweep trial measured while it trained
      result.json          the run's `Result`, rewritten as it goes (status, step, cut reason)
      STOP                 a `StopRequest`: stop at the next step, with a checkpoint
      CANCELLED            `budget-lab cancel` was asked for this run
      estimate.json        what the launcher estimated the run would cost
      eval.json            the finished run's FID and friends; eval-untrained.json: step 0's
      eval-features.npy    the final FID's Inception features (paired comparisons)
      samples/             sample grids: <phase index>-<phase>.png, eval-<tag>.png

    sweeps/<sweep>/
      study.journal  sweep.json  summary.json  fid_ref.json  controller.lock  report/

    <data folder>/manifest.json   a prepared data set (`is_prepared_data`; shards beside it)

The launch record: `launch.json`, written by the launcher before it submits
(`budget_lab.launch.submit`) and read by status, the ledger and the sweep (`read_launch`).

The stop request: a `STOP` file that a controller drops into a run folder (a budget
cap, a pruned sweep trial, a trial that reached its own budget) to stop the run at its next step,
with a checkpoint. Its JSON says what kind of stop it is and why, in words:

    {"kind": "pruned", "reason": "pruned at $0.0123 (FID 48.2)", "time": 1718000000.0}

The run then ends with status "cut", and its result.json carries the same `cut_kind` and
`cut_reason`. Readers match on the kind (`cut_kind(result)`), never on the words. Files written
before the kind existed still read: their kind is inferred from the words in one place,
`_kind_from_words`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict

from budget_lab.errors import ConfigError
from budget_lab.io import atomic_write_json, read_jsonl, yaml_load

__all__ = [
    "RunDir",
    "SweepDir",
    "MetricsRow",
    "CheckpointRow",
    "RungRow",
    "SegmentRow",
    "Result",
    "append_row",
    "read_json",
    "read_result",
    "read_config",
    "read_eval",
    "write_result",
    "segment_rows",
    "DATA_MANIFEST",
    "is_prepared_data",
    "LAUNCH_FILE",
    "LaunchRecord",
    "read_launch",
    "write_launch",
    "recover_job_ids",
    "STOP_FILE",
    "CutKind",
    "PLANNED_CUTS",
    "StopRequest",
    "request_stop_file",
    "read_stop",
    "cut_kind",
]

#: Where a run went, in its run folder (see the module's docstring).
LAUNCH_FILE = "launch.json"
#: The stop request's file in a run folder (see the module's docstring).
STOP_FILE = "STOP"


class _Folder:
    """A folder whose files a subclass names; it stands for its path (`os.fspath`, `str`)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name


class RunDir(_Folder):
    """The paths of one run folder's files (see the module's docstring). Creates nothing."""

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def launch(self) -> Path:
        return self.path / LAUNCH_FILE

    @property
    def segments(self) -> Path:
        return self.path / "segments.jsonl"

    @property
    def activity(self) -> Path:
        return self.path / "activity.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """The checkpoint store's folder."""
        return self.path / "checkpoints"

    @property
    def checkpoint_log(self) -> Path:
        return self.path / "checkpoints.jsonl"

    @property
    def rungs(self) -> Path:
        return self.path / "rungs.jsonl"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def stop(self) -> Path:
        return self.path / STOP_FILE

    @property
    def cancelled(self) -> Path:
        return self.path / "CANCELLED"

    @property
    def estimate(self) -> Path:
        return self.path / "estimate.json"

    def eval(self, tag: str = "trained") -> Path:
        """The evaluation of the finished run ("trained": eval.json) or of another model
        ("untrained": eval-untrained.json)."""
        return self.path / ("eval.json" if tag == "trained" else f"eval-{tag}.json")

    @property
    def eval_features(self) -> Path:
        return self.path / "eval-features.npy"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def phase_grid(self, index: int, phase: str) -> Path:
        """The sample grid written at the end of phase number `index` (`phase` its name)."""
        return self.samples / f"{index:02d}-{phase}.png"

    def eval_grid(self, tag: str = "trained") -> Path:
        """The sample grid of an evaluation (`eval`'s tag)."""
        return self.samples / f"eval-{tag}.png"

    @property
    def liveness_files(self) -> tuple[Path, Path]:
        """The row files whose `time`s are a running job's signs of life (with result.json's
        `updated_at`): what prices a segment that was killed too hard to write its end."""
        return self.metrics, self.checkpoint_log

    @staticmethod
    def looks_like_run(path: str | os.PathLike[str]) -> bool:
        """Whether `path` is a run folder (it holds a run config)."""
        return RunDir(path).config.is_file()


class SweepDir(_Folder):
    """The paths of one sweep's folder in a workspace (`Workspace.sweep_dir`). Creates nothing."""

    @property
    def journal(self) -> Path:
        """The Optuna study's journal (when the study lives in a file)."""
        return self.path / "study.journal"

    @property
    def legacy_db(self) -> Path:
        """The study's SQLite file of budget-lab <= 0.1 (still found and resumed)."""
        return self.path / "study.db"

    @property
    def state(self) -> Path:
        """sweep.json: the spec it ran with and its launches."""
        return self.path / "sweep.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def fid_ref(self) -> Path:
        """The FID reference statistics per data set the sweep's trials were scored against."""
        return self.path / "fid_ref.json"

    @property
    def lock(self) -> Path:
        """Held by the one controller that drives the sweep."""
        return self.path / "controller.lock"

    @property
    def report(self) -> Path:
        """The sweep's HTML report folder."""
        return self.path / "report"


#: A prepared data folder's manifest (`budget_lab.data.prepare` writes it, the loader reads it).
DATA_MANIFEST = "manifest.json"


def is_prepared_data(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a prepared data folder (it holds a manifest). Cheap: no torch."""
    return (Path(path) / DATA_MANIFEST).is_file()


# -- the rows ------------------------------------------------------------------------------------


class MetricsRow(TypedDict, total=False):
    """A metrics.jsonl row: the training window that ended at `step` (plus the run's spend so
    far, `cost_usd` and friends, when the job prices it live)."""

    step: int
    phase: str
    phase_step: int
    loss: float
    images_per_s: float
    lr: float
    mask_ratio: float
    images_seen: int
    train_seconds: float
    segment: int
    time: float
    cost_usd: float


class CheckpointRow(TypedDict):
    """A checkpoints.jsonl row: a checkpoint was written (its step, phase, segment, when, where)."""

    step: int
    phase: str
    segment: int
    time: float
    path: str


class RungRow(TypedDict, total=False):
    """A rungs.jsonl row: an FID a sweep trial measured mid-run. `kind` "usd" (at the dollar
    rung `rung_usd`) or "phase:<name>" (at the end of that phase); `cost_usd` what it had spent."""

    kind: str
    rung_usd: float | None
    cost_usd: float
    fid: float | None
    fid_ci95: list[float] | None
    fid_se: float | None
    kid: float | None
    kid_std: float | None
    alignment: float | None
    alignment_ci95: list[float] | None
    step: int
    phase: str
    num_samples: int
    time: float


class SegmentRow(TypedDict, total=False):
    """One time the job ran, from segments.jsonl's start and end rows (`segment_rows`)."""

    attempt: int
    job_id: str
    start: float
    end: float | None  # None while it runs (or killed hard, when liveness is not checked)
    status: str  # running, completed, requeued, failed, cut, cancelled, killed ...
    host: str
    pid: int
    devices: list[str]


class Result(TypedDict, total=False):
    """result.json: how the run stands, rewritten as it goes."""

    status: str  # running, completed, failed, interrupted (preempted: resumes), cut
    run_dir: str
    updated_at: float
    global_step: int
    cut_reason: str
    cut_kind: str
    error: str


def append_row(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    """Append one JSON row to a run-folder .jsonl file, on disk before it returns (fsync): a
    segment's start row is its bill's first line."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run-folder JSON object file; None when it is missing, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_result(run_dir: str | os.PathLike[str]) -> Result | None:
    """The run's result.json; None when it has none (or it cannot be read)."""
    return read_json(RunDir(run_dir).result)  # type: ignore[return-value]


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's resolved config as written (a dict: `budget_lab.config.run_config_from_dict`
    types it); None when the folder holds no run."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    data = yaml_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a run config (a YAML mapping); it was not written here")
    return data


def read_eval(run_dir: str | os.PathLike[str], tag: str = "trained") -> dict[str, Any] | None:
    """An evaluation of the run (eval.json: the finished run's FID, its interval and N, KID,
    alignment); None when it was not evaluated (or the file cannot be read)."""
    return read_json(RunDir(run_dir).eval(tag))


def write_result(run_dir: str | os.PathLike[str], result: Mapping[str, Any]) -> Path:
    return atomic_write_json(RunDir(run_dir).result, dict(result))


def segment_rows(
    run_dir: str | os.PathLike[str],
    live: Callable[[SegmentRow, bool], bool] | None = None,
) -> list[SegmentRow]:
    """One row per time the job ran, from segments.jsonl (see `SegmentRow`).

    `live(segment, is_last)` says whether a segment without an end row still runs. Given, a
    segment that does not was killed hard: it ends at its last sign of life, the ledger's rule:
    the latest metrics or checkpoint row, or result.json update, between its start and the next
    segment's start, else its start; its status is "killed". Without `live`, such a segment keeps
    end None."""
    files = RunDir(run_dir)
    segments: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(files.segments):
        seg = segments.setdefault(row["attempt"], {"attempt": row["attempt"], "end": None})
        if row["event"] == "start":
            seg.update(
                job_id=row["job_id"],
                start=row["time"],
                host=row["host"],
                pid=row["pid"],
                devices=row["devices"],
                status="running",
            )
        else:
            seg.update(end=row["time"], status=row["status"])
    rows: list[Any] = [segments[k] for k in sorted(segments) if "start" in segments[k]]
    last = len(rows) - 1
    dead = [i for i, s in enumerate(rows) if s["end"] is None and live and not live(s, i == last)]
    if dead:  # read only when needed: metrics.jsonl grows with every step
        life = [
            float(r["time"])
            for path in files.liveness_files
            for r in read_jsonl(path)
            if "time" in r
        ]
        try:
            life.append(float((read_result(files.path) or {})["updated_at"]))
        except (KeyError, ValueError, TypeError):
            pass
        for i in dead:
            seg = rows[i]
            until = rows[i + 1]["start"] if i + 1 < len(rows) else float("inf")
            seen = [t for t in life if seg["start"] <= t < until]
            seg.update(end=max(seen, default=seg["start"]), status="killed")
    return rows


@dataclass
class LaunchRecord:
    """What `launch.json` in the run folder says about where the run went.

    The launcher writes every field. A record written by hand (a job submitted with sbatch and
    adopted into the ledger) needs only `cluster` and `executor`; the rest default from the run
    folder (its name, its path) or to one node of no GPU."""

    run: str
    run_dir: str
    cluster: str
    executor: str
    launch_id: str = ""
    submitit_folder: str = ""  # "" when the job was not submitted through submitit
    job_ids: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    sweep: str | None = None
    trial: int | None = None
    created_at: float = field(default_factory=time.time)
    cluster_file: str | None = None  # the cluster YAML it was launched with (a path or a name)

    @property
    def devices(self) -> int:
        """GPUs the job holds (a CPU-only job counts one device)."""
        return max(self.nodes * self.gpus_per_node, 1)


def read_launch(run_dir: str | os.PathLike[str]) -> LaunchRecord | None:
    """The run folder's launch record; None when the run was not launched (`budget-lab train`).
    A launch.json that cannot be read as one is a ConfigError naming the file and the fault."""
    files = RunDir(run_dir)
    path = files.launch
    if not path.is_file():
        return None
    raw = read_json(path)
    known = {f.name for f in fields(LaunchRecord)}
    problem = None
    if raw is None:
        problem = "it is not a JSON object (torn, or edited by hand?)"
    elif not raw.get("cluster") or not raw.get("executor"):
        problem = "it lacks the cluster or the executor"
    if problem is None:
        assert raw is not None
        given = {k: v for k, v in raw.items() if k in known}  # newer fields: ignored
        given.setdefault("run", files.name)
        given.setdefault("run_dir", str(files.path))
        try:
            record = LaunchRecord(**given)
            record.job_ids = [str(j) for j in record.job_ids or []]
            record.nodes, record.gpus_per_node = int(record.nodes), int(record.gpus_per_node)
            record.tasks_per_node = int(record.tasks_per_node)
        except (TypeError, ValueError) as err:
            problem = f"a field has the wrong type ({err})"
    if problem is not None:
        raise ConfigError(
            f"{path}: {problem}. The launcher writes it (with at least cluster, executor and "
            "job_ids); relaunch the run, or fix or remove the file"
        )
    if not record.job_ids:  # written before a submission that did not return: what went out?
        record.job_ids = recover_job_ids(record)
    return record


def write_launch(record: LaunchRecord) -> Path:
    """Write the record into its run folder's launch.json (atomically: a reader never sees half)."""
    return atomic_write_json(RunDir(record.run_dir).launch, dataclasses.asdict(record))


def recover_job_ids(record: LaunchRecord) -> list[str]:
    """The ids of the jobs a launch submitted, from its submitit folder (`<id>_submitted.pkl`,
    written once the scheduler gave the id): for a launch record written before its submission
    returned. Empty when nothing was submitted."""
    folder = Path(record.submitit_folder)
    if not record.submitit_folder or not folder.is_dir():
        return []
    ids = {p.name.removesuffix("_submitted.pkl") for p in folder.glob("*_submitted.pkl")}
    return sorted(ids, key=lambda i: (len(i), i))


class CutKind(StrEnum):
    """Why a run was stopped before its end (status "cut")."""

    TRIAL_BUDGET = "trial_budget"  # a sweep trial spent its own budget (fid_at_budget): planned
    PRUNED = "pruned"  # the sweep's pruner cut a lagging trial: planned
    BUDGET_CAP = "budget_cap"  # a budget cap (a sweep's or a cost cap) stopped it
    OTHER = "other"  # anything else: a STOP written by hand, or unreadable


#: Cuts that are part of the plan, not waste: the spend bought the answer (FID at the trial
#: budget; "this configuration lags"). A cap's cut, or any other, wastes what the run spent.
PLANNED_CUTS = frozenset({CutKind.TRIAL_BUDGET, CutKind.PRUNED})


@dataclass(frozen=True)
class StopRequest:
    """A run's STOP file: what kind of stop, why in words, and when it was asked."""

    kind: CutKind
    reason: str  # for people: "budget cap reached", "pruned at $0.0123 (FID 48.2)"
    time: float | None = None  # when it was written (unix seconds); None if unreadable

    def result_fields(self) -> dict[str, str]:
        """What a cut run's result.json records of it."""
        return {"cut_reason": self.reason, "cut_kind": str(self.kind)}


def request_stop_file(run_dir: str | os.PathLike[str], reason: str, *, kind: CutKind) -> Path:
    """Ask a running (or queued) run to checkpoint and stop with status "cut", from any process
    on any machine that shares the run folder."""
    path = RunDir(run_dir).stop
    atomic_write_json(path, {"kind": str(kind), "reason": reason, "time": time.time()})
    return path


def read_stop(run_dir: str | os.PathLike[str]) -> StopRequest | None:
    """The run's stop request; None when it has none. An unreadable one still stops the run."""
    path = RunDir(run_dir).stop
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        reason = str(raw.get("reason", "stop requested"))
        stamp = raw.get("time")
        return StopRequest(
            _kind(raw.get("kind"), reason), reason, float(stamp) if stamp is not None else None
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return StopRequest(CutKind.OTHER, "stop requested")


def cut_kind(result: Mapping[str, Any]) -> CutKind:
    """Why a cut run was cut, from its result.json (`cut_kind`; a result written before the kind
    existed: from its `cut_reason`)."""
    return _kind(result.get("cut_kind"), str(result.get("cut_reason") or ""))


def _kind(kind: Any, reason: str) -> CutKind:
    if kind is None:
        return _kind_from_words(reason)
    try:
        return CutKind(kind)
    except ValueError:
        return CutKind.OTHER


def _kind_from_words(reason: str) -> CutKind:
    """The kind of a STOP file or result written before the kind existed: the words its writers
    started their reasons with (the only place that reads them)."""
    for prefix, kind in (
        ("trial budget", CutKind.TRIAL_BUDGET),
        ("pruned", CutKind.PRUNED),
        ("budget cap", CutKind.BUDGET_CAP),
    ):
        if reason.startswith(prefix):
            return kind
    return CutKind.OTHER
