"""Where a sweep's study lives: the journal file by default, an older study.db still found, a torn
last line (a controller killed mid-append) repaired, two processes sharing one journal."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna
import pytest

from budget_lab.errors import ConfigError
from budget_lab.sweep.storage import default_storage, is_journal, open_storage, study_exists
from budget_lab.workspace import Workspace

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(storage: str, name: str = "s") -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=open_storage(storage),
        sampler=optuna.samplers.RandomSampler(seed=0),
        load_if_exists=True,
    )


def test_default_is_a_journal_file_in_the_sweep_folder(tmp_path):
    ws = Workspace(tmp_path / "ws")
    storage = default_storage(ws, "mask_ratio")
    assert is_journal(storage)
    assert Path(storage) == ws.sweep_dir("mask_ratio") / "study.journal"
    assert not study_exists(storage)
    study = _study(storage)
    trial = study.ask()
    trial.suggest_float("r", 0.0, 0.9)
    trial.set_user_attr("run_dir", "/x")
    study.tell(trial, 1.5)
    assert study_exists(storage)
    # A second storage object (another process, a report) reads what the first wrote.
    again = optuna.load_study(study_name="s", storage=open_storage(storage))
    [t] = again.get_trials()
    assert (t.state.name, t.value, t.user_attrs["run_dir"]) == ("COMPLETE", 1.5, "/x")


def test_an_older_workspace_keeps_its_sqlite_study(tmp_path):
    ws = Workspace(tmp_path / "ws")
    db = ws.sweep_dir("old") / "study.db"
    db.parent.mkdir(parents=True)
    study = optuna.create_study(study_name="old", storage=f"sqlite:///{db}")
    study.tell(study.ask(), 2.0)
    storage = default_storage(ws, "old")
    assert storage == f"sqlite:///{db}"
    assert open_storage(storage) == storage  # URLs go to Optuna as they are
    assert [t.value for t in optuna.load_study(study_name="old", storage=storage).trials] == [2.0]


def test_a_torn_last_line_is_dropped_and_the_study_goes_on(tmp_path, capsys):
    path = tmp_path / "study.journal"
    study = _study(str(path))
    study.tell(study.ask(), 1.0)
    good = path.read_bytes()
    with open(path, "ab") as f:  # what a SIGKILL in the middle of a write leaves
        f.write(b'{"op_code":4,"worker_id":"x","trial_id":1,"state"')
    study = _study(str(path))  # opened again: the partial line is cut off
    after = path.read_bytes()
    assert after.startswith(good) and b'"state"' not in after[len(good) :]
    assert "dropped a torn last line" in capsys.readouterr().err
    study.tell(study.ask(), 3.0)
    values = [t.value for t in _study(str(path)).trials]
    assert values == [1.0, 3.0]


def test_bad_journal_locations_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        open_storage(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        open_storage(str(tmp_path / "missing" / "study.journal"))


def _ask_many(path: str, n: int, out) -> None:
    study = _study(path)
    numbers = []
    for _ in range(n):
        trial = study.ask()
        study.tell(trial, float(trial.number))
        numbers.append(trial.number)
    out.put(numbers)


def test_two_controllers_share_one_journal(tmp_path):
    path = str(tmp_path / "study.journal")
    _study(path)  # created once, then two processes ask and tell at the same time
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ask_many, args=(path, 15, out)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    numbers = sorted(got[0] + got[1])
    assert numbers == list(range(30))  # no number given twice, none lost
    trials = _study(path).trials
    assert len(trials) == 30 and all(t.state.name == "COMPLETE" for t in trials)


def test_optuna_dashboard_reads_the_journal_as_stored(tmp_path):
    """`optuna-dashboard WORKSPACE/sweeps/NAME/study.journal`: the dashboard's own storage guess
    and its WSGI app, asked for the study list over HTTP semantics (no server, no browser)."""
    import io
    import json
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi
    from optuna_dashboard._storage_url import guess_storage_from_url

    ws = Workspace(tmp_path / "ws")
    storage = default_storage(ws, "mask_ratio")
    study = _study(storage, name="mask_ratio")
    trial = study.ask()
    trial.suggest_float("mask_ratio", 0.0, 0.9)
    study.tell(trial, 300.0)

    app = wsgi(guess_storage_from_url(storage))

    def get(path: str) -> dict:
        environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        environ["wsgi.input"] = io.BytesIO()
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
        assert status[0].startswith("200"), (path, status)
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "mask_ratio"
    detail = get(f"/api/studies/{summary['study_id']}")
    [row] = detail["trials"]
    assert (row["state"], row["values"], row["params"][0]["name"]) == (
        "Complete",
        [300.0],
        "mask_ratio",
    )
