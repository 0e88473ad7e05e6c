"""Audit findings on launching (issue 15), each against real processes and signals: Ctrl-C on the
launcher leaves its local jobs running; a segment killed hard is charged until its last sign of
life, in the job's own cost figure and in `status`, as in the ledger; a relaunch's budget counts
what the run already spent; run names and --budget-usd are checked; `status` never cuts a run
name or state; a test session stops the Slurm daemons it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from budget_lab.cli import main
from budget_lab.errors import ConfigError, UserError
from budget_lab.io import read_jsonl
from budget_lab.launch import Placement, cancel_run, launch_run, run_status
from budget_lab.launch.cluster import load_cluster
from budget_lab.launch.job import TrainJob
from budget_lab.ledger import Ledger, estimate_run, sync_run
from budget_lab.workspace import Workspace
from tests.helpers import tiny_run_config
from tests.slurm_cluster import wait_until

REPO = Path(__file__).resolve().parents[1]
FINAL = ("completed", "failed", "cut", "cancelled", "interrupted")
# tiny_run_config as KEY=VALUE overrides for the CLI (the nano recipe cut to a few steps).
TINY = [
    "phases.0.warmup_steps=2",
    "phases.0.batch_size=8",
    "phases.1.steps=4",
    "phases.1.batch_size=8",
    "checkpoint.every=3",
    "log_every=1",
    "eval.grid_size=0",
]


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _job_of(run_dir: Path, cluster) -> TrainJob:
    """The run's TrainJob as the launcher built it (to read the run's own dollar figure)."""
    from budget_lab.io import yaml_load

    config = yaml_load((Path(run_dir) / "config.yaml").read_text())
    return TrainJob(str(run_dir), config, cluster.price.usd_per_gpu_hour, devices=1)


# -- 3. Ctrl-C on the launcher --------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_on_the_launcher_leaves_the_local_job_running(train_data_dir, tmp_path):
    ws = tmp_path / "ws"
    # `launch --wait` in a process group of its own, as a shell runs a foreground command.
    argv = [sys.executable, "-m", "budget_lab", "launch", "--cluster", "local"]
    argv += ["--name", "survivor", "--wait", "--workspace", str(ws)]
    argv += [f"data.path={train_data_dir}", "phases.0.steps=40", *TINY]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline"}
    launcher = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir = ws / "runs" / "survivor"
    try:
        wait_until(lambda: len(_metrics(run_dir)) >= 2, 240, "the job to train", interval_s=0.1)
        job_pid = run_status(run_dir).segments[-1]["pid"]
        assert os.getpgid(job_pid) != os.getpgid(launcher.pid)
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C: the terminal's foreground group
        out, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, out
    assert "interrupted" in out
    st = wait_until(lambda: (s := run_status(run_dir)).state in FINAL and s, 240, "the run's end")
    assert st.state == "completed", st.error
    assert [s["status"] for s in st.segments] == ["completed"]  # one segment: never restarted
    assert st.segments[0]["pid"] == job_pid


# -- 10, 11. A segment killed hard ----------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_run(train_data_dir, tmp_path_factory):
    """A local run whose job was SIGKILLed mid-phase (no end row), then left dead a while."""
    workspace = Workspace(tmp_path_factory.mktemp("killed") / "ws").ensure()
    cluster = load_cluster("local")
    cfg = tiny_run_config(train_data_dir, "phases.0.steps=100000")
    record = launch_run(cfg, cluster, workspace, "killed")
    run_dir = Path(record.run_dir)
    wait_until(lambda: len(_metrics(run_dir)) >= 3, 240, "the job to train", interval_s=0.1)
    pid = run_status(run_dir).segments[-1]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "the killed job to be gone")
    time.sleep(3)  # dead time: charged by no one
    return workspace, cluster, cfg, run_dir


@pytest.mark.slow
def test_relaunch_budget_counts_what_the_run_already_spent(killed_run, capsys):
    workspace, cluster, cfg, run_dir = killed_run
    spent = _job_of(run_dir, cluster).spent_usd()["cost_usd"]
    estimate = estimate_run(cfg, cluster, workspace).usd
    assert spent > 0 and estimate > 0

    def relaunch(budget: float) -> tuple[int, str, str]:
        argv = ["launch", "--cluster", "local", "--name", "killed", "--dry-run"]
        argv += ["--budget-usd", repr(budget), "--workspace", str(workspace.root)]
        argv += [f"data.path={cfg.data.path}", "phases.0.steps=100000", *TINY]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    # The estimate fits the budget, the estimate plus the spend does not: refused.
    code, out, err = relaunch(estimate + spent / 2)
    assert code == 2, out + err
    assert "already spent" in err and "run:killed" in err and "Traceback" not in err
    assert f"${spent:.4f} already spent (ledger)" in out
    # The spend came from the run folder, synced into the ledger by the launch itself.
    with Ledger.for_workspace(workspace) as ledger:
        assert ledger.spent(run="killed") == pytest.approx(spent, rel=1e-6)
    code, out, err = relaunch(estimate + spent * 2)
    assert code == 0, err
    assert "dry run: nothing submitted" in out


@pytest.mark.slow
def test_killed_segment_is_charged_until_its_last_sign_of_life(killed_run):
    workspace, cluster, cfg, run_dir = killed_run
    rate = cluster.price.usd_per_gpu_hour
    last_row = max(r["time"] for r in _metrics(run_dir))
    st = run_status(run_dir)
    [seg] = st.segments
    # `status`: the dead segment ended at its last sign of life, never "running" for ever.
    assert st.state != "running" and seg["status"] == "killed"
    assert last_row <= seg["end"] < time.time() - 2
    # The run's own clock agrees with the ledger, now and an hour from now.
    with Ledger.for_workspace(workspace) as ledger:
        [priced] = sync_run(ledger, run_dir, cluster)
    assert priced.state == "KILLED" and priced.end == pytest.approx(seg["end"])
    own = _job_of(run_dir, cluster)
    assert own.spent_usd()["cost_usd"] == pytest.approx(priced.cost_usd, rel=1e-9)
    later = own.spent_usd(now=time.time() + 3600)["cost_usd"]
    assert later == pytest.approx(priced.cost_usd, rel=1e-9)

    # Relaunched, the job resumes: its live cost (metrics rows, the W&B cost axis, dollar rungs,
    # budget stops) is the dead segment until its last sign of life plus its own time.
    record = launch_run(cfg, cluster, workspace, "killed")
    n = len(_metrics(run_dir))
    wait_until(lambda: len(_metrics(run_dir)) >= n + 3, 240, "the relaunched job to train", 0.1)
    cancel_run(record.run_dir)
    dead, resumed = run_status(run_dir).segments
    assert dead["end"] == seg["end"]
    row = [r for r in _metrics(run_dir) if r["time"] > resumed["start"]][-1]
    expected = (dead["end"] - dead["start"] + row["time"] - resumed["start"]) / 3600 * rate
    assert row["cost_usd"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_killed_segment_is_not_running_for_ever(train_data_dir, tmp_path):
    workspace = Workspace(tmp_path / "ws").ensure()
    cluster = load_cluster("slurm-local")
    cfg = tiny_run_config(train_data_dir, "phases.0.steps=100000")
    record = launch_run(cfg, cluster, workspace, "s-killed", Placement(gpus_per_node=1))
    run_dir = Path(record.run_dir)
    wait_until(lambda: len(_metrics(run_dir)) >= 3, 300, "the job to train", interval_s=0.1)
    os.kill(run_status(run_dir).segments[-1]["pid"], signal.SIGKILL)  # the node runs it here
    st = wait_until(lambda: (s := run_status(run_dir)).state in FINAL and s, 120, "Slurm to see")
    assert st.state == "failed"
    [seg] = st.segments
    assert seg["status"] == "killed" and seg["end"] >= max(r["time"] for r in _metrics(run_dir))
    own = _job_of(run_dir, cluster)
    assert own.spent_usd(now=time.time() + 3600) == own.spent_usd()  # no longer growing


# -- 13. Run names, --budget-usd, the status table -----------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../escape", "a\n#SBATCH --wrap=true", ".hidden", "-x", "a/b", "", "n" * 101]
)
def test_bad_run_names_are_refused_before_anything_is_done(name, tmp_path, capsys):
    ws = tmp_path / "deep" / "ws"
    argv = ["launch", "--cluster", "local", f"--name={name}", "--dry-run"]
    code = main([*argv, "--workspace", str(ws)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"run name {name!r} is invalid" in err
    assert "letters, digits, '.', '_' or '-'" in err and "--name" in err
    assert not ws.exists() and not (tmp_path / "escape").exists()
    # The Python API refuses it too, before it makes a submitit folder.
    workspace = Workspace(ws).ensure()
    with pytest.raises(UserError, match="is invalid"):
        launch_run(tiny_run_config(tmp_path), load_cluster("local"), workspace, name)
    assert not any(Path(workspace.jobs_dir).iterdir())
    assert not (tmp_path / "escape").exists()


def test_good_run_names_pass(tmp_path, capsys):
    argv = ["launch", "--cluster", "local", "--name", "nano-r0.75_b2", "--dry-run"]
    assert main([*argv, "--workspace", str(tmp_path / "ws")]) == 0
    assert "run      nano-r0.75_b2" in capsys.readouterr().out


# Real line breaks, as a shell's $'...' passes them (Hydra's grammar reads "\\n" in quotes as
# the two characters, which stay on one line).
@pytest.mark.parametrize(
    "override", ["slurm.partition='debug\n#SBATCH --wrap=true'", 'slurm.additional.gres="a\nb"']
)
def test_slurm_options_stay_on_their_sbatch_line(override):
    with pytest.raises(ConfigError, match="one line without control characters"):
        load_cluster("slurm-local", [override])
    with pytest.raises(ConfigError, match="is not valid"):  # unquoted: not even parsed
        load_cluster("slurm-local", ["slurm.partition=debug\n#SBATCH --wrap=true"])


@pytest.mark.parametrize("budget", ["-1", "-0.01", "nan", "inf"])
def test_negative_budget_is_refused_before_anything_is_done(budget, tmp_path, capsys):
    ws = tmp_path / "ws"
    code = main(["launch", "--cluster", "local", "--budget-usd", budget, "--workspace", str(ws)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"--budget-usd={float(budget):g} is invalid" in err
    assert ">= 0" in err and "leave it out" in err
    assert not ws.exists()


def test_zero_budget_refuses_any_spend(tmp_path, capsys):
    ws = str(tmp_path / "ws")
    code = main(["launch", "--cluster", "local", "--budget-usd", "0", "--workspace", ws])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert "budget   $0.0000 for run nano" in out and "none" not in out.lower()
    assert "refused" in err and "$0.00 budget" in err
    # What costs nothing fits a budget of zero.
    free = ["--set", "price.usd_per_gpu_hour=0", "--dry-run"]
    code = main(["launch", "--cluster", "local", "--budget-usd", "0", *free, "--workspace", ws])
    assert code == 0, capsys.readouterr().err


def test_sweep_budget_zero_is_a_budget_and_negative_is_refused(train_data_dir, tmp_path, capsys):
    from tests.test_sweep_controller import write_sweep

    sweep = str(write_sweep(tmp_path, train_data_dir))
    ws = str(tmp_path / "ws")
    code = main(["sweep", sweep, "--budget-usd", "-1", "--workspace", ws])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "--budget-usd=-1 is invalid" in err
    main(["sweep", sweep, "--budget-usd", "0", "--no-report", "--workspace", ws])
    out = capsys.readouterr().out
    assert "budget $0.0000" in out and "budget none" not in out
    assert not (tmp_path / "ws" / "runs").is_dir() or not any((tmp_path / "ws" / "runs").iterdir())


def test_status_table_never_cuts_run_names_or_states(tmp_path, monkeypatch, capsys):
    """An 80-column terminal shows every run name and state whole (the audit saw `mask_ra…`,
    `complet…`); lesser columns are left out, and said to be."""
    runs = Path(tmp_path / "ws" / "runs")
    names = {"mask_ratio-000": "completed", "mask_ratio-001": "failed"}
    for i, (name, state) in enumerate(names.items()):
        run_dir = runs / name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("name: x\n")
        jobs = tmp_path / "ws" / "jobs" / "20260101-000000-abcdef"
        launch = {
            "run": name,
            "run_dir": str(run_dir),
            "cluster": "slurm-local",
            "executor": "local",
            "launch_id": jobs.name,
            "submitit_folder": str(jobs),
            "job_ids": [str(1234567 + i)],
            "nodes": 1,
            "gpus_per_node": 0,
            "tasks_per_node": 1,
            "sweep": "mask_ratio",
            "trial": i,
        }
        (run_dir / "launch.json").write_text(json.dumps(launch))
        result = {"status": state, "global_step": 12345}
        (run_dir / "result.json").write_text(json.dumps(result))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"phase": "masked-pretrain"}) + "\n")
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["status", "--workspace", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    for name, state in names.items():
        assert any(name in line and state in line for line in lines), out
    assert "…" not in out
    assert "left out for width:" in out
    # A wide terminal shows every column.
    monkeypatch.setenv("COLUMNS", "200")
    main(["status", "--workspace", str(tmp_path / "ws")])
    out = capsys.readouterr().out
    assert "sweep/trial" in out and "mask_ratio/1" in out and "left out" not in out


# -- 13. A test session leaves the Slurm daemons as it found them --------------------------------

# start-slurm.sh's daemons and their pid files under $SLURM_ROOT (munged's copy there is written
# only when the script started it).
_DAEMONS = {
    "slurmd": "run/slurmd.pid",
    "slurmctld": "run/slurmctld.pid",
    "slurmdbd": "run/slurmdbd.pid",
    "mariadbd": "db/mysqld.pid",
    "munged": "run/munged.pid",
}

# A stand-in for start-slurm.sh: starts each daemon that is not running (a `sleep` under the
# daemon's name, so /proc/PID/comm matches) and writes its pid file, as the real script does.
_FAKE_START = """\
set -eu
mkdir -p "$SLURM_ROOT/bin" "$SLURM_ROOT/run" "$SLURM_ROOT/db"
for entry in {entries}; do
    name=${{entry%%:*}}; pidfile=$SLURM_ROOT/${{entry#*:}}
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ] \
        && [ "$(awk '$1 == "State:" {{print $2}}' /proc/$pid/status)" != Z ]; then
        continue
    fi
    [ -n "${{ONLY:-}}" ] && [ "$ONLY" != "$name" ] && continue
    cp "$(command -v sleep)" "$SLURM_ROOT/bin/$name"
    setsid "$SLURM_ROOT/bin/$name" 600 </dev/null >/dev/null 2>&1 &
    echo $! >"$pidfile"
    until [ "$(cat /proc/$!/comm 2>/dev/null)" = "$name" ]; do sleep 0.02; done  # exec'd
done
echo "SLURM_CONF=$SLURM_ROOT/etc/slurm.conf"
"""
_INNER_CONFTEST = """\
from pathlib import Path
import tests.slurm_cluster as plugin
plugin.START_SCRIPT = Path({script!r})
pytest_plugins = ["tests.slurm_cluster"]
"""
_INNER_TEST = """\
def test_uses_the_cluster(slurm_cluster):
    assert slurm_cluster["SLURM_CONF"].endswith("slurm.conf")
"""


@pytest.fixture()
def fake_slurm(tmp_path):
    """A SLURM_ROOT with a stand-in start script, and a way to run a test session against it."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm fixture runs only as root")
    root = tmp_path / "slurm-root"
    script = tmp_path / "start.sh"
    entries = " ".join(f"{k}:{v}" for k, v in _DAEMONS.items())
    script.write_text(_FAKE_START.format(entries=entries))
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(_INNER_CONFTEST.format(script=str(script)))
    (inner / "test_inner.py").write_text(_INNER_TEST)
    env = {**os.environ, "SLURM_ROOT": str(root), "PYTHONPATH": str(REPO)}
    env.pop("BUDGET_LAB_KEEP_SLURM", None)
    env.pop("BUDGET_LAB_SKIP_SLURM", None)

    def session(**extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)],
            cwd=inner,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr

    def start(only: str | None = None) -> None:  # daemons someone else started
        extra = {"ONLY": only} if only else {}
        subprocess.run(["bash", str(script)], env={**env, **extra}, check=True, capture_output=True)

    def running() -> dict[str, int]:  # {daemon: pid} alive (not a zombie)
        found = {}
        for name, rel in _DAEMONS.items():
            try:
                pid = int((root / rel).read_text())
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, ValueError):
                continue
            if f"Name:\t{name}\n" in status and "State:\tZ" not in status:
                found[name] = pid
        return found

    yield session, start, running, root
    for pid in running().values():
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root / "bin", ignore_errors=True)


def test_test_session_stops_the_slurm_daemons_it_started(fake_slurm):
    session, start, running, root = fake_slurm
    session()
    assert running() == {}  # it started all five, and stopped all five

    start(only="munged")  # munged was running before: it is left running
    munged = running()
    session()
    assert running() == munged

    start()  # a cluster found running is left running
    before = running()
    assert len(before) == 5
    session()
    assert running() == before


def test_last_test_session_using_the_cluster_stops_it(fake_slurm):
    session, start, running, root = fake_slurm
    # Another session uses the cluster (this process stands in for it): the one that started
    # the cluster leaves it to the last one.
    (root / "test-sessions").mkdir(parents=True)
    (root / "test-sessions" / str(os.getpid())).write_text("")
    session()
    assert len(running()) == 5
    (root / "test-sessions" / str(os.getpid())).unlink()
    session()  # the last one out stops what the tests started
    assert running() == {}
    # A session that died without ending counts as ended.
    (root / "test-sessions" / "999999999").write_text("")
    session()
    assert running() == {}
