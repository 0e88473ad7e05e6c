"""User mistakes on the launch / sweep / status commands: a clear error, exit 2, no traceback,
nothing submitted."""

from __future__ import annotations

import pytest

from budget_lab.cli import main


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["launch", "--cluster", "nope", "--dry-run"], "valid clusters: aws-p5, local"),
        (["launch", "--cluster", "local", "--recipe", "nope"], "nano"),
        (["launch", "--cluster", "local", "--gpus-per-node", "2"], "has no GPUs"),
        (
            ["launch", "--cluster", "slurm-local", "--gpus-per-node", "9"],
            "more GPUs than a node has",
        ),
        (["launch", "--cluster", "local", "phases.0.stepz=3"], "stepz"),
        (["sweep", "nope"], "mask_ratio"),
        (["sweep", "mask_ratio", "--trials", "0"], "--trials=0 is invalid"),
        (
            ["sweep", "mask_ratio", "--storage", "/no/such/dir/s.journal"],
            "/no/such/dir does not exist",
        ),
        (["status", "no-such-run"], "no run 'no-such-run'"),
        (["cancel", "no-such-run"], "no run 'no-such-run'"),
        (["report", "--sweep", "nope"], "no sweep 'nope'"),
    ],
)
def test_user_mistakes_are_clear_errors(argv, expected, tmp_path, capsys):
    code = main([*argv, "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "ws" / "jobs").exists() or not any((tmp_path / "ws" / "jobs").iterdir())


def test_launch_dry_run_prints_plan_and_paper_comparison(tmp_path, capsys):
    code = main(
        [
            "launch",
            "--cluster",
            "aws-p5",
            "--recipe",
            "microdit-xl",
            "--dry-run",
            "--workspace",
            str(tmp_path / "ws"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "8 H100" in out and "504" in out and "$1,890" in out
    assert "dry run: nothing submitted" in out
    assert not (tmp_path / "ws" / "runs").exists()
