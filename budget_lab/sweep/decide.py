"""Decisions that respect noise: best, ties, tiers and the Pareto front from scores with intervals.

A sweep's trials are scored with intervals (`budget_lab.eval.stats.Measurement`). Whatever the
sweep decides rests only on differences larger than the noise:

* **tied**: two scores whose 95 % intervals overlap are not told apart, unless a *paired*
  comparison tells them apart: two trials that sampled the same captions with the same noise
  (same N, seed and sampler) share much of their sampling noise, and the interval of their FID
  difference (`budget_lab.eval.stats.paired_fid_difference`) is narrower than the two intervals
  side by side; where one exists, FIDs are apart when it excludes 0 (`Config.paired`);
* **best**: the configuration with the best score, reported together with every configuration
  tied with it (its interval overlaps the best one's);
* **tiers**: the best configuration and those tied with it form tier 1; the same rule on the rest
  gives tier 2, and so on. Two tiers are separated by non-overlapping intervals between their
  leaders; a sweep "separates" its configurations when it finds at least two tiers;
* **front** (objective `pareto`): configuration i *clearly dominates* j when it is no worse in
  FID (i's interval lies below j's, or they overlap) and no worse in dollars (cheaper, or within
  `cost_tolerance` of j's cost: machine load moves a local trial's bill by several per cent), and
  clearly better in one of the two (FID intervals apart, or cheaper by more than the tolerance).
  The front is every configuration no other clearly dominates: a point leaves it only for a
  difference beyond the noise, so the same sweep run twice gives the same front. A front point
  is *distinct* when it differs beyond the noise from every other front point in FID or in $;
  points that do not are listed as indistinguishable. With one objective (`fid_at_budget`,
  `fid_per_dollar`) the front is tier 1: the best configuration and those tied with it.

With `repeats: k`, trials of one configuration (same params but the repeat's index) are first
merged into one score per configuration (`mean_over_repeats`), and the decisions are about
configurations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from budget_lab.eval.measurement import Measurement, mean_over_repeats
from budget_lab.units import usd

__all__ = [
    "Config",
    "Decision",
    "attach_paired",
    "pair_trials",
    "decide",
    "fid_apart",
    "group_repeats",
    "tiers",
    "robust_front",
]


@dataclass
class Config:
    """One configuration of a sweep: its params (the repeat's index left out), its trials, its
    objective score with interval (lower is better after the sign), FID and mean $."""

    key: str
    params: dict[str, Any]
    trials: list[int]
    fid: Measurement
    cost_usd: float
    score: Measurement  # the objective's value, oriented so that lower is better
    alignment: Measurement | None = None
    # Paired FID differences to other configurations (their key -> this FID minus theirs), from
    # samples of the same captions and noise; single-trial configurations only.
    paired: dict[str, Measurement] = field(default_factory=dict)


def attach_paired(configs: Sequence[Config], pairs: dict[tuple[str, str], Measurement]) -> None:
    """Give configurations their paired differences ({(a, b): FID_a - FID_b}, by config key)."""
    by_key = {c.key: c for c in configs}
    for (a, b), m in pairs.items():
        if a in by_key and b in by_key:
            by_key[a].paired[b] = m
            by_key[b].paired[a] = Measurement(
                -m.value, -m.hi, -m.lo, m.se, m.n, m.method, m.confidence
            )


def pair_trials(configs: Sequence[Config], rows: Sequence[dict[str, Any]], objective: str) -> None:
    """Attach paired FID differences to single-trial configurations of a FID-valued objective,
    from their runs' final evaluations (rows carry "number" and "run_dir"); repeats are compared
    by their means, unpaired."""
    if objective not in ("pareto", "fid_at_budget") or len(configs) < 2:
        return
    if any(len(c.trials) != 1 for c in configs):
        return
    from budget_lab.eval.evaluate import paired_differences  # torch: only when there is a pair

    run_dirs = {r["number"]: r.get("run_dir") for r in rows}
    folders = {c.key: run_dirs.get(c.trials[0]) for c in configs}
    attach_paired(configs, paired_differences({k: v for k, v in folders.items() if v}))


def fid_apart(a: Config, b: Config) -> bool:
    """Whether the FIDs of two configurations differ beyond the noise: by their paired
    difference where there is one (its interval excludes 0), else by non-overlapping intervals."""
    m = a.paired.get(b.key)
    if m is not None:
        return m.lo > 0 or m.hi < 0
    return not a.fid.overlaps(b.fid)


@dataclass
class Decision:
    """What a sweep found: best (and ties), tiers, the noise-aware front, and the verdict."""

    configs: list[Config]
    best: str | None = None  # key of the best configuration
    tied_with_best: list[str] = field(default_factory=list)  # keys, best excluded
    tiers: list[list[str]] = field(default_factory=list)
    front: list[str] = field(default_factory=list)  # pareto: the front; else tier 1
    indistinguishable: list[list[str]] = field(default_factory=list)  # front points not told apart
    verdict: str = ""

    @property
    def separates(self) -> bool:
        """At least two groups with non-overlapping intervals."""
        return len(self.tiers) >= 2


def tiers(
    scores: Sequence[Measurement], apart: Callable[[int, int], bool] | None = None
) -> list[list[int]]:
    """Indices in tiers: the lowest score and every score not apart from it (default: whose
    interval overlaps its interval), then the same on what is left (lower is better)."""

    def overlap_apart(i: int, j: int) -> bool:
        return not scores[i].overlaps(scores[j])

    apart = apart or overlap_apart
    left = sorted(range(len(scores)), key=lambda i: (scores[i].value, i))
    out = []
    while left:
        tier = [i for i in left if i == left[0] or not apart(i, left[0])]
        out.append(tier)
        left = [i for i in left if i not in tier]
    return out


def _cost_better(a: float, b: float, tolerance: float) -> bool:
    """a cheaper than b beyond the tolerance (relative to the larger)."""
    return a < b and (b - a) > tolerance * max(abs(a), abs(b))


def robust_front(
    fids: Sequence[Measurement],
    costs: Sequence[float],
    cost_tolerance: float,
    fid_apart: Callable[[int, int], bool] | None = None,
) -> tuple[list[int], list[list[int]]]:
    """(front, indistinguishable groups) of (FID interval, $) points, both minimised: see the
    module docstring. The front is sorted by cost; groups hold front indices that no difference
    beyond the noise separates (each group has two or more points). `fid_apart(i, j)`: whether
    two FIDs differ beyond the noise (default: non-overlapping intervals)."""
    n = len(fids)

    def overlap_apart(i: int, j: int) -> bool:
        return not fids[i].overlaps(fids[j])

    apart_fid = fid_apart or overlap_apart

    def clearly_dominates(i: int, j: int) -> bool:
        fid_better = fids[i].value < fids[j].value and apart_fid(i, j)
        fid_worse = fids[j].value < fids[i].value and apart_fid(i, j)
        cost_better = _cost_better(costs[i], costs[j], cost_tolerance)
        cost_worse = _cost_better(costs[j], costs[i], cost_tolerance)
        return not fid_worse and not cost_worse and (fid_better or cost_better)

    front = [j for j in range(n) if not any(clearly_dominates(i, j) for i in range(n) if i != j)]
    front.sort(key=lambda k: (costs[k], fids[k].value, k))

    def apart(i: int, j: int) -> bool:
        fid_differs = apart_fid(i, j)
        cost_apart = _cost_better(costs[i], costs[j], cost_tolerance) or _cost_better(
            costs[j], costs[i], cost_tolerance
        )
        return fid_differs or cost_apart

    groups: list[list[int]] = []
    for i in front:  # union of "not apart" pairs, in front order
        linked = [g for g in groups if any(not apart(i, j) for j in g)]
        merged = [k for g in linked for k in g] + [i]
        groups = [g for g in groups if g not in linked] + [sorted(merged, key=front.index)]
    return front, [g for g in groups if len(g) > 1]


def group_repeats(
    rows: Sequence[dict[str, Any]], repeat_param: str | None
) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(key, params without the repeat, rows) per configuration, in order of first appearance."""
    groups: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k != repeat_param}
        key = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or f"trial {row['number']}"
        groups.setdefault(key, (params, []))[1].append(row)
    return [(k, p, r) for k, (p, r) in groups.items()]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def decide(configs: list[Config], objective: str, cost_tolerance: float = 0.1) -> Decision:
    """Best and ties, tiers, (pareto) the noise-aware front, and the verdict in words."""
    decision = Decision(configs=configs)
    if not configs:
        decision.verdict = "no configuration finished with a score: nothing to compare"
        return decision
    by_key = {c.key: c for c in configs}
    scores = [c.score if objective != "pareto" else c.fid for c in configs]

    def apart(i: int, j: int) -> bool:  # FID-valued objectives may use paired differences
        return fid_apart(configs[i], configs[j])

    on_fid = objective in ("pareto", "fid_at_budget")
    ranked = [[configs[i].key for i in tier] for tier in tiers(scores, apart if on_fid else None)]
    decision.tiers = ranked
    if objective == "pareto":
        front, groups = robust_front(
            [c.fid for c in configs], [c.cost_usd for c in configs], cost_tolerance, apart
        )
        decision.front = [configs[i].key for i in front]
        decision.indistinguishable = [[configs[i].key for i in g] for g in groups]
        # Best: the lowest FID on the front; tied: front points whose FID overlaps it.
        best = min(front, key=lambda i: (configs[i].fid.value, configs[i].cost_usd))
        decision.best = configs[best].key
        decision.tied_with_best = [
            configs[i].key for i in front if i != best and not fid_apart(configs[i], configs[best])
        ]
    else:
        # One objective: its "front" is the best configuration and those tied with it.
        decision.best = ranked[0][0]
        decision.tied_with_best = ranked[0][1:]
        decision.front = list(ranked[0])
    decision.verdict = _verdict(decision, by_key, objective, cost_tolerance)
    return decision


def _describe(c: Config, objective: str) -> str:
    what = "FID" if objective in ("pareto", "fid_at_budget") else "FID points per $"
    score = c.fid if objective in ("pareto", "fid_at_budget") else _unoriented(c.score)
    reps = f", {len(c.trials)} repeats" if len(c.trials) > 1 else ""
    return f"{c.key} ({what} {score.text()}, {usd(c.cost_usd)}{reps})"


def _unoriented(m: Measurement) -> Measurement:
    """A maximised objective is stored negated (lower is better); give it back its sign."""
    return Measurement(-m.value, -m.hi, -m.lo, m.se, m.n, m.method, m.confidence)


def _verdict(d: Decision, by_key: dict[str, Config], objective: str, tolerance: float) -> str:
    lines = []
    best = by_key[d.best] if d.best else None
    if best is not None:
        label = "Lowest FID on the front" if objective == "pareto" else "Best"
        others = "every other front point" if objective == "pareto" else "every other"
        if d.tied_with_best:
            tied = "; ".join(_describe(by_key[k], objective) for k in d.tied_with_best)
            lines.append(
                f"{label}: {_describe(best, objective)}, tied within the noise with {tied}."
            )
        else:
            lines.append(
                f"{label}: {_describe(best, objective)}, ahead of {others} beyond the noise."
            )
    if len(d.tiers) >= 2:
        parts = [f"tier {n}: " + ", ".join(t) for n, t in enumerate(d.tiers, 1)]
        lines.append(
            "Separated into groups, best first (each group's best is apart beyond the noise "
            "from the best of the group above: non-overlapping 95% intervals, or a paired 95% "
            "interval of the FID difference that excludes 0): " + " | ".join(parts) + "."
        )
    else:
        lines.append(
            "Could not tell the configurations apart: every interval overlaps the best one's "
            "(more samples, more repeats or larger differences are needed)."
        )
    if best is not None and best.paired and objective in ("pareto", "fid_at_budget"):
        diffs = [
            f"{best.key} minus {k}: {m.text()}"
            + (" (apart)" if m.lo > 0 or m.hi < 0 else " (includes 0: tied)")
            for k, m in best.paired.items()
            if k in by_key
        ]
        lines.append(
            "Paired FID differences (same captions and sampler noise, N = "
            f"{best.fid.n}): " + "; ".join(diffs) + "."
        )
    not_told = [t for t in d.tiers if len(t) > 1]
    if not_told:
        lines.append(
            "Indistinguishable from each other: "
            + "; ".join("{" + ", ".join(t) + "}" for t in not_told)
            + "."
        )
    if objective == "pareto" and d.front:
        lines.append(
            "Front (not clearly dominated; $ within "
            f"{tolerance:.0%} count as equal): " + ", ".join(d.front) + "."
        )
        for g in d.indistinguishable:
            lines.append("On the front but not told apart: " + ", ".join(g) + ".")
    return "\n".join(lines)


def config_from_rows(
    key: str,
    params: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    objective: str,
    fid_baseline: float | None = None,
    confidence: float = 0.95,
) -> Config | None:
    """A configuration's merged score from its finished trials' rows (None without a score):
    rows carry fid, fid_ci95, fid_se, fid_n, cost_usd and optionally alignment (+ ci95, se)."""
    scored = [r for r in rows if r.get("fid") is not None and r.get("fid_ci95")]
    if not scored:
        return None
    fids = [_measurement(r, "fid", confidence) for r in scored]
    fid = mean_over_repeats(fids, confidence)
    cost = sum(r["cost_usd"] for r in scored) / len(scored)
    if objective == "fid_per_dollar" and fid_baseline is not None and cost > 0:
        # (F0 - F) / C, maximised: stored negated so that lower is better.
        value = (fid_baseline - fid.value) / cost
        half_lo, half_hi = (fid.hi - fid.value) / cost, (fid.value - fid.lo) / cost
        score = Measurement(
            -value,
            -value - half_lo,
            -value + half_hi,
            fid.se / cost,
            fid.n,
            fid.method,
            fid.confidence,
        )
    else:
        score = fid
    aligned = [r for r in scored if r.get("alignment") is not None and r.get("alignment_ci95")]
    alignment = None
    if aligned:
        alignment = mean_over_repeats(
            [_measurement(r, "alignment", confidence) for r in aligned], confidence
        )
    return Config(key, params, [r["number"] for r in scored], fid, cost, score, alignment)


def _measurement(row: dict[str, Any], name: str, confidence: float) -> Measurement:
    lo, hi = row[f"{name}_ci95"]
    se = row.get(f"{name}_se")
    if se is None:
        se = (hi - lo) / 3.92
    return Measurement(
        float(row[name]),
        float(lo),
        float(hi),
        float(se),
        int(row.get(f"{name}_n") or 0),
        str(row.get(f"{name}_method") or "interval"),
        confidence,
    )
