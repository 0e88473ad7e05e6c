"""Audit findings (issue 15) on the ledger and the files around it, against real components: a
damaged ledger.sqlite is a clear error and `cost sync --rebuild` gives back every dollar; a stale
journal lock left by a SIGKILLed process; notify socket folders of killed controllers; garbage
bytes in a recipe or a cluster file; the report's Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from budget_lab.cli import main
from budget_lab.launch.cluster import load_cluster
from budget_lab.launch.job import TrainJob
from budget_lab.launch.notify import Listener
from budget_lab.ledger.rebuild import rebuild_ledger
from budget_lab.ledger.sacct import SacctRecord
from budget_lab.ledger.store import Ledger
from budget_lab.ledger.sync import sync_workspace
from budget_lab.sweep.storage import open_storage, remove_stale_lock
from budget_lab.workspace import Workspace
from tests.test_ledger_sync import T0, local_run, slurm_run

_ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`budget-lab ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "budget_lab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# -- 14: the ledger can be rebuilt ---------------------------------------------------------------


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


def _runs(ws: Workspace) -> None:
    """Three local runs (preempted, killed hard, completed segments each; see local_run): one a
    sweep trial, one failed (all wasted), one cut by a budget cap (all wasted); and a folder that
    was never launched."""
    local_run(ws, "nano-001", sweep="mask_ratio", trial=1)
    local_run(ws, "nano-002", sweep="mask_ratio", trial=2, status="failed")
    local_run(ws, "nano-003", status="cut", cut_reason="budget cap reached")
    ws.run_dir("scratch").mkdir()


def _state(ledger: Ledger) -> tuple[list, dict]:
    """Every segment, and per run: segments, total, useful and wasted dollars."""
    by_run = {
        r.group: (
            r.segments,
            round(r.cost_usd, 12),
            round(r.useful_usd, 12),
            round(r.wasted_usd, 12),
        )
        for r in ledger.report("run")
    }
    return ledger.segments(), by_run


def _damage(path: Path, how: str) -> bytes:
    assert not Path(f"{path}-wal").exists()  # closed: everything is in the file itself
    size = path.stat().st_size
    if how == "garbage":
        path.write_bytes(random.Random(0).randbytes(size))
    elif how == "truncated":
        with open(path, "rb+") as f:
            f.truncate(size // 2)
    else:
        path.unlink()
        return b""
    return path.read_bytes()


def test_a_damaged_ledger_is_a_clear_error_and_rebuild_gives_back_every_dollar(ws, capsys):
    """Garbage bytes in ledger.sqlite: every ledger command names the file and the fix, without
    a traceback; `cost sync --rebuild` (real processes) moves the file aside, keeps its bytes, and
    the new ledger holds the same segments and the same useful and wasted dollars per run."""
    _runs(ws)
    w = ["--workspace", str(ws.root)]
    assert main(["cost", "sync", *w]) == 0
    with Ledger.for_workspace(ws) as ledger:
        before = _state(ledger)
    assert len(before[0]) == 9 and before[1]["nano-002"][3] == before[1]["nano-002"][1]
    damaged = _damage(ws.ledger_path, "garbage")

    done = _cli("cost", "report", *w)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert f"the ledger {ws.ledger_path} is damaged (file is not a database)" in done.stderr
    assert "budget-lab cost sync --rebuild" in done.stderr
    capsys.readouterr()
    assert main(["cost", "sync", *w]) == 2  # a plain sync neither: it would need the rows
    assert "budget-lab cost sync --rebuild" in capsys.readouterr().err

    done = _cli("cost", "sync", "--rebuild", *w)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "rebuilt the ledger" in done.stdout and "9 segment(s)" in done.stdout
    assert "not rebuilt: budget thresholds" in done.stdout  # said plainly
    [aside] = ws.root.glob("ledger.sqlite.corrupt-*")
    assert aside.read_bytes() == damaged  # moved aside, never deleted or changed
    assert str(aside) in done.stdout
    with Ledger.for_workspace(ws) as ledger:
        assert _state(ledger) == before
    assert main(["cost", "report", *w]) == 0


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_truncated_or_lost_ledger_is_rebuilt_the_same(ws, capsys, how):
    _runs(ws)
    w = ["--workspace", str(ws.root)]
    assert main(["cost", "sync", *w]) == 0
    with Ledger.for_workspace(ws) as ledger:
        before = _state(ledger)
    damaged = _damage(ws.ledger_path, how)
    capsys.readouterr()
    if how == "truncated":
        assert main(["cost", "report", *w]) == 2
        err = capsys.readouterr().err
        assert f"the ledger {ws.ledger_path} is damaged" in err and "--rebuild" in err

    assert main(["cost", "sync", "--rebuild", *w]) == 0
    out = capsys.readouterr().out
    aside = list(ws.root.glob("ledger.sqlite.*"))
    if how == "truncated":
        assert [p.read_bytes() for p in aside] == [damaged] and "corrupt-" in aside[0].name
    else:
        assert aside == [] and "moved aside" not in out
    with Ledger.for_workspace(ws) as ledger:
        assert _state(ledger) == before


SACCT = [
    SacctRecord("77", "REQUEUED", T0, T0 + 600, 600, 2, "spot", 1),
    SacctRecord("77", "COMPLETED", T0 + 700, T0 + 1000, 300, 2, "spot", 1),
]


def test_rebuilding_a_readable_ledger_keeps_what_the_run_folders_cannot_give(ws, capsys):
    """From a ledger that can still be read, a rebuild carries over the budget thresholds and
    the segments of runs whose folder is gone; Slurm segments come back from sacct."""
    _runs(ws)
    slurm_run(ws, "sb", ["77"])
    clusters = {"local": load_cluster("local"), "slurm-local": load_cluster("slurm-local")}

    def sacct(job_ids):
        return [r for r in SACCT if r.job_id in job_ids]

    with Ledger.for_workspace(ws) as ledger:
        synced = sync_workspace(ledger, ws, clusters=clusters.get, sacct_query=sacct)
        assert synced.runs == 4 and not synced.errors
        assert ledger.record_threshold("sweep:mask_ratio", 0.5, spent_usd=5.0, budget_usd=10.0)
        before, thresholds = _state(ledger), ledger.threshold_records()
    shutil.rmtree(ws.run_dir("nano-003"))  # its dollars are only in the ledger now

    report = rebuild_ledger(ws, clusters=clusters.get, sacct_query=sacct, sacct_wait_s=0)
    assert (report.old_state, report.carried_segments, report.carried_thresholds) == (
        "readable",
        3,
        1,
    )
    assert [p.name.split("-")[0] for p in report.moved_to] == ["ledger.sqlite.old"]
    assert report.old_spent_usd == pytest.approx(report.spent_usd)
    with Ledger.for_workspace(ws) as ledger:
        assert _state(ledger) == before
        assert ledger.threshold_records() == thresholds
        assert ledger.crossed_thresholds("sweep:mask_ratio") == {0.5}


def test_rebuild_is_for_sqlite_ledgers_and_all_runs(ws, capsys):
    w = ["--workspace", str(ws.root)]
    assert main(["cost", "sync", "--rebuild", "--run", "x", *w]) == 2
    assert "leave out --run" in capsys.readouterr().err
    ws.config_path.write_text("ledger_url: postgresql+psycopg://budget@db.internal/budget_lab\n")
    assert main(["cost", "sync", "--rebuild", *w]) == 2
    err = capsys.readouterr().err
    assert "--rebuild recreates an SQLite ledger file" in err and "empty database" in err


def test_the_ledger_and_a_job_count_a_dead_segment_alike(ws):
    """sync.py ends a hard-killed local segment with the job's own rule (segment_rows): the
    ledger's dollars equal what the run's TrainJob says it spent."""
    run = local_run(ws, "nano-001")
    with Ledger.for_workspace(ws) as ledger:
        sync_workspace(ledger, ws)
        spent = ledger.spent(run="nano-001")
    job = TrainJob(str(run), {}, usd_per_device_hour=0.10, devices=1)
    assert job.spent_usd(now=T0 + 10_000)["cost_usd"] == pytest.approx(spent)
    assert spent == pytest.approx(2600 * 0.10 / 3600)  # the killed segment ends at +1700


# -- 13: a stale journal lock --------------------------------------------------------------------

_HOLD_AND_DIE = """
import os, signal, sys
from optuna.storages.journal import JournalFileSymlinkLock
JournalFileSymlinkLock(sys.argv[1]).acquire()
os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of an append
"""

_RESTART = """
import sys, optuna
from budget_lab.sweep.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
study.tell(study.ask(), 2.0)
print(len(study.trials))
"""


def test_a_stale_journal_lock_is_removed_at_once(tmp_path):
    """A controller SIGKILLed while it holds the journal's lock leaves the lock behind; Optuna
    would make the restart wait 30 s. The restart removes it, says so, and goes on."""
    import optuna

    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(journal))
    study.tell(study.ask(), 1.0)
    lock = Path(journal + ".lock")

    died = subprocess.run(
        [sys.executable, "-c", _HOLD_AND_DIE, journal], capture_output=True, timeout=120
    )
    assert died.returncode == -signal.SIGKILL and os.path.lexists(lock)
    assert not remove_stale_lock(lock)  # seconds old: it could be a live writer's
    assert os.path.lexists(lock)
    old = time.time() - 60  # the restart comes a minute later
    os.utime(lock, (old, old), follow_symlinks=False)

    try:  # Optuna alone waits 30 s before it takes the lock over
        done = subprocess.run(
            [sys.executable, "-c", _RESTART, journal],
            capture_output=True,
            text=True,
            timeout=25,
            cwd=_ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the restart waited on the stale journal lock")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]
    assert "removed a stale lock" in done.stderr and str(lock) in done.stderr
    assert not os.path.lexists(lock)


# -- 13: notify socket folders -------------------------------------------------------------------

_LISTEN = """
import os, signal, sys
from budget_lab.launch.notify import Listener
with Listener() as wake:
    print(wake.path, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # until the test closes stdin
    raise RuntimeError("the controller failed")
"""


@pytest.fixture
def short_tmp(monkeypatch):
    """A private temporary folder, short enough for a socket path (about 100 bytes at most)."""
    folder = tempfile.mkdtemp(prefix="bl-")
    monkeypatch.setattr(tempfile, "tempdir", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_notify_folders_go_away_on_exit_on_errors_and_after_a_kill(short_tmp, capsys):
    """Real controllers: one still listening, one SIGKILLed (its folder stays behind). The next
    Listener removes the killed one's folder only; the live one removes its own when it fails
    with an exception; a listener left by an exception leaves nothing either."""
    env = {**os.environ, "TMPDIR": short_tmp}
    live = subprocess.Popen(
        [sys.executable, "-c", _LISTEN, "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=_ROOT,
    )
    try:
        alive = Path(live.stdout.readline().strip()).parent
        assert alive.is_dir()
        killed = subprocess.run(
            [sys.executable, "-c", _LISTEN, "kill"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=_ROOT,
        )
        assert killed.returncode == -signal.SIGKILL
        dead = Path(killed.stdout.strip()).parent
        assert dead.is_dir() and alive.is_dir()  # SIGKILL: nothing could remove it

        with Listener() as mine:  # the next controller cleans up after the killed one only
            assert mine.path is not None and Path(mine.path).parent.parent == Path(short_tmp)
            assert not dead.exists() and alive.is_dir()
        assert dead.name in capsys.readouterr().err

        _, err = live.communicate("", timeout=120)  # its controller fails with an exception
        assert live.returncode == 1 and "the controller failed" in err
        assert not alive.exists()
    finally:
        if live.poll() is None:
            live.kill()
    with pytest.raises(ValueError), Listener() as mine:
        folder = Path(mine.path).parent
        raise ValueError("in the loop")
    assert not folder.exists()
    assert os.listdir(short_tmp) == []


# -- 13: garbage in a recipe or a cluster file ---------------------------------------------------

_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))


def test_garbage_bytes_in_a_recipe_or_cluster_file_are_a_clear_error(tmp_path):
    bad = tmp_path / "oops.yaml"
    bad.write_bytes(_PNG)
    for argv in (["train", "--recipe", str(bad), "--dry-run"], ["clusters", "show", str(bad)]):
        done = _cli(*argv)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        what = "recipe" if argv[0] == "train" else "cluster file"
        assert f"the {what} {bad} is not UTF-8 text (byte 0x89 at offset 0" in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [nano\n", "is not valid YAML: "),
        ("- 1\n- 2\n", "must hold a mapping of "),
        ("a\x00b: 1\n", "is not valid YAML: unacceptable character #x0000"),
        ("just words\n", "must hold a mapping of "),
    ],
)
def test_a_recipe_or_cluster_file_that_is_not_a_yaml_mapping_is_a_clear_error(
    tmp_path, capsys, text, expected
):
    bad = tmp_path / "oops.yaml"
    bad.write_text(text)
    for argv, what in (
        (["train", "--recipe", str(bad), "--dry-run"], "recipe"),
        (["clusters", "show", str(bad)], "cluster file"),
    ):
        assert main(argv) == 2  # no exception escapes: no traceback
        err = capsys.readouterr().err
        assert f"the {what} {bad} {expected}" in err
        if "YAML: " in expected and "#x0000" not in expected:
            assert "(line 2, column 1)" in err  # where


# -- 13: the report's Content-Security-Policy ----------------------------------------------------


def test_the_report_csp_allows_only_its_own_style_and_folder_images():
    """No 'unsafe-inline' anywhere and no file: images: the inline <style> and <script> are
    allowed by their hashes, computed from the text the page embeds (tests/test_report_browser.py
    checks in Chromium that the page loads without a CSP message and that an injected script is
    refused)."""
    from budget_lab.report import html

    digest = base64.b64encode(hashlib.sha256(html._CSS.encode()).digest()).decode()
    directives = dict(d.strip().split(" ", 1) for d in html._CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["img-src"] == "'self'"
    assert directives["style-src"] == f"'sha256-{digest}'"
    script = base64.b64encode(hashlib.sha256(html._SCRIPT.encode()).digest()).decode()
    assert directives["script-src"] == f"'sha256-{script}'"
    assert "file:" not in html._CSP and "unsafe-inline" not in html._CSP


def test_a_rebuild_goes_on_past_the_runs_it_cannot_sync(ws):
    """The rebuild skips folders without launch.json and reports runs it cannot sync, and still
    replaces a damaged ledger (what it could rebuild beats a file nothing can read)."""
    _runs(ws)
    broken = ws.run_dir("nano-002") / "launch.json"
    broken.write_text(json.dumps({**json.loads(broken.read_text()), "cluster": "no-such"}))
    ws.ledger_path.write_bytes(b"not a database at all" * 100)
    report = rebuild_ledger(ws)
    assert report.old_state == "corrupt" and "not a database" in report.old_problem
    assert report.sync.skipped == ["scratch"] and list(report.sync.errors) == ["nano-002"]
    assert report.segments == 6
