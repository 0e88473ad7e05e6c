"""The budget cap under randomized sweeps: how far past the cap does a sweep spend?

Runs N sweeps of `budget_lab.ledger.cap_sim` (the controller's loop on a fake clock, the real
`CapPolicy` deciding) with trial lengths, step times, checkpoint intervals, FID sizes, start-up
times, slots, poll and guard periods, accounting lag and caps drawn at random, and prints:

- how many sweeps hit the cap (a trial refused for its estimate; running trials cut; killed);
- for the sweeps whose spend reached the cap, the overspend as a fraction of the promised margin
  (cap_policy.py: one checkpoint interval plus the stated stop latency of each running job's
  burn): median, 90th percentile, worst; 1.0 would be the promise's edge;
- each cut job's observed stop latency as a fraction of the one stated for it;
- the same sweeps under two weakened policies (no kills; a latency that leaves out FIDs and
  kills), to show that the check catches a broken enforcement.

    python bench/cap_sim.py                  # 1000 sweeps, seed 20261202
    python bench/cap_sim.py --sweeps 100     # the test's sweeps (tests/test_cap_sim.py)
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import date

from budget_lab.ledger.cap_policy import CapPolicy
from budget_lab.ledger.cap_sim import SweepOutcome, random_sweep, simulate


class NeverKills(CapPolicy):
    """Weakened: asks jobs to stop, never kills one."""

    def overdue(self, now, deadlines):
        return []


class StatesOneStep(CapPolicy):
    """Weakened: states a job stops at its next step (no FID, no kill in the latency)."""

    def stop_latency_s(self, step_s: float) -> float:
        return step_s


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def summarize(outcomes: list[SweepOutcome]) -> dict[str, float]:
    reached = [o.over_fraction for o in outcomes if o.over_fraction is not None]
    latency = [s.took_s / s.stated_s for o in outcomes for s in o.stopped]
    cut = [o for o in outcomes if o.cut]
    return {
        "sweeps": len(outcomes),
        "refused": sum(o.refused > 0 for o in outcomes),
        "cut": len(cut),
        "killed_jobs": sum(o.killed for o in outcomes),
        "cut_jobs": sum(o.cut for o in outcomes),
        "reached": len(reached),
        "broken": sum(not o.kept for o in outcomes),
        "over_median": statistics.median(reached) if reached else 0.0,
        "over_p90": _quantile(reached, 0.9) if reached else 0.0,
        "over_max": max(reached, default=0.0),
        "worst_over_cap": max((o.over_usd / o.cap_usd for o in outcomes), default=0.0),
        "worst_over_s": max(
            (o.over_usd / o.burn_at_cap for o in outcomes if o.reached_at is not None),
            default=0.0,
        ),
        "spent_of_cap_when_cut": statistics.median(o.final_usd / o.cap_usd for o in cut)
        if cut
        else 0.0,
        "latency_max": max(latency, default=0.0),
        "latency_median": statistics.median(latency) if latency else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sweeps", type=int, default=1000, help="randomized sweeps (default 1000)")
    ap.add_argument("--seed", type=int, default=20261202, help="seed of the sweeps' draws")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sweeps = [random_sweep(rng) for _ in range(args.sweeps)]
    t0 = time.perf_counter()
    real = summarize([simulate(s) for s in sweeps])
    seconds = time.perf_counter() - t0
    weak = {
        name: summarize([simulate(s, policy) for s in sweeps])
        for name, policy in (("no kills", NeverKills), ("latency = one step", StatesOneStep))
    }
    print(
        f"`python bench/cap_sim.py --sweeps {args.sweeps} --seed {args.seed}` — "
        f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}, "
        f"{date.today()}, {seconds:.1f} s for the {args.sweeps} sweeps of the real policy:\n"
    )
    n = real["sweeps"]
    print(
        f"- hit the cap: {real['refused']:.0f} of {n} sweeps had a trial refused for its estimate,"
    )
    print(
        f"  {real['cut']:.0f} had running trials cut ({real['cut_jobs']:.0f} jobs, "
        f"{real['killed_jobs']:.0f} of them killed inside an FID or a slow step); a cut sweep "
        f"spent {real['spent_of_cap_when_cut']:.0%} of its cap (median)"
    )
    print(
        f"- spend reached the cap in {real['reached']:.0f} sweeps; overspend as a fraction of the "
        f"promised margin: median {real['over_median']:.2f}, p90 {real['over_p90']:.2f}, worst "
        f"{real['over_max']:.2f}; the worst overspend was {real['worst_over_s']:.1f} s of the "
        f"running jobs' burn ({real['worst_over_cap']:.0%} of a tiny cap); promise broken in "
        f"{real['broken']:.0f}"
    )
    print(
        f"- cut jobs' stop latency / stated: median {real['latency_median']:.2f}, "
        f"worst {real['latency_max']:.2f}"
    )
    print("\n| policy | promise broken | reached the cap | worst overspend / margin |")
    print("|---|---|---|---|")
    for name, s in {"real": real, **weak}.items():
        print(f"| {name} | {s['broken']:.0f} of {n} | {s['reached']:.0f} | {s['over_max']:.2f} |")


if __name__ == "__main__":
    main()
