"""The ledger's storage on a real SQLite file (WAL) and a real PostgreSQL server: keyed upserts,
sums and GROUP BY reports, the schema version, thresholds, and 8 concurrent writer processes.

PostgreSQL is the Debian server (/usr/lib/postgresql/*/bin), started by the `postgres_server`
fixture in a temporary folder on a free loopback port; when it is not installed the fixture
installs it with apt (as root), else the PostgreSQL cases are skipped with the reason.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from budget_lab.errors import ConfigError
from budget_lab.ledger.store import SCHEMA_VERSION, Ledger, LedgerSchemaError, Segment
from budget_lab.workspace import ENV_VAR, Workspace, add_workspace_argument

T0 = 1_795_000_000.0  # 2026-11-18T...Z, a fixed instant for exact figures
DAY = 86_400.0


def _pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def _apt_install_postgresql() -> str | None:
    """Install Debian's postgresql; None when done, else why not."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): cannot apt-get install postgresql"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine to install postgresql"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode == 0:
            return None
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
    return f"apt-get install postgresql failed: {proc.stderr.strip()[-300:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on 127.0.0.1; yields a function making a fresh database URL."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install -e '.[dev]'")
    bindir = _pg_bin()
    if bindir is None:
        reason = _apt_install_postgresql()
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip(f"no PostgreSQL server: {reason or 'initdb not found after install'}")
    root = Path(tempfile.mkdtemp(prefix="budget-lab-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the package's postgres user
        shutil.chown(root, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log")]
    subprocess.run([*ctl, "-o", options, "-w", "start"], check=True, capture_output=True)
    admin = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT"
    )

    def new_database() -> str:
        name = f"ledger_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        admin.dispose()
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    return request.getfixturevalue("postgres_server")()


def seg(key: str, **kw) -> Segment:
    """A segment with defaults: 1 hour on 2 GPUs at $3/GPU-hour from T0."""
    start = kw.pop("start", T0)
    hours = kw.pop("hours", 1.0)
    gpus = kw.pop("gpus", 2)
    rate = kw.pop("rate", 3.0)
    fields = {
        "key": key,
        "job_id": kw.pop("job_id", key),
        "cluster": kw.pop("cluster", "aws-p5"),
        "start": start,
        "end": start + hours * 3600,
        "gpus": gpus,
        "gpu_seconds": hours * 3600 * gpus,
        "cost_usd": hours * gpus * rate,
        "usd_per_gpu_hour": rate,
        "price_source": kw.pop("price_source", "fixed"),
    }
    fields.update(kw)
    return Segment(**fields)


def test_upsert_updates_instead_of_duplicating(ledger_url):
    with Ledger(ledger_url) as ledger:
        first = ledger.upsert_segments([seg("a", run="r1"), seg("b", run="r1")])
        assert (first.inserted, first.updated, first.unchanged) == (2, 0, 0)
        again = ledger.upsert_segments([seg("a", run="r1"), seg("b", run="r1")])
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
        # A running segment grows: the same key, a later end and a higher cost.
        grown = ledger.upsert_segments([seg("a", run="r1", hours=2.0), seg("c", run="r1")])
        assert (grown.inserted, grown.updated, grown.unchanged) == (1, 1, 0)
        rows = ledger.segments(run="r1")
        assert [s.key for s in rows] == ["a", "b", "c"]
        assert rows[0].cost_usd == pytest.approx(12.0) and rows[0].end == T0 + 7200
        assert ledger.spent(run="r1") == pytest.approx(12.0 + 6.0 + 6.0)


def test_spent_wasted_and_reports_group_in_sql(ledger_url):
    with Ledger(ledger_url) as ledger:
        ledger.upsert_segments(
            [
                seg("1", run="s-000", sweep="s", trial=0, phase="pretrain"),
                seg("2", run="s-000", sweep="s", trial=0, phase="finetune", start=T0 + 3600),
                seg(
                    "3", run="s-001", sweep="s", trial=1, phase="pretrain", start=T0 + DAY,
                    wasted_usd=1.5, waste_reason="preempted", state="PREEMPTED",
                    price_source="spot catalog (estimate)", price_estimate=True,
                ),
                seg("4", run="solo", phase="pretrain", cluster="local", rate=0.5, gpus=1),
            ]
        )  # fmt: skip
        assert ledger.spent() == pytest.approx(6 + 6 + 6 + 0.5)
        assert ledger.spent(sweep="s") == pytest.approx(18.0)
        assert ledger.wasted(sweep="s") == pytest.approx(1.5)
        assert ledger.spent(run="solo") == pytest.approx(0.5)
        # A segment straddling `since` counts in proportion: half of segment 1 (T0..T0+1h).
        since = T0 + 1800
        assert ledger.spent(run="s-000", since=since) == pytest.approx(3.0 + 6.0)

        by_trial = {r.group: r for r in ledger.report("trial")}
        assert set(by_trial) == {"s#0", "s#1", "-"}
        assert by_trial["s#0"].cost_usd == pytest.approx(12.0)
        assert by_trial["s#0"].gpu_hours == pytest.approx(4.0)
        assert by_trial["s#1"].wasted_usd == pytest.approx(1.5)
        assert by_trial["s#1"].useful_usd == pytest.approx(4.5)
        assert by_trial["s#1"].estimated_usd == pytest.approx(6.0)
        assert by_trial["s#1"].price_sources == ["spot catalog (estimate)"]

        by_phase = {r.group: r for r in ledger.report("phase", sweep="s")}
        assert by_phase["pretrain"].segments == 2 and by_phase["pretrain"].cost_usd == 12.0
        by_day = ledger.report("day")
        assert [r.group for r in by_day] == ["2026-11-18", "2026-11-19"]
        by_cluster = {r.group: r.cost_usd for r in ledger.report("cluster")}
        assert by_cluster == pytest.approx({"aws-p5": 18.0, "local": 0.5})
        with pytest.raises(ConfigError, match="valid: run, phase, cluster, day, trial"):
            ledger.report("week")


def test_a_newer_schema_is_refused(ledger_url):
    Ledger(ledger_url).close()
    engine = sa.create_engine(ledger_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(LedgerSchemaError, match=r"schema version 99.*Upgrade"):
        Ledger(ledger_url)


def test_thresholds_are_recorded_once(ledger_url):
    with Ledger(ledger_url) as ledger:
        assert ledger.record_threshold("sweep:s", 0.5, spent_usd=51, budget_usd=100)
        assert not ledger.record_threshold("sweep:s", 0.5, spent_usd=52, budget_usd=100)
        assert ledger.record_threshold("sweep:s", 0.8, spent_usd=81, budget_usd=100)
    with Ledger(ledger_url) as reopened:  # a restarted controller
        assert reopened.crossed_thresholds("sweep:s") == {0.5, 0.8}
        assert reopened.crossed_thresholds("month:2026-11") == set()


_WRITERS, _OWN, _SHARED = 8, 24, 10
# fork is much faster to start than spawn on 2 cores; each child opens its own Ledger (engine).
_MP = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _writer(url: str, i: int) -> tuple[int, bool]:
    """One process: its own segments one transaction each, shared keys, and a threshold race."""
    ledger = Ledger(url)
    try:
        for j in range(_OWN):
            ledger.upsert_segments([seg(f"p{i}-{j}", run=f"r{i}", start=T0 + j * 3600)])
            if j % 4 == 0:  # every writer also upserts the same shared keys
                ledger.upsert_segments([seg(f"shared-{k}", run="shared") for k in range(_SHARED)])
        won = ledger.record_threshold("sweep:race", 1.0, spent_usd=1, budget_usd=1)
        return i, won
    finally:
        ledger.close()


def test_concurrent_writer_processes_lose_and_duplicate_nothing(ledger_url):
    Ledger(ledger_url).close()  # schema first; the children race on rows, not on DDL
    ctx = multiprocessing.get_context(_MP)
    t0 = time.perf_counter()
    with ctx.Pool(_WRITERS) as pool:
        results = pool.starmap(_writer, [(ledger_url, i) for i in range(_WRITERS)])
    elapsed = time.perf_counter() - t0
    with Ledger(ledger_url) as ledger:
        rows = ledger.segments()
        keys = [s.key for s in rows]
        assert len(keys) == len(set(keys)) == _WRITERS * _OWN + _SHARED
        for i in range(_WRITERS):
            assert ledger.spent(run=f"r{i}") == pytest.approx(6.0 * _OWN)
        assert ledger.spent(run="shared") == pytest.approx(6.0 * _SHARED)
    assert sum(won for _, won in results) == 1, "exactly one writer records a threshold"
    print(f"{_WRITERS} writers x {_OWN + _OWN // 4} transactions: {elapsed:.1f} s")


def test_a_fresh_schema_race_between_processes(tmp_path):
    """8 processes open a ledger that does not exist yet: one creates it, nobody fails."""
    url = f"sqlite:///{tmp_path / 'fresh' / 'ledger.sqlite'}"
    ctx = multiprocessing.get_context(_MP)
    with ctx.Pool(_WRITERS) as pool:
        pool.starmap(_open_and_close, [(url,)] * _WRITERS)
    with Ledger(url) as ledger:
        assert ledger.schema_version == SCHEMA_VERSION
        mode = ledger.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar()
        assert mode == "wal"


def _open_and_close(url: str) -> None:
    Ledger(url).close()


def test_bad_urls_say_what_is_valid(tmp_path):
    with pytest.raises(ConfigError, match="sqlite or postgresql"):
        Ledger("mysql://u@h/db")
    with pytest.raises(ConfigError, match="not a database URL"):
        Ledger("no url at all")
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    assert "l.sqlite" in repr(ledger)
    ledger.close()


def test_password_is_hidden_in_the_display_url(postgres_server):
    url = postgres_server().replace("postgres@", "postgres:s3cret-pw@")
    with Ledger(url) as ledger:  # trust auth: the password is not checked
        assert "s3cret-pw" not in ledger.display_url and "***" in ledger.display_url


# -- the workspace ---------------------------------------------------------------------------------


def test_workspace_precedence_flag_env_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Workspace.from_args(None).root == tmp_path / "workspace"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert Workspace.from_args(None).root == tmp_path / "from-env"
    assert Workspace.from_args(str(tmp_path / "flag")).root == tmp_path / "flag"

    import argparse

    parser = argparse.ArgumentParser()
    add_workspace_argument(parser)
    assert parser.parse_args(["--workspace", "w"]).workspace == "w"
    assert parser.parse_args([]).workspace is None

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        Workspace.from_args(str(tmp_path / "a-file"))


def test_workspace_layout_and_yaml(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws").ensure()
    assert ws.runs_dir.is_dir() and ws.prices_cache_dir == ws.root / "cache" / "prices"
    assert ws.calibration_path == ws.root / "calibration.json"
    assert ws.ledger_url == f"sqlite:///{ws.root / 'ledger.sqlite'}"
    assert ws.monthly_budget_usd is None

    ws.config_path.write_text("monthly_budget_usd: 250\nledger_url: postgresql://u:${PGPW}@h/db\n")
    monkeypatch.setenv("PGPW", "pw")
    ws = Workspace(ws.root)
    assert ws.monthly_budget_usd == 250 and ws.ledger_url == "postgresql://u:pw@h/db"
    monkeypatch.delenv("PGPW")
    with pytest.raises(ConfigError, match="PGPW"):
        _ = Workspace(ws.root).ledger_url

    ws.config_path.write_text("monthly_budget: 250\n")
    with pytest.raises(ConfigError, match="unknown key.*monthly_budget; valid keys"):
        _ = Workspace(ws.root).config
    ws.config_path.write_text("monthly_budget_usd: -5\n")
    with pytest.raises(ConfigError, match="monthly_budget_usd=-5"):
        _ = Workspace(ws.root).config


@pytest.mark.slow
def test_cost_report_over_100k_segments_takes_under_a_second(tmp_path):
    """The bench/ledger_scale.py target, kept by a test: GROUP BY in SQLite, not Python loops."""
    from budget_lab.ledger.report import format_report

    with Ledger(f"sqlite:///{tmp_path / 'big.sqlite'}") as ledger:
        ledger.insert_many(
            [
                seg(f"k{i}", run=f"run-{i % 2000:04d}", sweep=f"s{i % 20}", trial=i % 2000,
                    phase=("pretrain", "finetune")[i % 2], start=T0 + (i % 90) * DAY + i % 3600,
                    wasted_usd=0.5 if i % 10 == 0 else 0.0)
                for i in range(100_000)
            ]
        )  # fmt: skip
        for by in ("run", "trial", "day"):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                rows = ledger.report(by)
                text = format_report(rows, by=by)
                best = min(best, time.perf_counter() - t0)
            assert best <= 1.0, f"cost report --by {by} took {best:.2f} s over 100,000 segments"
        assert len(rows) == 90 and "total" in text
        assert ledger.wasted() == pytest.approx(0.5 * 10_000)


def test_cost_report_by_run_and_trial_shows_what_the_money_bought(tmp_path, capsys):
    """A run's or trial's row carries its final FID with interval and N (its eval.json); a
    grouping without a score (phase) has no such column; csv and json carry the figures."""
    import json

    from budget_lab.cli import main

    ws = Workspace(tmp_path / "ws")
    with Ledger.for_workspace(ws) as ledger:
        ledger.upsert_segments(
            [
                seg("a", run="mr-000", sweep="mr", trial=0, phase="finetune", cluster="local"),
                seg("b", run="mr-001", sweep="mr", trial=1, phase="finetune", cluster="local"),
            ]
        )
    scored = {"fid": 231.02, "fid_ci95": [225.09, 236.96], "num_samples": 256}
    (ws.run_dir("mr-000")).mkdir(parents=True)
    (ws.run_dir("mr-000") / "eval.json").write_text(json.dumps(scored))
    root = ["--workspace", str(ws.root)]
    assert main(["cost", "report", "--by", "trial", *root]) == 0
    out = capsys.readouterr().out
    assert "FID [95% CI] N" in out and "231.0 [225.1, 237.0] N=256" in out
    assert "mr#1" in out and "—" in out  # a trial not evaluated says so
    assert main(["cost", "report", "--by", "run", "--format", "csv", *root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("fid,fid_ci95_lo,fid_ci95_hi,fid_n")
    assert lines[1].startswith("mr-000,") and lines[1].endswith("231.02,225.09,236.96,256")
    assert main(["cost", "report", "--by", "run", "--format", "json", *root]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["score"]["fid_n"] == 256 and rows[1]["score"] is None
    assert main(["cost", "report", "--by", "phase", *root]) == 0
    assert "FID" not in capsys.readouterr().out
