"""Caps and estimates: a randomized simulation of sweeps under a BudgetGuard with a fake clock,
launch refusals with the figures, thresholds reported once (also across a controller restart),
the paper's recipe estimated on aws-p5, and calibration from a benchmark and from a run."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import yaml

from budget_lab.config import compose_run, run_config_to_dict
from budget_lab.errors import ConfigError, UserError
from budget_lab.launch.cluster import load_cluster
from budget_lab.ledger import (
    PAPER,
    BudgetError,
    BudgetGuard,
    Calibration,
    Ledger,
    RunningJob,
    Segment,
    calibrate_benchmark,
    calibrate_from_run,
    check_budget,
    check_figures,
    estimate_run,
    format_estimate,
    month_scope,
)
from budget_lab.workspace import Workspace

T0 = 1_795_000_000.0  # 2026-11-18


# -- the budget guard: a fake clock, fake jobs -----------------------------------------------------


@dataclass
class FakeJob:
    """A training job on the fake clock: fixed step time, a checkpoint every `every` steps."""

    run: str
    usd_per_hour: float
    step_s: float
    every: int  # steps between checkpoints
    steps: int
    save_s: float  # time to write a checkpoint
    start: float
    end: float = 0.0
    stopped: bool = False

    def __post_init__(self) -> None:
        self.end = self.start + self.steps * self.step_s

    @property
    def checkpoint_interval_s(self) -> float:
        return self.every * self.step_s

    def stop(self, t: float) -> None:
        """A STOP file at t: the trainer stops at its next step boundary and saves."""
        if self.stopped or t >= self.end:
            return
        done = int((t - self.start) // self.step_s) + 1
        self.end = min(self.start + done * self.step_s + self.save_s, self.end)
        self.stopped = True

    def spent(self, t: float) -> float:
        return self.usd_per_hour / 3600 * max(min(t, self.end) - self.start, 0.0)


def simulate_sweep(rng: random.Random) -> dict:
    slots = rng.randint(1, 6)
    specs = []
    for _ in range(rng.randint(2, 25)):
        step_s = rng.uniform(0.2, 8.0)
        specs.append(
            {
                "usd_per_hour": rng.randint(1, 16) * rng.uniform(0.05, 12.0),  # GPUs x $/GPU-h
                "step_s": step_s,
                "every": rng.randint(2, 100),
                "steps": rng.randint(50, 3000),
                "save_s": rng.uniform(0.0, 2 * step_s),
            }
        )
    mean_cost = sum(s["usd_per_hour"] / 3600 * s["step_s"] * s["steps"] for s in specs) / len(specs)
    budget = rng.uniform(0.2, 4.0) * mean_cost * slots
    check = rng.choice([5.0, 15.0, 60.0, 120.0])
    lag = rng.choice([0.0, 2.0, 25.0])  # accounting rows appear late
    guard = BudgetGuard(budget, check_interval_s=check, spend_lag_s=lag)
    jobs: list[FakeJob] = []
    reported: list[float] = []
    worst_interval = 0.0  # the largest one-checkpoint-interval burn of the running jobs seen
    stopped_any = False
    t, pending, launching = 0.0, list(specs), True
    while True:
        seen = sum(j.spent(t - lag) for j in jobs)
        # Jobs whose spend is not all accounted for yet (they ended less than `lag` ago) still count.
        active = [j for j in jobs if j.end > t - lag]
        running = [
            RunningJob(
                run=j.run,
                usd_per_hour=j.usd_per_hour,
                stop_latency_s=j.step_s + j.save_s,  # the next step boundary, then the save
                started_at=j.start,
                stopping=j.stopped or j.end <= t,
            )
            for j in active
        ]
        burning = [j for j in jobs if j.start <= t < j.end]
        worst_interval = max(
            worst_interval, sum(j.usd_per_hour / 3600 * j.checkpoint_interval_s for j in burning)
        )
        decision = guard.check(seen, running)
        reported += decision.crossed
        for job in jobs:
            if job.run in decision.stop:
                job.stop(t)
                stopped_any = True
        while launching and pending and len(burning) < slots:
            spec = pending[0]
            estimate = spec["usd_per_hour"] / 3600 * spec["step_s"] * spec["steps"]
            estimate *= rng.uniform(0.5, 1.5)  # estimates are off both ways
            if not guard.can_launch(estimate, seen, running):
                launching = False
                break
            pending.pop(0)
            job = FakeJob(run=f"trial-{len(jobs)}", start=t, **spec)
            jobs.append(job)
            burning.append(job)
            running.append(RunningJob(job.run, job.usd_per_hour, job.step_s + job.save_s, t))
        if not [j for j in jobs if j.end > t] and (not launching or not pending):
            break
        t += check
    final = sum(j.spent(float("inf")) for j in jobs)
    seen = sum(j.spent(float("inf")) for j in jobs)
    reported += guard.check(seen, []).crossed
    return {
        "budget": budget,
        "spent": final,
        "bound": worst_interval,
        "reported": reported,
        "stopped_any": stopped_any,
        "jobs": len(jobs),
    }


def test_randomized_sweeps_never_overspend_by_more_than_a_checkpoint_interval():
    rng = random.Random(20261118)
    outcomes = [simulate_sweep(rng) for _ in range(150)]
    for i, o in enumerate(outcomes):
        over = o["spent"] - o["budget"]
        assert over <= o["bound"] + 1e-9, (
            f"sweep {i}: spent ${o['spent']:.4f} of ${o['budget']:.4f}, over by ${over:.4f} > "
            f"one checkpoint interval of the running jobs (${o['bound']:.4f})"
        )
        # Jobs stop within their declared latency here, so the guard keeps the cap outright.
        assert o["spent"] <= o["budget"] * (1 + 1e-9), f"sweep {i} went over its budget"
        # Each threshold is reported once, and every threshold passed is reported.
        assert len(o["reported"]) == len(set(o["reported"]))
        assert set(o["reported"]) == {t for t in (0.5, 0.8, 1.0) if o["spent"] >= t * o["budget"]}
    # The simulation exercises the cap: many sweeps had runs cut, and the budget was used.
    capped = [o for o in outcomes if o["stopped_any"]]
    assert len(capped) >= 30
    assert sum(o["spent"] / o["budget"] for o in capped) / len(capped) > 0.6


def test_the_guard_stops_the_newest_jobs_first_and_only_as_many_as_needed():
    guard = BudgetGuard(100.0, check_interval_s=3600)
    old = RunningJob("old", usd_per_hour=10.0, stop_latency_s=0.0, started_at=1.0)
    new = RunningJob("new", usd_per_hour=10.0, stop_latency_s=0.0, started_at=2.0)
    assert guard.check(75.0, [old, new]).stop == []  # 75 + 2 x 10 for the next hour < 100
    decision = guard.check(85.0, [old, new])  # 85 + 20 >= 100: stopping one is enough
    assert decision.stop == ["new"] and decision.committed_usd == pytest.approx(95.0)
    assert guard.check(95.0, [old, new]).stop == ["new", "old"]
    assert guard.check(95.0, [old, RunningJob("new", 10.0, 0.0, 2.0, stopping=True)]).stop == [
        "old"
    ]
    assert not guard.can_launch(20.0, 75.0, [old, new]) and guard.can_launch(5.0, 75.0, [old, new])


def test_thresholds_are_reported_once_even_across_a_controller_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    scope = "sweep:s"
    told: list[float] = []

    def controller(spends: list[float]) -> None:
        with Ledger(url) as ledger:
            guard = BudgetGuard(10.0, crossed=ledger.crossed_thresholds(scope))
            for spent in spends:
                for t in guard.check(spent, []).crossed:
                    if ledger.record_threshold(scope, t, spent_usd=spent, budget_usd=10.0):
                        told.append(t)

    controller([1.0, 5.5, 6.0])
    controller([6.0, 8.5, 9.0])  # restarted: 50% is not told again
    controller([10.5])
    assert told == [0.5, 0.8, 1.0]


# -- refusing a launch -------------------------------------------------------------------------------


def test_a_launch_over_budget_is_refused_with_the_figures():
    with pytest.raises(BudgetError) as err:
        check_figures(30.0, budget_usd=100.0, spent_usd=80.0, scope="sweep:s")
    e = err.value
    assert (e.estimate_usd, e.spent_usd, e.remaining_usd, e.budget_usd) == (30.0, 80.0, 20.0, 100.0)
    assert isinstance(e, UserError) and e.exit_code == 2
    message = str(e)
    for figure in ("$30.00", "$100.00", "$80.00", "$20.00 remaining", "--budget-usd"):
        assert figure in message
    check_figures(20.0, budget_usd=100.0, spent_usd=80.0)  # fits exactly


def test_check_budget_reads_the_sweep_and_the_month_from_the_ledger(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()

    def seg(key: str, start: float, cost: float, sweep: str | None = None) -> Segment:
        return Segment(key=key, job_id=key, cluster="c", start=start, end=start + 3600, gpus=1,
                       gpu_seconds=3600, cost_usd=cost, usd_per_gpu_hour=cost,
                       price_source="fixed", sweep=sweep)  # fmt: skip

    with Ledger.for_workspace(ws) as ledger:
        ledger.upsert_segments(
            [seg("a", T0, 40.0, sweep="s"), seg("b", T0 - 40 * 86400, 500.0)]  # b: last month
        )
    check_budget(ws, 10.0, budget_usd=50.0, sweep="s", now=T0)  # 40 + 10 fits
    with pytest.raises(BudgetError, match=r"\$40.00 already spent, \$10.00 remaining") as err:
        check_budget(ws, 10.01, budget_usd=50.0, sweep="s", now=T0)
    assert err.value.scope == "sweep:s"

    ws.config_path.write_text("monthly_budget_usd: 100\n")
    ws = Workspace(ws.root)
    check_budget(ws, 60.0, now=T0)  # November: $40 spent (October's $500 does not count)
    with pytest.raises(BudgetError, match="monthly budget: \\$100.00 for 2026-11") as err:
        check_budget(ws, 60.01, now=T0)
    assert err.value.scope == month_scope(T0) == "month:2026-11"


# -- estimates ----------------------------------------------------------------------------------------


def test_the_paper_recipe_on_aws_p5_lands_on_the_papers_504_h100_hours(tmp_path):
    ws = Workspace(tmp_path / "ws")
    cfg = compose_run("microdit-xl")
    cluster = load_cluster("aws-p5")
    est = estimate_run(cfg, cluster, ws, nodes=1)
    assert est.paper_recipe and est.device == "H100" and est.gpus == 8
    assert est.gpu_hours == pytest.approx(PAPER.gpu_hours, rel=1e-12)
    assert est.wall_hours == pytest.approx(63.0)  # 2.6 days on one 8xH100 node
    # Phases are charged in proportion to their training FLOPs (same utilization).
    flops = PAPER.flops_per_image
    share = [p.gpu_hours / est.gpu_hours for p in est.phases]
    weights = [s * b * flops[(res, r)] for res, r, s, b in PAPER.phases]
    assert share == pytest.approx([w / sum(weights) for w in weights])
    assert [p.source for p in est.phases] == ["paper"] * 4
    assert est.usd_on_demand == pytest.approx(504 * 12.29)
    assert est.usd_spot == pytest.approx(504 * 12.29)  # the catalog fallback of this cluster
    text = format_estimate(est, cfg=cfg, cluster=cluster)
    assert "total: 504.0 H100-hours (63.0 h wall clock on 8 device(s))" in text
    assert "paper (Sehwag et al. 2024): 504 H100-hours, $1,890 at $3.75/H100-hour" in text
    assert "$6,194.16 on-demand" in text and "spot" in text
    print(text)

    # The same recipe at half the steps is not the paper's: no comparison line.
    half = compose_run("microdit-xl", ["phases.0.steps=125000"])
    assert "paper (" not in format_estimate(estimate_run(half, cluster, ws))


def test_an_uncalibrated_device_says_how_to_calibrate(tmp_path):
    ws = Workspace(tmp_path / "ws")
    tiny = compose_run("nano", ["model.preset=MicroDiT-Tiny/2"])
    with pytest.raises(ConfigError, match="budget-lab cost calibrate --preset MicroDiT-Tiny/2"):
        estimate_run(tiny, load_cluster("local"), ws)
    # nano on a CPU has built-in reference figures (BENCHMARKS.md) until it is measured.
    est = estimate_run(compose_run("nano"), load_cluster("local"), ws)
    assert [p.source for p in est.phases] == ["reference", "reference"]
    assert est.phases[0].images_per_s == 165.9


def test_calibrate_with_a_short_benchmark_then_estimate(tmp_path):
    ws = Workspace(tmp_path / "ws")
    entry = calibrate_benchmark(ws, "nano", mask_ratio=0.75, batch=4, steps=2, warmup=1)
    assert entry.device == "cpu" and entry.source == "benchmark" and entry.images_per_s > 0
    assert json.loads(ws.calibration_path.read_text())["entries"][0]["preset"] == "nano"
    # Masked pretraining at r = 0.75 (measured), then a finetune at r = 0.6 (nobody measured).
    cfg = compose_run("nano", ["phases.1.mask_ratio=0.6"])
    est = estimate_run(cfg, load_cluster("local"), ws)
    pretrain, finetune = est.phases
    assert pretrain.source == "benchmark"  # a measurement wins over the built-in reference
    assert pretrain.gpu_hours == pytest.approx(900 * 64 / entry.images_per_s / 3600)
    assert finetune.source.startswith("scaled from benchmark (32px r=0.75) by FLOPs")
    assert finetune.images_per_s < pretrain.images_per_s  # less masking costs more per image
    assert est.usd == pytest.approx(est.gpu_hours * 0.10)
    assert "at the fixed $0.10/device-hour" in format_estimate(est)


def test_calibrate_from_a_finished_runs_metrics(tmp_path):
    ws = Workspace(tmp_path / "ws")
    run = ws.run_dir("xl-8gpu")
    run.mkdir(parents=True)
    cfg = compose_run("microdit-xl")
    (run / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(cfg)))
    rows = []
    for segment in (0, 1):
        for i, ips in enumerate([100.0, 5000.0, 5200.0, 5100.0]):  # first row: warm-up
            rows.append(
                {"phase": "pretrain-256", "segment": segment, "images_per_s": ips, "step": i}
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (entry,) = calibrate_from_run(ws, run, device_type="H100", devices=8)
    assert entry.images_per_s == pytest.approx(5100.0 / 8)
    assert (entry.resolution, entry.mask_ratio, entry.source) == (256, 0.75, "run:xl-8gpu")
    # The measurement now wins over the paper's figure for that phase.
    found = Calibration.load(ws).lookup(
        "MicroDiT-XL/2", resolution=256, mask_ratio=0.75, device="H100"
    )
    assert found.source == "run:xl-8gpu"
    est = estimate_run(cfg, load_cluster("aws-p5"), ws)
    assert est.phases[0].source == "run:xl-8gpu" and est.phases[1].source == "paper"


def test_cost_calibrate_cli_from_a_launched_run(tmp_path, capsys):
    from budget_lab.cli import main

    ws = Workspace(tmp_path / "ws")
    run = ws.run_dir("xl")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(compose_run("microdit-xl"))))
    (run / "launch.json").write_text(
        json.dumps(
            {"run": "xl", "cluster": "aws-p5", "executor": "slurm", "nodes": 2, "gpus_per_node": 8}
        )
    )
    rows = [
        {"phase": "finetune-512", "segment": 0, "images_per_s": v} for v in (1.0, 960.0, 1000.0)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["cost", "calibrate", "--workspace", str(ws.root), "--from-run", "xl"]) == 0
    out = capsys.readouterr().out
    assert "recorded MicroDiT-XL/2 512px r=0 on H100: 61.25 images/s per device (run:xl)" in out
    assert main(["cost", "calibrate", "--workspace", str(ws.root), "--list"]) == 0
    assert "61.25 img/s/device  [run:xl]" in capsys.readouterr().out
    assert main(["cost", "calibrate", "--workspace", str(ws.root), "--from-run", "nope"]) == 2
    assert "no run folder 'nope'" in capsys.readouterr().err
