"""The STOP request's typed kind (budget_lab/rundir.py): written, read back, and inferred from the
words of files written before the kind existed."""

import json

import pytest

from budget_lab.rundir import (
    PLANNED_CUTS,
    STOP_FILE,
    CutKind,
    cut_kind,
    read_stop,
    request_stop_file,
)


def test_a_stop_request_reads_back_with_its_kind(tmp_path):
    assert read_stop(tmp_path) is None
    request_stop_file(tmp_path, "pruned at $0.0100 (FID 50.0)", kind=CutKind.PRUNED)
    stop = read_stop(tmp_path)
    assert stop is not None and stop.kind is CutKind.PRUNED and stop.time is not None
    assert stop.result_fields() == {
        "cut_reason": "pruned at $0.0100 (FID 50.0)",
        "cut_kind": "pruned",
    }
    assert cut_kind(stop.result_fields()) is CutKind.PRUNED


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("trial budget $0.0500 reached", CutKind.TRIAL_BUDGET),
        ("pruned at $0.0100 (FID 50.0)", CutKind.PRUNED),
        ("budget cap reached", CutKind.BUDGET_CAP),
        ("lagging at $0.002", CutKind.OTHER),
    ],
)
def test_old_stop_files_and_results_without_a_kind_still_read(tmp_path, reason, kind):
    (tmp_path / STOP_FILE).write_text(json.dumps({"reason": reason, "time": 1.0}))
    stop = read_stop(tmp_path)
    assert stop is not None and stop.kind is kind and stop.reason == reason
    assert cut_kind({"status": "cut", "cut_reason": reason}) is kind


def test_the_kind_wins_over_the_words_and_unknown_kinds_are_other(tmp_path):
    assert cut_kind({"cut_kind": "budget_cap", "cut_reason": "pruned at $1"}) is CutKind.BUDGET_CAP
    assert cut_kind({"cut_kind": "from-the-future"}) is CutKind.OTHER
    assert cut_kind({}) is CutKind.OTHER and CutKind.OTHER not in PLANNED_CUTS
    (tmp_path / STOP_FILE).write_text("not json")
    stop = read_stop(tmp_path)
    assert stop is not None and stop.kind is CutKind.OTHER and stop.reason == "stop requested"
