"""Only `budget_lab.rundir` names the run folder's and the sweep folder's files.

Every other module reaches them through `RunDir` / `SweepDir` (and the readers beside them), so a
file can be renamed, or its format changed, in one place. The check reads the source with `ast`:
a string literal in code that is exactly one of the names (or a path ending in "/<name>") fails;
the names may still appear inside text for people (docstrings, help, error messages).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from budget_lab.rundir import RunDir, SweepDir

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "budget_lab" / "rundir.py"


def _names() -> set[str]:
    run, sweep = RunDir("/r"), SweepDir("/s")
    paths = [
        run.config,
        run.launch,
        run.segments,
        run.activity,
        run.metrics,
        run.checkpoint_log,
        run.rungs,
        run.result,
        run.stop,
        run.estimate,
        run.eval(),
        run.eval("untrained"),
        run.eval_features,
        sweep.journal,
        sweep.legacy_db,
        sweep.state,
        sweep.summary,
        sweep.fid_ref,
        sweep.lock,
    ]
    # Not checked: CANCELLED (also a Slurm job state, spelled by the sacct readers) and the
    # checkpoints/ and samples/ folders (words that label other things too).
    return {p.name for p in paths}


def _sources() -> list[Path]:
    files = [*(ROOT / "budget_lab").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    return sorted(f for f in files if f != OWNER)


def _spelled(path: Path, names: set[str], root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            path_like = " " not in text  # a path, not words for people
            if text in names or (path_like and any(text.endswith("/" + n) for n in names)):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
    return found


def test_the_names_are_real_and_distinct():
    names = _names()
    assert len(names) == 19
    assert {"result.json", "segments.jsonl", "STOP", "study.journal"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_rundir_names_run_folder_files(path):
    spelled = _spelled(path, _names())
    assert not spelled, (
        "a run- or sweep-folder file name spelled outside budget_lab/rundir.py; use RunDir / "
        "SweepDir instead:\n" + "\n".join(spelled)
    )


def test_the_check_catches_a_spelled_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        'from pathlib import Path\nrows = Path("run") / "metrics.jsonl"\n'
        'state = "/w/sweeps/x/sweep.json"\nsay = "no metrics.jsonl in the run folder"\n'
    )
    assert sorted(_spelled(bad, _names(), tmp_path)) == [
        "bad.py:2: 'metrics.jsonl'",
        "bad.py:3: '/w/sweeps/x/sweep.json'",
    ]
