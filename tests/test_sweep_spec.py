"""Sweep specs: every shipped sweep loads and composes into runnable trials, bad files are refused
with the valid choices, the objectives follow their formulas, and the dollar-rung pruner cuts a
lagging trial in a real (in-memory) Optuna study."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from budget_lab.config import compose_run, model_config
from budget_lab.errors import ConfigError
from budget_lab.sweep import (
    DERIVED_TARGETS,
    OBJECTIVES,
    ParamSpec,
    SweepSpec,
    budget_steps,
    fid_per_dollar,
    fid_reports,
    grid_search_space,
    list_sweeps,
    load_sweep,
    make_pruner,
    make_sampler,
    metric_names,
    objective_values,
    pareto_front,
    report_fid,
    resolve_rungs,
    should_prune,
    study_directions,
    suggest,
    sweep_from_dict,
    sweep_to_dict,
    trial_config,
    trial_overrides,
)
from budget_lab.sweep.compose import _yaml_value
from model.microdit import MicroDiT

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ("mask_ratio", "experts", "width", "mixer", "routing", "joint", "equal_cost")


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


_MINIMAL = """
recipe: nano
sampler: random
n_trials: 3
params:
  - {name: mask_ratio, target: mask_ratio, type: float, low: 0.0, high: 0.9}
"""

# ------------------------------------------------------------------------------------------------
# Shipped sweeps.
# ------------------------------------------------------------------------------------------------


def test_the_shipped_sweeps_are_listed_and_the_format_is_documented():
    assert set(SHIPPED) <= set(list_sweeps())
    readme = (Path(__file__).parents[1] / "sweeps" / "README.md").read_text()
    for f in [*dataclasses.fields(SweepSpec), *dataclasses.fields(ParamSpec)]:
        assert f"`{f.name}`" in readme, f"sweeps/README.md does not document {f.name}"
    for name in [*SHIPPED, *DERIVED_TARGETS, *OBJECTIVES]:
        assert f"`{name}`" in readme, f"sweeps/README.md does not mention {name}"


def _forward(cfg) -> None:
    """One training-mode forward of the trial's model at its first phase's mask ratio."""
    mcfg = model_config(cfg)
    torch.manual_seed(0)
    net = MicroDiT(mcfg).train()
    x = torch.randn(2, mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    captions = torch.randn(2, 4, mcfg.caption_dim)
    out, keep = net(x, torch.zeros(2), captions, mask_ratio=cfg.phases[0].mask_ratio)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_sweep_composes_for_sampled_params(name):
    spec = load_sweep(name)
    assert spec.name == name and spec.description and spec.cluster == "local"
    assert study_directions(spec) == list(
        {"pareto": ("minimize",) * 2, "fid_at_budget": ("minimize",)}.get(
            spec.objective, ("maximize",)
        )
    )
    make_sampler(spec), make_pruner(spec)  # the spec's own sampler and pruner build
    study = optuna.create_study(
        directions=study_directions(spec), sampler=optuna.samplers.RandomSampler(seed=1)
    )
    for _ in range(4):
        trial = study.ask()
        params = suggest(trial, spec)
        assert params == trial.params
        overrides = trial_overrides(spec, params)
        cfg = compose_run(spec.recipe, [*overrides, f"name={name}-000"])
        assert cfg == trial_config(spec, params, [f"name={name}-000"])
        for key, value in spec.eval.items():
            assert getattr(cfg.eval, key) == value
        _forward(cfg)


def test_mask_ratio_is_the_small_reproducible_main_job():
    spec = load_sweep("mask_ratio")
    assert spec.objective == "fid_at_budget" and spec.sampler == "grid" and spec.slots == 1
    assert spec.n_trials == 2 and spec.recipe == "nano" and spec.pruner == "none"
    assert spec.trial_budget_usd is not None and spec.trial_budget_usd <= 0.01  # ~5 min a trial
    cfg = trial_config(spec, {"mask_ratio": 0.75})
    assert all(p.batch_size <= 64 for p in cfg.phases)
    # N sets the interval's width; a sample and its Inception features cost ~1 s on 2 cores
    assert 100 <= cfg.eval.fid_samples <= 256 and cfg.eval.sampler_steps <= 16
    # The knob sets the masked phase only; the finetune stays unmasked.
    assert [(p.name, p.mask_ratio) for p in cfg.phases] == [
        ("masked-pretrain", 0.75),
        ("finetune", 0.0),
    ]
    # The grid covers exactly the declared ratios, in an order fixed by the seed.
    orders = []
    for _ in range(2):
        study = optuna.create_study(directions=study_directions(spec), sampler=make_sampler(spec))
        seen = []
        for _ in range(spec.n_trials):
            trial = study.ask()
            seen.append(suggest(trial, spec)["mask_ratio"])
            study.tell(trial, [100.0])  # the last grid point does not raise in ask/tell
        orders.append(seen)
    assert sorted(orders[0]) == [0.0, 0.75]
    assert orders[0] == orders[1]


def test_grid_covers_every_declared_combination(tmp_path):
    path = _write(
        tmp_path,
        """
sampler: grid
params:
  - {name: mask_ratio, target: mask_ratio, type: float, low: 0.0, high: 0.5, step: 0.25}
  - {name: experts, target: experts, type: categorical, choices: [0, 2]}
  - {name: lws, target: model.layerwise_scaling, type: bool}
""",
    )
    spec = load_sweep(path)
    assert grid_search_space(spec) == {
        "mask_ratio": [0.0, 0.25, 0.5],
        "experts": [0, 2],
        "lws": [False, True],
    }
    assert spec.n_trials == spec.grid_size() == 12
    study = optuna.create_study(directions=study_directions(spec), sampler=make_sampler(spec))
    seen = set()
    for _ in range(spec.n_trials):
        trial = study.ask()
        seen.add(tuple(suggest(trial, spec).values()))
        study.tell(trial, [1.0, 1.0])
    assert seen == set(itertools.product([0.0, 0.25, 0.5], [0, 2], [False, True]))


# ------------------------------------------------------------------------------------------------
# Knobs and overrides.
# ------------------------------------------------------------------------------------------------


def test_derived_knobs_set_what_they_document():
    spec = load_sweep("joint")
    # A strategy that is not chosen sets its ratio to the default 0: no masking, no route.
    cfg = trial_config(spec, {"strategy": "none", "experts": 0, "mixer_depth": 2})
    assert cfg.phases[0].mask_ratio == 0.0 and model_config(cfg).routes == ()
    assert model_config(cfg).num_experts == 0
    cfg = trial_config(
        spec,
        {
            "strategy": "both",
            "mask_ratio": 0.5,
            "route_ratio": 0.25,
            "experts": 8,
            "mixer_depth": 0,
        },
    )
    route = model_config(cfg).routes[0]
    assert cfg.phases[0].mask_ratio == 0.5 and cfg.phases[1].mask_ratio == 0.0
    assert (route.start, route.end, route.ratio) == (1, 5, 0.25)  # micro: depth 6
    # width scales the mixer with the backbone; the first-block ratios keep the last block's.
    spec = load_sweep("width")
    cfg = model_config(
        trial_config(
            spec,
            {
                "layerwise_scaling": True,
                "attn_ratio_first": 0.3,
                "ffn_ratio_first": 1.0,
                "width": 288,
            },
        )
    )
    assert cfg.dim == 288 and cfg.mixer_dim == 192  # micro: 128 * 288 / 192 = 192
    assert cfg.attn_ratio == (0.3, 1.0) and cfg.ffn_ratio == (1.0, 4.0)
    # The routing sweep's spans: start and end as sampled.
    spec = load_sweep("routing")
    cfg = model_config(trial_config(spec, {"route_ratio": 0.6, "route_start": 2, "route_end": 3}))
    assert [(r.start, r.end, r.ratio) for r in cfg.routes] == [(2, 3, 0.6)]
    assert set(DERIVED_TARGETS) >= {"mask_ratio", "experts", "width", "route_ratio"}


def test_mask_ratio_knob_covers_every_masked_phase(tmp_path):
    path = _write(
        tmp_path,
        _MINIMAL.replace("recipe: nano", "recipe: microdit-xl"),
    )
    cfg = trial_config(load_sweep(path), {"mask_ratio": 0.5})
    assert [p.mask_ratio for p in cfg.phases] == [0.5, 0.0, 0.5, 0.0]


def test_override_values_read_back_exactly():
    rng = random.Random(0)
    values = [0.0, 1e-5, 2.5e-4, 1e20, -3.0, 7, True, False, None, "naive", "a: b", [0.5, 1.0]]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-8, 8) for _ in range(200)]
    values += [{"start": 1, "end": 3, "ratio": 0.5}]
    for v in values:
        assert yaml.safe_load(_yaml_value(v)) == v


def test_params_that_do_not_compose_are_refused(tmp_path):
    path = _write(
        tmp_path,
        _MINIMAL + "  - {name: dim, target: model.dim, type: int, low: 100, high: 128}\n",
    )
    with pytest.raises(ConfigError, match=r"params\[dim\]: model.dim=100.*head_dim"):
        load_sweep(path)
    spec = load_sweep("mask_ratio")
    with pytest.raises(ConfigError, match="sweep's params are mask_ratio"):
        trial_overrides(spec, {"mask_ratio": 0.5, "lr": 1.0})
    with pytest.raises(ConfigError, match="mask_ratio"):
        trial_overrides(spec, {"mask_ratio": 1.0})  # outside the phase's [0, 1)


def test_load_overrides_and_round_trip():
    spec = load_sweep("width", ["n_trials=3", "params.3.high=256", "eval.fid_samples=32"])
    assert spec.n_trials == 3 and spec.params[3].high == 256 and spec.fid_samples == 32
    assert sweep_from_dict(sweep_to_dict(spec)) == spec
    with pytest.raises(ConfigError, match="valid sweep keys: name, description"):
        load_sweep("width", ["n_trails=3"])
    with pytest.raises(ConfigError, match="valid keys: name, target"):
        load_sweep("width", ["params.0.hi=3"])


def test_budget_steps_spend_the_trial_budget():
    spec = load_sweep("equal_cost")
    cfg = trial_config(spec, {"mask_ratio": 0.75})
    per_step = [0.001, 0.002]  # $ per optimizer step in each phase
    overrides = budget_steps(spec, cfg, per_step)
    out = compose_run(spec.recipe, [*trial_overrides(spec, {"mask_ratio": 0.75}), *overrides])
    steps = [p.steps for p in out.phases]
    spent = sum(n * u for n, u in zip(steps, per_step, strict=True))
    assert spent <= spec.trial_budget_usd and spent > spec.trial_budget_usd - 0.004
    ratio = [a.steps / b.steps for a, b in zip(out.phases, cfg.phases, strict=True)]
    assert abs(ratio[0] - ratio[1]) < 0.01  # the recipe's proportions
    spec = load_sweep("equal_cost", ["budget_split=[0.8, 0.2]"])
    out = compose_run(spec.recipe, budget_steps(spec, cfg, per_step))
    assert [p.steps for p in out.phases] == [800, 100]


# ------------------------------------------------------------------------------------------------
# Bad sweep files.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"objective": "fid"}, "expected pareto, fid_at_budget or fid_per_dollar"),
        ({"sampler": "cmaes"}, "expected tpe, nsga2, random or grid"),
        ({"pruner": "median"}, "expected none or dollar_rungs"),
        ({"n_trails": 3}, "valid sweep keys: name, description, recipe"),
        ({"recipe": "tiny"}, "unknown recipe 'tiny'; valid recipes: microdit-xl, nano"),
        ({"params": []}, "at least one param"),
        ({"params": [{"name": "r", "target": "mask", "low": 0, "high": 1}]}, "mask_ratio, experts"),
        ({"params": [{"name": "r", "target": "mask_ratio", "lo": 0}]}, "valid keys: name, target"),
        ({"params": [{"name": "r", "type": "choice"}]}, "float, int, categorical or bool"),
        ({"params": [{"name": "r", "type": "categorical"}]}, "non-empty list"),
        ({"sampler": "grid", "n_trials": None}, "needs discrete values: add `grid"),
        ({"objective": "fid_at_budget"}, "set it"),
        ({"rungs_usd": [0.1]}, "set pruner: dollar_rungs"),
        ({"pruner": "dollar_rungs"}, "needs rungs_usd, rung_fractions or phase_rung"),
        ({"pruner": "dollar_rungs", "rungs_usd": [0.2, 0.1]}, "increasing"),
        ({"eval": {"fid": 10}}, "valid eval keys: fid_samples"),
        ({"n_trials": "many"}, "could not be converted to Integer"),
    ],
)
def test_bad_sweep_files_say_what_is_valid(tmp_path, edit, message):
    raw = yaml.safe_load(_MINIMAL)
    raw.update(edit)
    path = _write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path)
    assert str(path) in str(err.value)


def test_bad_search_spaces(tmp_path):
    def refused(params: list[dict], message: str, **top) -> None:
        raw = {"sampler": "random", "n_trials": 3, "params": params, **top}
        with pytest.raises(ConfigError, match=message):
            load_sweep(_write(tmp_path, yaml.safe_dump(raw)))

    r = {"name": "r", "target": "mask_ratio", "type": "float", "low": 0.0, "high": 0.9}
    refused([r, {**r, "when": {"s": ["a"]}}], "unique")
    refused([{**r, "when": {"s": ["a"]}}], "names a param declared before this one")
    refused([{**r, "default": 0.0}], "add `when`")
    refused([{**r, "grid": [0.95]}], r"a float in \[0.0, 0.9\]")
    refused([{**r, "log": True}], "log scale needs low > 0")
    grid = {**r, "grid": [0.0, 0.25, 0.5, 0.75, 0.9]}
    refused([grid], "the grid has 5 points", sampler="grid", n_trials=6)
    refused(
        [
            {"name": "a", "target": "route_start", "type": "int", "low": 0, "high": 2},
            {"name": "b", "target": "route_end", "type": "int", "low": 2, "high": 3},
        ],
        "route_end's smallest value must exceed",
    )
    raw = {"sampler": "grid", "params": [grid]}
    assert load_sweep(_write(tmp_path, yaml.safe_dump(raw))).n_trials == 5


def test_unknown_sweep_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown sweep 'mask'; valid sweeps: .*mask_ratio"):
        load_sweep("mask")


# ------------------------------------------------------------------------------------------------
# Objectives.
# ------------------------------------------------------------------------------------------------


def _brute_front(points):
    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)}


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for n in list(range(0, 8)) + [30, 100] * 20:
        # Small integer grids make ties in FID, in cost, and whole duplicate points.
        scale = rng.choice([3, 10, 1000])
        points = [(rng.randint(0, scale), rng.randint(0, scale)) for _ in range(n)]
        front = pareto_front(points)
        assert set(front) == _brute_front(points) and len(front) == len(set(front))
        assert [points[i][1] for i in front] == sorted(points[i][1] for i in front)
    assert pareto_front([(1.0, 2.0), (1.0, 2.0), (2.0, 1.0), (2.0, 2.0)]) == [2, 0, 1]
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(math.nan, 1.0)])


def test_objective_formulas():
    assert objective_values("pareto", 120.0, 0.5) == [120.0, 0.5]
    assert objective_values("fid_at_budget", 120.0, 0.5) == [120.0]
    # (F0 - F) / C: 240 FID points bought with $0.50.
    assert objective_values("fid_per_dollar", 120.0, 0.5, fid_baseline=360.0) == [480.0]
    assert fid_per_dollar(400.0, 2.0, 360.0) == -20.0  # worse than untrained: negative
    assert metric_names("pareto") == ["fid", "cost_usd"]
    with pytest.raises(ConfigError, match="needs a positive cost"):
        fid_per_dollar(100.0, 0.0, 300.0)
    with pytest.raises(ValueError, match="fid_baseline"):
        objective_values("fid_per_dollar", 120.0, 0.5)
    with pytest.raises(ValueError, match="FAILED"):
        objective_values("pareto", math.nan, 0.5)


# ------------------------------------------------------------------------------------------------
# Pruning in dollars.
# ------------------------------------------------------------------------------------------------


def _pruning_spec(**edit):
    overrides = ["pruner=dollar_rungs", "rungs_usd=[0.1,0.2]", "phase_rung=true"]
    return load_sweep("mask_ratio", overrides + [f"{k}={v}" for k, v in edit.items()])


@pytest.mark.parametrize("directions", [["minimize", "minimize"], ["minimize"]])
def test_pruner_cuts_a_lagging_trial_at_a_dollar_rung(directions):
    spec = _pruning_spec()
    assert resolve_rungs(spec) == [0.1, 0.2]
    study = optuna.create_study(directions=directions, pruner=make_pruner(spec))
    finished = [0.0] * len(directions)
    for fid in (100.0, 120.0, 140.0):  # three peers passed rung $0.10
        peer = study.ask()
        report_fid(peer, fid, 0.1004, rung_usd=0.1)
        study.tell(peer, finished)
    good, bad = study.ask(), study.ask()
    report_fid(good, 110.0, 0.101, rung_usd=0.1)
    report_fid(bad, 150.0, 0.102, rung_usd=0.1)
    assert not should_prune(good)  # better than the median 120 (+ the other trial's 150)
    assert should_prune(bad)
    study.tell(bad, state=optuna.trial.TrialState.PRUNED)
    assert fid_reports(study.trials[-1])[-1]["fid"] == 150.0
    # At the next rung nobody else has a value yet: too few peers to judge.
    report_fid(good, 500.0, 0.2, rung_usd=0.2)
    assert not should_prune(good)


def test_pruner_judges_the_phase_rung_against_cheaper_peers_only():
    spec = _pruning_spec()
    study = optuna.create_study(directions=["minimize", "minimize"], pruner=make_pruner(spec))
    for fid, spent in ((150.0, 0.05), (160.0, 0.06), (90.0, 0.20)):
        peer = study.ask()
        report_fid(peer, fid, spent, phase="masked-pretrain")
    cheap = study.ask()  # worse than everyone, but reached the phase's end most cheaply
    report_fid(cheap, 200.0, 0.04, phase="masked-pretrain")
    assert not should_prune(cheap)
    costly = study.ask()  # worse than the two cheaper peers: cut before finetuning is paid for
    report_fid(costly, 170.0, 0.10, phase="masked-pretrain")
    assert should_prune(costly)
    fair = study.ask()
    report_fid(fair, 155.0, 0.10, phase="masked-pretrain")  # beats the median of 150, 160
    assert not should_prune(fair)
    assert not should_prune(study.ask())  # no report yet


def test_pruner_percentile_min_peers_and_missing_fids():
    spec = _pruning_spec(prune_percentile=100, prune_min_peers=3)
    study = optuna.create_study(pruner=make_pruner(spec))
    peers = [study.ask() for _ in range(3)]
    for t, fid in zip(peers, (100.0, 200.0, math.nan), strict=True):
        report_fid(t, fid, 0.1, rung_usd=0.1)
    trial = study.ask()
    report_fid(trial, 1e6, 0.1, rung_usd=0.1)
    assert not should_prune(trial)  # the 100th percentile is the diverged (infinite) peer
    report_fid(trial, math.nan, 0.2, rung_usd=0.2)
    assert fid_reports(trial)[-1]["fid"] is None
    study2 = optuna.create_study(pruner=make_pruner(_pruning_spec(prune_min_peers=3)))
    two = [study2.ask() for _ in range(2)]
    for t in two:
        report_fid(t, 100.0, 0.1, rung_usd=0.1)
    lagging = study2.ask()
    report_fid(lagging, 300.0, 0.1, rung_usd=0.1)
    assert not should_prune(lagging)  # only two peers: not enough to judge
    with pytest.raises(ConfigError, match="give rung_usd or phase"):
        report_fid(lagging, 1.0, 0.1)


def test_rung_fractions_resolve_against_the_trial_budget():
    spec = load_sweep("equal_cost")
    assert resolve_rungs(spec) == [0.5 * spec.trial_budget_usd]
    spec = load_sweep("joint")
    assert resolve_rungs(spec, trial_cost_usd=2.0) == [0.5, 1.0]
    with pytest.raises(ValueError, match="trial_cost_usd"):
        resolve_rungs(spec)
