"""Decisions that respect noise (budget_lab/sweep/decide.py), the noise-aware dollar-rung pruner
(sweep/pruner.py) and `repeats` (sweep/spec.py), on constructed trials."""

from __future__ import annotations

import optuna
import pytest

from budget_lab.errors import ConfigError
from budget_lab.eval.measurement import Measurement
from budget_lab.sweep import DollarRungPruner, load_sweep, param_overrides, report_fid
from budget_lab.sweep.decide import (
    Config,
    attach_paired,
    config_from_rows,
    decide,
    robust_front,
    tiers,
)


def _m(value: float, half: float, n: int = 256) -> Measurement:
    return Measurement(value, value - half, value + half, half / 1.96, n, "jackknife-20")


def _config(key: str, fid: float, half: float, cost: float = 0.005) -> Config:
    m = _m(fid, half)
    return Config(key, {"r": key}, [0], m, cost, m)


def test_tiers_group_overlapping_intervals_behind_their_leader():
    scores = [_m(300, 5), _m(280, 5), _m(284, 5), _m(296, 5), _m(250, 3)]
    assert tiers(scores) == [[4], [1, 2], [3, 0]]
    assert tiers([_m(10, 1)]) == [[0]]


def test_best_reports_ties_and_the_verdict_says_what_it_could_not_tell_apart():
    configs = [
        _config("r=0", 320, 6),
        _config("r=0.5", 290, 6),
        _config("r=0.75", 286, 6),
        _config("r=0.9", 300, 6),
    ]
    d = decide(configs, "fid_at_budget")
    assert d.best == "r=0.75" and d.tied_with_best == ["r=0.5"]
    assert d.tiers == [["r=0.75", "r=0.5"], ["r=0.9"], ["r=0"]] and d.separates
    assert d.front == ["r=0.75", "r=0.5"]  # one objective: the front is tier 1
    assert "tied within the noise with r=0.5" in d.verdict
    assert "Indistinguishable from each other: {r=0.75, r=0.5}" in d.verdict
    # everything within the noise: one tier, and the verdict says so
    flat = decide([_config("a", 300, 8), _config("b", 305, 8)], "fid_at_budget")
    assert not flat.separates and flat.tied_with_best == ["b"]
    assert "Could not tell the configurations apart" in flat.verdict


def test_a_paired_difference_tells_apart_what_overlapping_intervals_cannot():
    """Same captions and noise: the paired interval of the difference decides, both ways."""
    configs = [_config("r=0", 241, 8.4), _config("r=0.75", 229, 8.5), _config("r=0.9", 230, 6.4)]
    assert not decide(configs, "fid_at_budget").separates  # every interval overlaps the best
    attach_paired(
        configs,
        {
            ("r=0.75", "r=0"): _m(-11.8, 9.2),  # [-21.0, -2.6]: apart
            ("r=0.75", "r=0.9"): _m(-0.5, 8.7),  # includes 0: tied
            ("r=0", "r=0.9"): _m(11.2, 10.4),
        },
    )
    assert configs[0].paired["r=0.75"].value == pytest.approx(11.8)  # both directions
    d = decide(configs, "fid_at_budget")
    assert d.tiers == [["r=0.75", "r=0.9"], ["r=0"]] and d.separates
    assert d.best == "r=0.75" and d.tied_with_best == ["r=0.9"]
    assert "r=0.75 minus r=0: -11.8 [-21.0, -2.6] N=256 (apart)" in d.verdict
    assert "r=0.75 minus r=0.9: -0.5 [-9.2, 8.2] N=256 (includes 0: tied)" in d.verdict
    # a pareto front drops a point whose paired FID is worse at the same cost
    fronted = decide(configs, "pareto")
    assert "r=0" not in fronted.front and set(fronted.front) == {"r=0.75", "r=0.9"}


def test_noise_aware_front_keeps_points_that_only_noise_would_remove():
    fids = [_m(300, 5), _m(302, 5), _m(280, 5), _m(330, 5)]
    costs = [0.0040, 0.0030, 0.0050, 0.0042]
    front, groups = robust_front(fids, costs, cost_tolerance=0.1)
    # 0 is beaten by 1 only inside the FID noise but 1 is cheaper beyond the tolerance: 0 leaves;
    # 3 is worse beyond the noise and not cheaper beyond the tolerance than 0 or 1: it leaves.
    assert front == [1, 2]
    assert groups == []
    # the plain front would drop 1 when its FID is a hair worse and its cost a hair higher;
    # within the noise and the tolerance, both stay, and are reported as not told apart
    fids = [_m(300.0, 5), _m(300.5, 5)]
    front, groups = robust_front(fids, [0.00400, 0.00404], cost_tolerance=0.1)
    assert front == [0, 1] and groups == [[0, 1]]
    # beyond the noise in FID and not more expensive: dominated
    front, _ = robust_front([_m(280, 5), _m(300, 5)], [0.004, 0.004], cost_tolerance=0.1)
    assert front == [0]


def test_pareto_decision_marks_the_front_and_ties():
    configs = [
        _config("r=0", 300, 5, cost=0.0042),
        _config("r=0.75", 298, 5, cost=0.0030),
        _config("r=0.9", 330, 5, cost=0.0020),
    ]
    d = decide(configs, "pareto", cost_tolerance=0.1)
    assert d.front == ["r=0.9", "r=0.75"]  # r=0 costs more beyond the tolerance, FID tied
    assert d.best == "r=0.75" and d.tied_with_best == []
    assert "Front (not clearly dominated" in d.verdict
    # within the cost tolerance, a point worse beyond the FID noise is dominated
    d = decide([*configs[:2], _config("r=0.9", 330, 5, cost=0.0029)], "pareto", 0.1)
    assert d.front == ["r=0.75"]


def test_repeats_are_merged_into_one_configuration():
    rows = [
        {
            "number": i,
            "params": {"r": r, "repeat": k},
            "fid": f,
            "fid_ci95": [f - 4, f + 4],
            "fid_se": 2.0,
            "fid_n": 64,
            "cost_usd": 0.004,
        }
        for i, (r, k, f) in enumerate(
            [(0.0, 0, 310.0), (0.0, 1, 314.0), (0.0, 2, 312.0), (0.75, 0, 290.0), (0.75, 1, 294.0)]
        )
    ]
    from budget_lab.sweep.decide import group_repeats

    groups = group_repeats(rows, "repeat")
    assert [(k, [r["number"] for r in g]) for k, _, g in groups] == [
        ("r=0", [0, 1, 2]),
        ("r=0.75", [3, 4]),
    ]
    c = config_from_rows(groups[0][0], groups[0][1], groups[0][2], "fid_at_budget")
    assert c is not None and c.trials == [0, 1, 2] and c.fid.value == pytest.approx(312.0)
    assert "3 repeats" in c.fid.method and c.fid.lo < 312.0 < c.fid.hi


def test_repeats_add_a_seed_param_and_need_the_grid_sampler():
    spec = load_sweep("mask_ratio", ["repeats=3"])
    repeat = spec.params[-1]
    assert repeat.name == "repeat" and repeat.target == "seed_offset" and repeat.high == 2
    assert spec.n_trials == 2 * 3  # two ratios x three seeds
    assert "seed=2" in param_overrides(spec, {"mask_ratio": 0.5, "repeat": 2})
    with pytest.raises(ConfigError, match="repeats need the grid sampler"):
        load_sweep("mask_ratio", ["repeats=2", "sampler=tpe", "n_trials=4"])


def _study_with_rung_reports(reports):
    study = optuna.create_study(directions=["minimize", "minimize"])
    trials = []
    for fid, se in reports:
        trial = study.ask()
        report_fid(trial, fid, 0.002, rung_usd=0.002, se=se)
        trials.append(trial)
    return study, trials


def test_pruner_cuts_only_a_lag_beyond_the_noise():
    pruner = DollarRungPruner(percentile=50, min_peers=2, phase_rung=False, confidence=0.95)
    # peers at 300 +- se 4; a trial at 306 lags by 6 < 1.645 * sqrt(4^2 + 4^2) = 9.3: kept
    study, trials = _study_with_rung_reports([(300.0, 4.0), (300.0, 4.0), (306.0, 4.0)])
    frozen = study.get_trials()[2]
    assert not pruner.prune(study, frozen)
    # the same lag without noise is cut (the old rule, confidence 0.5)
    assert DollarRungPruner(50, 2, False, confidence=0.5).prune(study, frozen)
    # far behind: cut
    study, trials = _study_with_rung_reports([(300.0, 4.0), (300.0, 4.0), (330.0, 4.0)])
    assert pruner.prune(study, study.get_trials()[2])
    with pytest.raises(ConfigError, match="prune_confidence"):
        load_sweep("mask_ratio", ["prune_confidence=0.2"])
