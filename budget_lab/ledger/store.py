"""The ledger's storage: one row per segment (each time a job actually ran), over SQLAlchemy Core.

    ledger = Ledger("sqlite:////abs/workspace/ledger.sqlite")    # or postgresql+psycopg://...
    ledger.upsert_segments(segments)          # keyed: a second sync updates, never duplicates
    ledger.spent(sweep="mask_ratio")          # dollars, useful + wasted
    ledger.report("phase", run="nano-001")    # GROUP BY in SQL: one ReportRow per phase
    ledger.report("activity", sweep="s")      # startup, train, checkpoint, eval, idle ...

A segment's dollars are split over what the job did in it (`SegmentPart`s in the
`segment_parts` table: activity x phase, from the run's activity.jsonl; budget_lab.ledger.sync):
reports by phase and by activity sum the parts, so a run that trains every phase in one job shows
every phase. The parts always sum to the segment's cost; a segment without parts (an old ledger,
a bulk import) counts whole under its own phase and the activity "other".

SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
`BEGIN IMMEDIATE`, so several processes (a controller, `cost sync`, a sweep) can write at once
without "database is locked" errors or lost rows. PostgreSQL is used as is (`INSERT .. ON
CONFLICT`). The schema carries a version in the `meta` table; a ledger written by a newer
budget-lab is refused instead of being misread. Each process opens its own `Ledger` (an engine
must not cross a fork).

A damaged SQLite file (not a database, a malformed page, a truncated file) raises
`LedgerCorruptError`, which names the file and `budget-lab cost sync --rebuild`: every dollar in
the ledger can be recomputed from the run folders (budget_lab.ledger.rebuild).
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError

from budget_lab.errors import ConfigError, UserError

__all__ = [
    "SCHEMA_VERSION",
    "REPORT_GROUPS",
    "Segment",
    "SegmentPart",
    "ReportRow",
    "UpsertCounts",
    "Ledger",
    "LedgerSchemaError",
    "LedgerCorruptError",
]

#: The schema this code writes. Bump it with a migration in `_MIGRATIONS` when a column changes.
SCHEMA_VERSION = 2

#: What `Ledger.report(by=...)` can group by, and the columns each groups on.
REPORT_GROUPS: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "phase": ("phase",),
    "cluster": ("cluster",),
    "day": ("day",),
    "trial": ("sweep", "trial"),
    "sweep": ("sweep",),
    "activity": ("activity",),
}
# Groups read from the segments' parts (the split by activity and phase) rather than whole rows.
_PART_GROUPS = ("phase", "activity")

# An arbitrary constant: the PostgreSQL advisory lock that serializes schema creation.
_PG_SCHEMA_LOCK = 4_204_201_901
_CHUNK = 500  # rows per executemany / IN (...) list


class LedgerSchemaError(UserError):
    """The ledger was written by a newer budget-lab (or is not a budget-lab ledger)."""


class LedgerCorruptError(UserError):
    """The SQLite ledger file is damaged: not a database, malformed, truncated."""

    def __init__(self, path: str, detail: str):
        self.path = path  # the damaged file
        self.detail = detail  # what SQLite said
        super().__init__(
            f"the ledger {path} is damaged ({detail}). Every dollar in it is recomputed from the "
            "workspace's run folders (and Slurm accounting) by `budget-lab cost sync --rebuild`, "
            "which moves the damaged file aside (never deletes it) and builds a new ledger"
        )


# SQLite's primary result codes for a damaged file (extended codes carry them in the low byte).
_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_CANTOPEN = 11, 26, 14


@dataclass
class SegmentPart:
    """The part of a segment spent on one activity in one phase (see budget_lab.launch.activity).
    A segment's parts sum to its cost and wasted dollars exactly."""

    activity: str  # startup | train | checkpoint | eval | sample_grid | idle | other
    phase: str | None  # the recipe phase it belongs to (None: not known)
    seconds: float  # wall-clock seconds of the segment in this part
    cost_usd: float  # its share of the segment's cost
    wasted_usd: float = 0.0  # its share of the segment's wasted dollars


@dataclass
class Segment:
    """One time a job ran on a cluster, priced. Times are Unix epoch seconds."""

    key: str  # unique id: "<cluster>/<job id>/<start>" (Slurm) or "<cluster>/<run>/<job>/<attempt>"
    job_id: str  # the scheduler's job id (Slurm) or the local job's id
    cluster: str  # cluster name (clusters/<name>.yaml)
    start: float  # when the segment started
    end: float  # when it ended; "now" while it still runs (state RUNNING)
    gpus: int  # GPUs held over all nodes (a CPU-only local machine counts as 1 device)
    gpu_seconds: float  # Slurm: ElapsedRaw x gres/gpu; local: wall clock x devices
    cost_usd: float  # what the segment cost, wasted part included
    usd_per_gpu_hour: float  # effective price used: cost / GPU-hours (spot: time-weighted)
    price_source: str  # "fixed", "on-demand catalog", "aws spot history", "spot catalog (estimate)"
    price_time: float | None = None  # when that price was observed (history fetch, catalog date)
    price_estimate: bool = False  # True when the real price could not be had (catalog fallback)
    wasted_usd: float = 0.0  # part of cost_usd that bought nothing (lost work, failed or cut run)
    waste_reason: str | None = None  # why wasted_usd is not zero
    state: str = "COMPLETED"  # Slurm state, or the local segment's status, upper case
    partition: str | None = None  # Slurm partition
    capacity: str | None = None  # capacity type: on_demand, spot, reserved, local ...
    gpu_type: str | None = None  # e.g. H100; "cpu" for a CPU-only machine
    nodes: int = 1  # nodes held
    run: str | None = None  # run name (runs/<run>)
    phase: str | None = None  # the recipe phase the segment trained (most of its time)
    sweep: str | None = None  # sweep name, for sweep trials
    trial: int | None = None  # Optuna trial number, for sweep trials
    launch_id: str | None = None  # the launch that submitted the job
    # The split of cost_usd by activity and phase (empty: not split; reports count it whole).
    parts: list[SegmentPart] = field(default_factory=list, compare=False, repr=False)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    @property
    def useful_usd(self) -> float:
        return self.cost_usd - self.wasted_usd

    @property
    def day(self) -> str:
        """The UTC calendar day the segment started on (YYYY-MM-DD)."""
        return _day(self.start)


@dataclass
class ReportRow:
    """One group of a cost report."""

    group: str  # the run / phase / cluster / day / "sweep#trial" ("-" when not set)
    segments: int
    gpu_hours: float
    cost_usd: float  # useful + wasted
    useful_usd: float
    wasted_usd: float
    estimated_usd: float  # part of cost_usd priced from a catalog fallback (an estimate)
    price_sources: list[str]  # distinct price sources of the group's segments
    first_start: float
    last_end: float


@dataclass
class UpsertCounts:
    """What an upsert did: rows new, rows changed, rows already identical."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d")


# -- the schema ----------------------------------------------------------------------------------

_metadata = sa.MetaData()

_meta = sa.Table(
    "meta",
    _metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

_segments = sa.Table(
    "segments",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(255), nullable=False, unique=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("cluster", sa.String(128), nullable=False),
    sa.Column("partition", sa.String(128)),
    sa.Column("capacity", sa.String(32)),
    sa.Column("gpu_type", sa.String(64)),
    sa.Column("nodes", sa.Integer, nullable=False),
    sa.Column("gpus", sa.Integer, nullable=False),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("gpu_seconds", sa.Float, nullable=False),
    sa.Column("usd_per_gpu_hour", sa.Float, nullable=False),
    sa.Column("price_source", sa.String(128), nullable=False),
    sa.Column("price_time", sa.Float),
    sa.Column("price_estimate", sa.Boolean, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("wasted_usd", sa.Float, nullable=False),
    sa.Column("waste_reason", sa.String(255)),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("run", sa.String(255)),
    sa.Column("phase", sa.String(128)),
    sa.Column("sweep", sa.String(255)),
    sa.Column("trial", sa.Integer),
    sa.Column("launch_id", sa.String(128)),
    sa.Index("ix_segments_run", "run"),
    sa.Index("ix_segments_sweep", "sweep"),
    sa.Index("ix_segments_start", "start"),
)

# Each segment's dollars split by activity and phase (SegmentPart); replaced with the segment.
_parts = sa.Table(
    "segment_parts",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("segment_key", sa.String(255), nullable=False),
    sa.Column("activity", sa.String(32), nullable=False),
    sa.Column("phase", sa.String(128)),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("wasted_usd", sa.Float, nullable=False),
    sa.Index("ix_segment_parts_key", "segment_key"),
)

# Budget thresholds already reported, so that a restarted controller does not report them again.
_alerts = sa.Table(
    "alerts",
    _metadata,
    sa.Column(
        "scope", sa.String(255), primary_key=True
    ),  # e.g. "sweep:mask_ratio", "month:2026-11"
    sa.Column("threshold", sa.Float, primary_key=True),  # fraction of the budget: 0.5, 0.8, 1.0
    sa.Column("crossed_at", sa.Float, nullable=False),
    sa.Column("spent_usd", sa.Float, nullable=False),
    sa.Column("budget_usd", sa.Float, nullable=False),
)

_SEGMENT_FIELDS = [f.name for f in fields(Segment) if f.name != "parts"]
_PART_FIELDS = [f.name for f in fields(SegmentPart)]


def _no_change(conn: Connection) -> None:
    """A migration whose new table create_all adds (its rows come with the next sync)."""


# Migrations from version N to N + 1, run inside the schema transaction.
# 1 -> 2: the segment_parts table (a v1 ledger's segments count whole until synced again).
_MIGRATIONS: dict[int, Any] = {1: _no_change}


# -- the ledger ----------------------------------------------------------------------------------


class Ledger:
    """The dollar ledger at a SQLAlchemy URL (SQLite file or PostgreSQL), created if missing."""

    def __init__(self, url: str | URL, *, timeout_s: float = 60.0):
        self.url = _parse_url(url)
        self.engine = _make_engine(self.url, timeout_s)
        self._statements: tuple[Any, Any] | None = None  # see _upsert_statements
        self._ensure_schema()

    @classmethod
    def for_workspace(cls, workspace: Any) -> Ledger:
        """The ledger of a `budget_lab.workspace.Workspace` (its ledger_url, or ledger.sqlite)."""
        if workspace.config.ledger_url is None:
            workspace.root.mkdir(parents=True, exist_ok=True)
        return cls(workspace.ledger_url)

    def __repr__(self) -> str:
        return f"Ledger({self.display_url!r})"

    @property
    def display_url(self) -> str:
        """The URL with any password hidden (safe to print or log)."""
        return self.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE, so writers queue instead of failing)."""
        with self._damage_is_a_user_error(), self.engine.connect() as conn:
            conn = conn.execution_options(ledger_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._damage_is_a_user_error(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def _damage_is_a_user_error(self) -> Iterator[None]:
        """A damaged or unopenable SQLite file: a message that names it and says what to do."""
        try:
            yield
        except DatabaseError as err:
            orig = err.orig
            code = getattr(orig, "sqlite_errorcode", None)
            if self.dialect != "sqlite" or not isinstance(orig, sqlite3.Error) or code is None:
                raise
            path = self.url.database or "(memory)"
            if code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise LedgerCorruptError(path, str(orig)) from None
            if code & 0xFF == _SQLITE_CANTOPEN:
                raise UserError(
                    f"cannot open the ledger {path} ({orig}): check that it is a file this user "
                    "can read and write, in a folder it can write (SQLite adds -wal and -shm "
                    "files beside it), or set ledger_url in workspace.yaml"
                ) from None
            raise

    def check(self) -> str | None:
        """What is wrong with the database file (SQLite's quick_check), or None when it is sound
        (PostgreSQL: always None)."""
        if self.dialect != "sqlite":
            return None
        with self._read() as conn:
            problems = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
        return None if problems == ["ok"] else "; ".join(problems[:3])

    def _ensure_schema(self) -> None:
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            inspector = sa.inspect(conn)
            version = None
            if inspector.has_table("meta"):
                value = conn.execute(
                    sa.select(_meta.c.value).where(_meta.c.key == "schema_version")
                ).scalar()
                version = int(value) if value is not None else None
            elif inspector.has_table("segments"):
                raise LedgerSchemaError(
                    f"{self.display_url} has a 'segments' table but no budget-lab schema version: "
                    "it is not a budget-lab ledger; point ledger_url (workspace.yaml) elsewhere"
                )
            if version is not None and version > SCHEMA_VERSION:
                raise LedgerSchemaError(
                    f"the ledger at {self.display_url} has schema version {version}, newer than "
                    f"this budget-lab understands ({SCHEMA_VERSION}): it was written by a newer "
                    "budget-lab. Upgrade (pip install -U budget-lab) before reading or syncing it, "
                    "or point ledger_url in workspace.yaml at another ledger"
                )
            while version is not None and version < SCHEMA_VERSION:
                _MIGRATIONS[version](conn)
                version += 1
            _metadata.create_all(conn, checkfirst=True)
            self._put_meta(conn, "schema_version", str(SCHEMA_VERSION))
            created = sa.select(_meta.c.value).where(_meta.c.key == "created_at")
            if conn.execute(created).scalar() is None:
                self._put_meta(conn, "created_at", repr(time.time()))

    def _insert(self) -> Any:
        """The dialect's INSERT construct (both have on_conflict_do_update/do_nothing)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert

    def _put_meta(self, conn: Connection, key: str, value: str) -> None:
        stmt = self._insert()(_meta).values(key=key, value=value)
        conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value}))

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(_meta.c.value).where(_meta.c.key == "schema_version")
                ).scalar_one()
            )

    # -- segments --------------------------------------------------------------------------------

    def upsert_segments(self, segments: Iterable[Segment]) -> UpsertCounts:
        """Insert new segments and update changed ones (by key), in one transaction."""
        rows: dict[str, dict[str, Any]] = {}
        parts: dict[str, list[SegmentPart]] = {}
        for seg in segments:
            rows[seg.key] = _row(seg)  # the last one wins if a key repeats
            parts[seg.key] = list(seg.parts)
        counts = UpsertCounts()
        if not rows:
            return counts
        select_by_keys, upsert = self._upsert_statements()
        with self._write() as conn:
            keys = list(rows)
            existing: dict[str, dict[str, Any]] = {}
            for i in range(0, len(keys), _CHUNK):
                found_rows = conn.execute(select_by_keys, {"keys": keys[i : i + _CHUNK]})
                for found in found_rows.mappings():
                    existing[found["key"]] = dict(found)
            old_parts = self._read_parts(conn, keys)
            todo, new_parts = [], []
            for key, row in rows.items():
                old = existing.get(key)
                parts_same = _same_parts(old_parts.get(key, []), parts[key])
                if old is None:
                    counts.inserted += 1
                elif _same_row(old, row) and parts_same:
                    counts.unchanged += 1
                    continue
                else:
                    counts.updated += 1
                todo.append(row)
                if not parts_same:
                    new_parts.append(key)
            for i in range(0, len(todo), _CHUNK):
                conn.execute(upsert, todo[i : i + _CHUNK])
            for i in range(0, len(new_parts), _CHUNK):
                chunk = new_parts[i : i + _CHUNK]
                conn.execute(_parts.delete().where(_parts.c.segment_key.in_(chunk)))
                part_rows = [
                    {"segment_key": key, **{n: getattr(p, n) for n in _PART_FIELDS}}
                    for key in chunk
                    for p in parts[key]
                ]
                if part_rows:
                    conn.execute(_parts.insert(), part_rows)
        return counts

    @staticmethod
    def _read_parts(conn: Connection, keys: Sequence[str]) -> dict[str, list[SegmentPart]]:
        out: dict[str, list[SegmentPart]] = {}
        columns = [_parts.c.segment_key, *(_parts.c[n] for n in _PART_FIELDS)]
        for i in range(0, len(keys), _CHUNK):
            query = (
                sa.select(*columns)
                .where(_parts.c.segment_key.in_(keys[i : i + _CHUNK]))
                .order_by(_parts.c.id)
            )
            for r in conn.execute(query).mappings():
                out.setdefault(r["segment_key"], []).append(
                    SegmentPart(**{n: r[n] for n in _PART_FIELDS})
                )
        return out

    def _upsert_statements(self) -> tuple[Any, Any]:
        """upsert_segments' two statements, built once per ledger (a sweep controller upserts
        every running trial's segments at every budget check: building them cost more than
        running them)."""
        if self._statements is None:
            columns = [*_SEGMENT_FIELDS, "day"]
            select_by_keys = sa.select(*(_segments.c[c] for c in columns)).where(
                _segments.c.key.in_(sa.bindparam("keys", expanding=True))
            )
            stmt = self._insert()(_segments)
            upsert = stmt.on_conflict_do_update(
                index_elements=["key"],
                set_={c: stmt.excluded[c] for c in columns if c != "key"},
            )
            self._statements = (select_by_keys, upsert)
        return self._statements

    def segments(
        self,
        *,
        run: str | None = None,
        sweep: str | None = None,
        cluster: str | None = None,
        job_id: str | None = None,
        since: float | None = None,
        with_parts: bool = False,
    ) -> list[Segment]:
        """Segments (ordered by start) that match every filter given; `since` keeps segments that
        ended after it. `with_parts`: fill each segment's split by activity and phase."""
        query = sa.select(*(_segments.c[c] for c in _SEGMENT_FIELDS))
        query = query.where(*self._filters(run, sweep, cluster, since))
        if job_id is not None:
            query = query.where(_segments.c.job_id == job_id)
        with self._read() as conn:
            result = conn.execute(query.order_by(_segments.c.start, _segments.c.key)).mappings()
            out = [Segment(**dict(r)) for r in result]
            if with_parts and out:
                found = self._read_parts(conn, [s.key for s in out])
                for seg in out:
                    seg.parts = found.get(seg.key, [])
            return out

    def segment_keys(self, *, run: str | None = None) -> dict[str, Segment]:
        """The stored segments of a run (or all), by key: what a sync compares against."""
        return {s.key: s for s in self.segments(run=run)}

    @staticmethod
    def _filters(
        run: str | None, sweep: str | None, cluster: str | None, since: float | None
    ) -> list[Any]:
        c = _segments.c
        out = []
        if run is not None:
            out.append(c.run == run)
        if sweep is not None:
            out.append(c.sweep == sweep)
        if cluster is not None:
            out.append(c.cluster == cluster)
        if since is not None:
            out.append(c.end > since)
        return out

    @staticmethod
    def _share(column: Any, since: float | None) -> Any:
        """`column` scaled to the part of each segment after `since` (a segment that straddles
        the start of a month counts in each month in proportion to its time there)."""
        if since is None:
            return column
        c = _segments.c
        return sa.case(
            (c.start >= since, column),
            else_=column * (c.end - sa.literal(since)) / (c.end - c.start),
        )

    def spent(
        self,
        sweep: str | None = None,
        run: str | None = None,
        since: float | None = None,
        *,
        cluster: str | None = None,
    ) -> float:
        """Dollars spent (useful and wasted) by the matching segments, after `since` if given."""
        return self._sum(_segments.c.cost_usd, sweep, run, since, cluster)

    def wasted(
        self,
        sweep: str | None = None,
        run: str | None = None,
        since: float | None = None,
        *,
        cluster: str | None = None,
    ) -> float:
        """Dollars of the matching segments that bought nothing (see `Segment.wasted_usd`)."""
        return self._sum(_segments.c.wasted_usd, sweep, run, since, cluster)

    def _sum(
        self,
        column: Any,
        sweep: str | None,
        run: str | None,
        since: float | None,
        cluster: str | None,
    ) -> float:
        query = sa.select(sa.func.coalesce(sa.func.sum(self._share(column, since)), 0.0))
        query = query.where(*self._filters(run, sweep, cluster, since))
        with self._read() as conn:
            return float(conn.execute(query).scalar_one())

    def report(
        self,
        by: str = "run",
        *,
        sweep: str | None = None,
        run: str | None = None,
        cluster: str | None = None,
        since: float | None = None,
    ) -> list[ReportRow]:
        """Cost grouped `by` run | phase | cluster | day | trial | sweep | activity, computed with
        GROUP BY in the database (fast on 100,000s of segments). Ordered by group. By phase and by
        activity, each segment's dollars are split over its parts (a segment without parts counts
        whole, under its own phase and activity "other"); `segments` counts the segments that
        have a part in the group."""
        if by not in REPORT_GROUPS:
            raise ConfigError(
                f"cannot group a cost report by {by!r}; valid: {', '.join(REPORT_GROUPS)}"
            )
        c = _segments.c
        share = self._share
        filters = self._filters(run, sweep, cluster, since)
        source: Any = _segments
        gpu_seconds, cost, wasted = c.gpu_seconds, c.cost_usd, c.wasted_usd
        count: Any = sa.func.count()
        if by in _PART_GROUPS:
            p = _parts.c
            source = _segments.outerjoin(_parts, p.segment_key == c.key)
            keys = [
                sa.func.coalesce(p.phase, c.phase).label("phase")
                if by == "phase"
                else sa.func.coalesce(p.activity, sa.literal("other")).label("activity")
            ]
            gpu_seconds = sa.func.coalesce(p.seconds * c.gpus, c.gpu_seconds)
            cost = sa.func.coalesce(p.cost_usd, c.cost_usd)
            wasted = sa.func.coalesce(p.wasted_usd, c.wasted_usd)
            count = sa.func.count(sa.distinct(c.key))
        else:
            keys = [c[name] for name in REPORT_GROUPS[by]]
        totals = (
            sa.select(
                *keys,
                count.label("segments"),
                sa.func.sum(share(gpu_seconds, since)).label("gpu_seconds"),
                sa.func.sum(share(cost, since)).label("cost"),
                sa.func.sum(share(wasted, since)).label("wasted"),
                sa.func.sum(sa.case((c.price_estimate, share(cost, since)), else_=0.0)).label(
                    "estimated"
                ),
                sa.func.min(c.start).label("first_start"),
                sa.func.max(c.end).label("last_end"),
                # A group rarely has more than two price sources: min and max name them all.
                sa.func.count(sa.distinct(c.price_source)).label("n_sources"),
                sa.func.min(c.price_source).label("source_a"),
                sa.func.max(c.price_source).label("source_b"),
            )
            .select_from(source)
            .where(*filters)
            .group_by(*keys)
        )
        with self._read() as conn:
            grouped = conn.execute(totals).all()
            by_group: dict[tuple[Any, ...], list[str]] = {}
            if any(row._mapping["n_sources"] > 2 for row in grouped):
                sources = sa.select(*keys, c.price_source).select_from(source).where(*filters)
                for row in conn.execute(sources.group_by(*keys, c.price_source)).all():
                    by_group.setdefault(tuple(row[: len(keys)]), []).append(row[-1])
        out = []
        for row in grouped:
            group = tuple(row[: len(keys)])
            m = row._mapping
            if group not in by_group:
                by_group[group] = list({m["source_a"], m["source_b"]})
            cost, wasted = float(m["cost"] or 0.0), float(m["wasted"] or 0.0)
            out.append(
                ReportRow(
                    group=_group_label(by, group),
                    segments=int(m["segments"]),
                    gpu_hours=float(m["gpu_seconds"] or 0.0) / 3600,
                    cost_usd=cost,
                    useful_usd=cost - wasted,
                    wasted_usd=wasted,
                    estimated_usd=float(m["estimated"] or 0.0),
                    price_sources=sorted(by_group.get(group, [])),
                    first_start=float(m["first_start"]),
                    last_end=float(m["last_end"]),
                )
            )
        return sorted(out, key=lambda r: r.group)

    # -- budget thresholds -----------------------------------------------------------------------

    def record_threshold(
        self,
        scope: str,
        threshold: float,
        spent_usd: float,
        budget_usd: float,
        at: float | None = None,
    ) -> bool:
        """Note that `scope` crossed `threshold` (a fraction of its budget). True only the first
        time, even when two controllers race: report the crossing only then."""
        stmt = self._insert()(_alerts).values(
            scope=scope,
            threshold=float(threshold),
            crossed_at=time.time() if at is None else at,
            spent_usd=spent_usd,
            budget_usd=budget_usd,
        )
        with self._write() as conn:
            stmt = stmt.on_conflict_do_nothing(index_elements=["scope", "threshold"])
            return conn.execute(stmt.returning(_alerts.c.scope)).first() is not None

    def threshold_records(self) -> list[dict[str, Any]]:
        """Every recorded threshold crossing: {"scope", "threshold", "crossed_at", "spent_usd",
        "budget_usd"} (what a rebuild carries over from a readable ledger)."""
        with self._read() as conn:
            return [dict(r) for r in conn.execute(sa.select(_alerts)).mappings()]

    def crossed_thresholds(self, scope: str) -> set[float]:
        """The thresholds already recorded for `scope`."""
        with self._read() as conn:
            query = sa.select(_alerts.c.threshold).where(_alerts.c.scope == scope)
            return {float(t) for t in conn.execute(query).scalars()}

    # -- bulk loading (benchmarks, imports) ------------------------------------------------------

    def insert_many(self, segments: Sequence[Segment]) -> None:
        """Insert segments known to be new, without the per-key comparison of `upsert_segments`."""
        with self._write() as conn:
            for i in range(0, len(segments), 5000):
                batch = [_row(s) for s in segments[i : i + 5000]]
                conn.execute(_segments.insert(), batch)


def _row(seg: Segment) -> dict[str, Any]:
    """A segment as a table row (flat fields: faster than dataclasses.asdict)."""
    row = {name: getattr(seg, name) for name in _SEGMENT_FIELDS}
    row["day"] = seg.day
    return row


def _same_parts(old: list[SegmentPart], new: list[SegmentPart]) -> bool:
    if len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        if (a.activity, a.phase) != (b.activity, b.phase):
            return False
        for x, y in (
            (a.seconds, b.seconds),
            (a.cost_usd, b.cost_usd),
            (a.wasted_usd, b.wasted_usd),
        ):
            if not math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-9):
                return False
    return True


def _same_row(old: dict[str, Any], new: dict[str, Any]) -> bool:
    for name, value in new.items():
        before = old.get(name)
        if isinstance(value, float) and isinstance(before, (int, float)):
            if not math.isclose(before, value, rel_tol=1e-12, abs_tol=1e-9):
                return False
        elif isinstance(value, bool) or isinstance(before, bool):
            if bool(before) != bool(value):
                return False
        elif before != value:
            return False
    return True


def _group_label(by: str, group: tuple[Any, ...]) -> str:
    if by == "trial":
        sweep, trial = group
        return f"{sweep or '-'}#{trial}" if trial is not None else (sweep or "-")
    (value,) = group
    return "-" if value is None else str(value)


# -- engines -------------------------------------------------------------------------------------


def _parse_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"ledger_url {str(url)!r} is not a database URL: expected sqlite:////abs/ledger.sqlite "
            "or postgresql+psycopg://user@host:5432/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"ledger_url {parsed.render_as_string(hide_password=True)!r} uses {backend!r}; the "
            "ledger runs on sqlite or postgresql (e.g. postgresql+psycopg://user@host/db)"
        )
    if parsed.drivername == "postgresql":
        # Plain postgresql:// means psycopg2 to SQLAlchemy; prefer psycopg 3 when that is what
        # is installed (the dev extra installs psycopg[binary]).
        with contextlib.suppress(ImportError):
            import psycopg  # noqa: F401

            parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _make_engine(url: URL, timeout_s: float) -> Engine:
    shown = url.render_as_string(hide_password=True)
    try:
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": timeout_s})
            _sqlite_events(engine, timeout_s)
        else:
            engine = sa.create_engine(
                url, pool_pre_ping=True, connect_args={"connect_timeout": int(timeout_s)}
            )
    except (NoSuchModuleError, ModuleNotFoundError) as err:
        raise ConfigError(
            f"no database driver for the ledger at {shown} ({err}): install one with "
            "pip install 'psycopg[binary]' (or use the default SQLite ledger)"
        ) from None
    return engine


def _sqlite_events(engine: Engine, timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy, not the sqlite3 module, emits BEGIN (below): IMMEDIATE for writes.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("ledger_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
