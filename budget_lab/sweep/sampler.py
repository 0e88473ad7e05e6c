"""Optuna's side of a sweep: the study's directions, the sampler, and the params it suggests.

study = optuna.create_study(directions=study_directions(spec), sampler=make_sampler(spec),
                            pruner=make_pruner(spec))             # make_pruner: pruner.py
trial = study.ask()
params = suggest(trial, spec)                                     # {"mask_ratio": 0.75}
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import optuna

from budget_lab.errors import check
from budget_lab.sweep.objectives import directions
from budget_lab.sweep.spec import SweepSpec

__all__ = ["study_directions", "suggest", "grid_search_space", "make_sampler"]


def study_directions(spec: SweepSpec) -> list[str]:
    """Directions for `optuna.create_study(directions=...)`: see budget_lab.sweep.objectives."""
    return directions(spec)


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the trial's params in the spec's order (a param whose `when` is false is skipped).
    The returned dict equals `trial.params`, which `trial_overrides` turns into a run config."""
    values: dict[str, Any] = {}
    for p in spec.params:
        if not p.active(values):
            continue
        if p.type == "float":
            assert p.low is not None and p.high is not None
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            values[p.name] = trial.suggest_int(
                p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        elif p.type == "bool":
            values[p.name] = trial.suggest_categorical(p.name, [False, True])
        else:
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices or []))
    return values


def grid_search_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """{param: the values the grid sampler visits}."""
    space = {p.name: p.grid_values() for p in spec.params}
    missing = [k for k, v in space.items() if v is None]
    check(not missing, "params", missing, "the grid sampler needs `grid` values or a `step`")
    return space  # type: ignore[return-value]


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its `study.stop()` at the last grid point, which raises in an
    ask/tell loop (Optuna allows `stop` only inside `optimize`); the controller counts trials."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The sampler, seeded with spec.seed.

    grid: every combination of the params' grid values, in an order shuffled by the seed.
    tpe: multivariate TPE (grouped, for conditional params), random for its first
    min(10, max(3, n_trials // 4)) trials, with constant liar when slots > 1.
    nsga2: NSGA-II with `population` (default n_trials // 5 within [4, 50]).
    random: independent uniform samples.
    """
    n = spec.n_trials or 1
    with warnings.catch_warnings():  # multivariate TPE and constant liar are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler == "grid":
            return _AskTellGridSampler(grid_search_space(spec), seed=spec.seed)
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=spec.seed)
        if spec.sampler == "nsga2":
            population = spec.population or min(50, max(4, n // 5))
            return optuna.samplers.NSGAIISampler(population_size=population, seed=spec.seed)
        return optuna.samplers.TPESampler(
            seed=spec.seed,
            n_startup_trials=min(10, max(3, n // 4)),
            multivariate=True,
            group=True,
            constant_liar=spec.slots > 1,
        )
