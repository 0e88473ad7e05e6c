"""Sweeps: Optuna ask/tell over launched jobs, judged on FID and dollars.

    spec      what a sweep is: search space, trial recipe, objective; loading a sweep file
    compose   from sampled params to a trial's run config (and checking a sweep against its recipe)
    sampler   the study's directions, the sampler, the params it suggests
    pruner    intermediate FIDs at dollar rungs, and the pruner that judges them
    objectives  how a finished trial is scored (Pareto front of FID and $, FID at equal cost, ...)
    decide    what a sweep found beyond the noise
    controller  the ask/tell loop over launched jobs (SweepController); storage: the study's file

One trial, as the controller runs it:

    spec = load_sweep("mask_ratio", ["n_trials=3"])               # YAML < overrides, validated
    study = optuna.create_study(directions=study_directions(spec),
                                sampler=make_sampler(spec), pruner=make_pruner(spec))
    trial = study.ask()
    params = suggest(trial, spec)                                 # {"mask_ratio": 0.75}
    cfg = trial_config(spec, params, [f"name={run}"])
    ...                                                           # train; at each dollar rung:
    report_fid(trial, fid, spent_usd, rung_usd=r)                 # or phase="masked-pretrain"
    if should_prune(trial): study.tell(trial, state=TrialState.PRUNED)
    ...                                                           # finished:
    study.tell(trial, objective_values(spec, fid, cost_usd, fid_baseline))

Money is in US dollars (floats) everywhere.
"""

from budget_lab.sweep.compose import (
    DERIVED_TARGETS,
    TrialComposer,
    base_config,
    base_overrides,
    budget_steps,
    masked_phases,
    param_overrides,
    phase_rung_phases,
    trial_config,
    trial_overrides,
)
from budget_lab.sweep.objectives import (
    FORMULAS,
    OBJECTIVES,
    fid_at_budget,
    fid_per_dollar,
    metric_names,
    objective_formula,
    objective_values,
    pareto_front,
)
from budget_lab.sweep.pruner import (
    FID_REPORTS_ATTR,
    DollarRungPruner,
    fid_reports,
    make_pruner,
    report_fid,
    resolve_rungs,
    should_prune,
)
from budget_lab.sweep.sampler import grid_search_space, make_sampler, study_directions, suggest
from budget_lab.sweep.spec import (
    PARAM_TYPES,
    PRUNERS,
    REPEAT_PARAM,
    SAMPLERS,
    SWEEPS_DIR,
    ParamSpec,
    SweepSpec,
    list_sweeps,
    load_sweep,
    sweep_from_dict,
    sweep_path,
    sweep_to_dict,
)

__all__ = [
    "OBJECTIVES",
    "FORMULAS",
    "objective_formula",
    "objective_values",
    "fid_per_dollar",
    "fid_at_budget",
    "metric_names",
    "pareto_front",
    "SWEEPS_DIR",
    "SAMPLERS",
    "PRUNERS",
    "PARAM_TYPES",
    "DERIVED_TARGETS",
    "FID_REPORTS_ATTR",
    "REPEAT_PARAM",
    "ParamSpec",
    "SweepSpec",
    "list_sweeps",
    "sweep_path",
    "load_sweep",
    "sweep_to_dict",
    "sweep_from_dict",
    "base_config",
    "TrialComposer",
    "masked_phases",
    "phase_rung_phases",
    "suggest",
    "trial_overrides",
    "param_overrides",
    "base_overrides",
    "trial_config",
    "budget_steps",
    "grid_search_space",
    "make_sampler",
    "make_pruner",
    "study_directions",
    "resolve_rungs",
    "DollarRungPruner",
    "report_fid",
    "fid_reports",
    "should_prune",
]
