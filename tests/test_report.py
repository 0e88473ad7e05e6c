"""Reports: summary.json round trip, the noise-aware front and spend aggregates, PNG figures
(FID error bars, an honest FID axis), the HTML page, the terminal tables (intervals, sub-cent
costs), the loader over a real Optuna study, the W&B report spec (offline) and the W&B summary
run (offline)."""

from __future__ import annotations

import json
import re
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from budget_lab.errors import DataError, UserError
from budget_lab.ledger.store import Segment, SegmentPart
from budget_lab.report.data import (
    CostPart,
    ReportData,
    SpendRow,
    TrialRow,
    best_trials,
    cumulative_spend,
    mark_pareto,
    pareto_numbers,
    read_report_data,
    report_data_from_json,
    report_data_to_json,
    spend_by,
    split_by,
    sweep_verdict,
    usd,
)

# wandb_workspaces still uses pydantic-v1-style validators; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:wandb_workspaces")

T0 = 1_795_000_000.0  # 2026-11-18 11:06 UTC: the sweep's first segment
# number, state, FID, cost, wasted, cluster, params: a mask-ratio sweep of six trials.
_TRIALS = [
    (0, "COMPLETE", 42.1, 3.20, 0.00, "slurm-local", 0.50, 3e-4, "nano"),
    (1, "COMPLETE", 35.4, 5.10, 0.40, "aws-p5", 0.75, 3e-4, "nano"),
    (2, "COMPLETE", 38.0, 6.00, 0.00, "slurm-local", 0.90, 1e-4, "nano"),  # dominated by #1
    (3, "PRUNED", None, 1.10, 0.10, "aws-p5", 0.90, 1e-3, "tiny"),
    (4, "FAIL", None, 0.60, 0.60, "slurm-local", 0.25, 1e-3, "tiny"),
    (5, "COMPLETE", 31.2, 9.80, 0.00, "aws-p5", 0.75, 1e-4, "small"),
]
PARETO = {0, 1, 5}  # the cheapest, the best-for-$5 and the best FID
# Scores with their noise (95 % intervals at N=256), as the sweep stores them; #0 comes from an
# older study and has an FID only. #2's interval lies above #1's: #1 dominates it beyond the noise.
_SCORES = {
    1: dict(
        fid_lo=34.6,
        fid_hi=36.2,
        fid_n=256,
        kid=0.0123,
        kid_std=0.0021,
        alignment=0.612,
        alignment_lo=0.551,
        alignment_hi=0.673,
    ),
    2: dict(fid_lo=37.1, fid_hi=38.9, fid_n=256, kid=0.0151, kid_std=0.0024),
    5: dict(
        fid_lo=30.3,
        fid_hi=32.1,
        fid_n=256,
        kid=0.0098,
        kid_std=0.0019,
        alignment=0.655,
        alignment_lo=0.597,
        alignment_hi=0.713,
    ),
}


# Where each ledger row's dollars went (the ledger's split by activity): fraction of its cost.
_SPLIT = {
    "pretrain": {"startup": 0.10, "train": 0.80, "checkpoint": 0.10},
    "finetune": {"train": 0.60, "checkpoint": 0.10, "eval": 0.25, "sample_grid": 0.05},
}
# What each trial was estimated to cost before launch: settled / estimate - 1 (#0: no estimate,
# an older study).
_ERRORS = {1: 0.10, 2: -0.20, 3: 0.0, 4: 0.50, 5: 0.02}

# TrialRow's measurement fields: the W&B trials table has a column for each.
_INTERVAL_COLUMNS = (
    "fid_lo",
    "fid_hi",
    "fid_n",
    "kid",
    "kid_std",
    "alignment",
    "alignment_lo",
    "alignment_hi",
)


def _write_grid(path: Path, seed: int) -> None:
    """A real sample-grid PNG: 2 x 4 cells of 32 px coloured squares on white, like save_grid."""
    rng = np.random.default_rng(seed)
    img = np.full((2 * 34 + 2, 4 * 34 + 2, 3), 255, np.uint8)
    for r in range(2):
        for c in range(4):
            img[2 + 34 * r : 34 + 34 * r, 2 + 34 * c : 34 + 34 * c] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((4 * 136, 2 * 136), Image.NEAREST).save(path)


def make_report_data(root: Path) -> ReportData:
    """Six trials (4 COMPLETE, 1 PRUNED, 1 FAIL) over about an hour, pretrain + finetune.

    Each trial's spend is one pretrain and (unless it stopped early) one finetune ledger row; its
    cost_usd is the sum of its rows, split by activity as `_SPLIT` says (the report's `parts`).
    Every trial but #0 has an estimate, off by `_ERRORS`. COMPLETE trials have a sample grid except #2, whose grid
    file is gone (the report must skip it).
    """
    trials, spend, parts = [], [], []
    for number, state, fid, cost, wasted, cluster, mask, lr, preset in _TRIALS:
        run = f"mask_ratio-{number:03d}"
        run_dir = root / "runs" / run
        grid = run_dir / "samples" / "grid.png"
        if state == "COMPLETE" and number != 2:
            _write_grid(grid, seed=number)
        start = T0 + 540.0 * number  # one trial every 9 minutes
        pretrain = cost if state != "COMPLETE" else round(cost * 0.7, 2)
        phases = [("pretrain", pretrain, wasted)]
        if state == "COMPLETE":
            phases.append(("finetune", round(cost - pretrain, 2), 0.0))
        for phase, amount, lost in phases:
            seconds = 1200.0 * amount / cost
            spend.append(
                SpendRow(
                    run=run,
                    trial=number,
                    phase=phase,
                    cluster=cluster,
                    start=start,
                    end=start + seconds,
                    cost_usd=amount,
                    wasted_usd=lost,
                    gpu_seconds=seconds * (8 if cluster == "aws-p5" else 1),
                )
            )
            parts += [
                CostPart(
                    run, number, phase, activity, amount * f, lost * f, spend[-1].gpu_seconds * f
                )
                for activity, f in _SPLIT[phase].items()
            ]
            start += seconds
        trials.append(
            TrialRow(
                number=number,
                state=state,
                params={"mask_ratio": mask, "lr": lr, "preset": preset, "ema": number % 2 == 0},
                fid=fid,
                cost_usd=cost,
                gpu_hours=sum(s.gpu_seconds for s in spend if s.trial == number) / 3600,
                wasted_usd=wasted,
                run=run,
                run_dir=str(run_dir),
                grid_path=str(grid) if state == "COMPLETE" else None,
                objective_values=[fid, cost] if fid is not None else None,
                estimate_usd=cost / (1 + _ERRORS[number]) if number in _ERRORS else None,
                estimate_error=_ERRORS.get(number),
                **_SCORES.get(number, {}),
            )
        )
    return ReportData(
        title="Sweep mask_ratio",
        sweep="mask_ratio",
        objective="fid,cost",
        objective_formula="minimise (FID, $)",
        trials=mark_pareto(trials),
        spend=spend,
        stop_reason="budget cap reached ($25.00)",
        budget_usd=25.0,
        generated_at=T0 + 3700.0,
        verdict=sweep_verdict(trials, "pareto"),
        parts=parts,
    )


@pytest.fixture
def data(tmp_path: Path) -> ReportData:
    return make_report_data(tmp_path / "workspace")


def _not_blank(path: Path) -> float:
    """Pixel standard deviation of a PNG (0 for a single-colour image)."""
    return float(np.asarray(Image.open(path).convert("L"), np.float32).std())


# --------------------------------------------------------------------------------------------
# Data: JSON, Pareto front, aggregates
# --------------------------------------------------------------------------------------------


def test_summary_json_round_trips(data: ReportData, tmp_path: Path):
    text = report_data_to_json(data)
    assert json.loads(text)["format"] == "budget-lab-report/1"
    assert report_data_from_json(text) == data
    path = tmp_path / "summary.json"
    path.write_text(text)
    assert read_report_data(path) == data

    with pytest.raises(DataError, match="not a budget-lab report summary"):
        report_data_from_json('{"format": "something-else"}')
    broken = json.loads(text)
    broken["trials"][0]["colour"] = "red"
    with pytest.raises(DataError, match=r"trials\[0\]: unknown keys \['colour'\]"):
        report_data_from_json(json.dumps(broken))
    broken = json.loads(text)
    broken["trials"][1]["state"] = "DONE"
    with pytest.raises(DataError, match="unknown state 'DONE'; expected one of COMPLETE"):
        report_data_from_json(json.dumps(broken))
    with pytest.raises(DataError, match=str(tmp_path / "missing.json")):
        read_report_data(tmp_path / "missing.json")


def test_pareto_front_best_trials_and_spend_aggregates(data: ReportData):
    assert pareto_numbers(data.trials) == PARETO
    assert {t.number for t in data.trials if t.pareto} == PARETO
    assert [t.number for t in best_trials(data.trials, 3)] == [5, 1, 2]

    assert data.total_usd == pytest.approx(sum(t.cost_usd for t in data.trials))
    assert data.wasted_usd == pytest.approx(1.10)
    for key in ("phase", "cluster", "trial", "run"):
        groups = spend_by(data.spend, key)
        assert sum(u + w for u, w in groups.values()) == pytest.approx(data.total_usd)
    phases = spend_by(data.spend, "phase")
    assert list(phases) == ["pretrain", "finetune"]  # largest first
    assert phases["finetune"][1] == 0.0

    times, total, wasted = cumulative_spend(data.spend)
    assert times[0] == T0 and total[0] == 0.0
    assert total[-1] == pytest.approx(data.total_usd) and wasted[-1] == pytest.approx(1.10)
    assert all(b >= a for a, b in zip(total, total[1:], strict=False))


# A CPU sweep: trials cost fractions of a cent and their FIDs (N=64) are noisy.
# number: (FID, lo, hi, $). Classic Pareto (point estimates): {0, 2, 3}. Within the noise:
# #1 is worse than #0 by less than the noise and costs within 10 % of it: it stays;
# #2's lower FID is within #0's interval and it costs twice as much: it leaves;
# #3 is better beyond the noise: it stays; #4 is worse beyond the noise: it leaves.
_NOISY = {
    0: (50.0, 48.0, 52.0, 0.0100),
    1: (51.0, 49.0, 53.0, 0.0105),
    2: (49.5, 47.5, 51.5, 0.0200),
    3: (40.0, 39.0, 41.0, 0.0300),
    4: (60.0, 59.0, 61.0, 0.0250),
}


def noisy_sweep(intervals: bool = True, cost_tolerance: float = 0.1) -> ReportData:
    """Five COMPLETE sub-cent trials with FID intervals (or, `intervals` False, FIDs only)."""
    trials = [
        TrialRow(
            number=n,
            state="COMPLETE",
            params={"mask_ratio": 0.5 + 0.1 * n},  # one configuration each
            fid=fid,
            cost_usd=cost,
            gpu_hours=0.0,
            wasted_usd=0.0042 if n == 4 else 0.0,
            run=f"cpu-{n:03d}",
            **(
                dict(fid_lo=lo, fid_hi=hi, fid_n=64, kid=0.0312, kid_std=0.0041)
                if intervals
                else {}
            ),
        )
        for n, (fid, lo, hi, cost) in _NOISY.items()
    ]
    trials = mark_pareto(trials, cost_tolerance)
    return ReportData(
        title="Sweep cpu",
        sweep="cpu",
        objective="pareto",
        objective_formula="minimise (FID, $)",
        trials=trials,
        generated_at=T0,
        verdict=sweep_verdict(trials, "pareto", cost_tolerance),
        cost_tolerance=cost_tolerance,
    )


def test_front_respects_the_noise():
    """A trial leaves the front only for a difference beyond the noise: FID intervals apart, or
    cheaper by more than the cost tolerance."""
    assert {t.number for t in noisy_sweep().trials if t.pareto} == {0, 1, 3}
    # #1 overlaps the cheaper, better #0 and is kept; classic Pareto would drop it and keep #2.
    assert pareto_numbers(noisy_sweep().trials) == {0, 1, 3}
    # No cost tolerance: #0 is cheaper than #1 and not worse beyond the noise.
    assert pareto_numbers(noisy_sweep().trials, cost_tolerance=0.0) == {0, 3}
    # Trials of an older study (no interval) are exact at their FID: the classic front.
    assert pareto_numbers(noisy_sweep(intervals=False).trials) == {0, 2, 3}
    # Only COMPLETE trials with an FID take part.
    others = [
        TrialRow(9, "PRUNED", {}, 1.0, 0.001, 0.0, 0.0, fid_lo=0.5, fid_hi=1.5),
        TrialRow(10, "FAIL", {}, None, 0.0, 0.0, 0.0),
    ]
    assert pareto_numbers(noisy_sweep().trials + others) == {0, 1, 3}
    # The verdict says which trials the sweep told apart.
    verdict = noisy_sweep().verdict or ""
    assert verdict.startswith(
        "Lowest FID on the front: mask_ratio=0.8 (FID 40.0 [39.0, 41.0] N=64, $0.03)"
    )
    assert "Front (not clearly dominated; $ within 10% count as equal)" in verdict


def test_usd_keeps_the_digits_of_sub_cent_costs():
    assert usd(0.0042) == "$0.0042" and usd(0.00420001) == "$0.0042"
    assert usd(0.0567) == "$0.0567" and usd(0.000123456) == "$0.000123"
    assert usd(0.0999) == "$0.0999" and usd(0.05) == "$0.05"
    assert usd(0.5) == "$0.50" and usd(25.8) == "$25.80" and usd(1234.5) == "$1,234.50"
    assert usd(0) == "$0.00" and usd(None) == "—"
    for x in np.geomspace(1e-7, 0.0099, 50):  # a cost is never rounded off to $0.00
        assert usd(float(x)) != "$0.00" and float(usd(float(x))[1:]) == pytest.approx(x, rel=6e-3)


def test_older_summary_json_and_the_sweeps_keys_read_back(data: ReportData):
    """A summary.json written before scores had intervals reads back (intervals None); the keys
    a sweep adds beside the report data (its decisions) are accepted."""
    raw = json.loads(report_data_to_json(data))
    for trial in raw["trials"]:
        for name in _INTERVAL_COLUMNS:
            del trial[name]
    del raw["verdict"], raw["cost_tolerance"]
    older = report_data_from_json(json.dumps(raw))
    assert all(t.fid_lo is None and t.alignment is None for t in older.trials)
    assert older.verdict is None and older.cost_tolerance == 0.1
    assert [t.fid for t in older.trials] == [t.fid for t in data.trials]
    raw.update(verdict="Best: ...", tiers=[["a"]], front=["a"], configs=[{"key": "a"}])
    assert report_data_from_json(json.dumps(raw)).verdict == "Best: ..."


# --------------------------------------------------------------------------------------------
# Figures, HTML, terminal
# --------------------------------------------------------------------------------------------


def test_figures_are_real_pngs(data: ReportData, tmp_path: Path):
    from budget_lab.report.figures import FIGURES, write_figures

    files = write_figures(data, tmp_path / "fig")
    assert set(files) == set(FIGURES)
    for name, path in files.items():
        assert path.name == FIGURES[name]
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 500 and img.height >= 200
        assert _not_blank(path) > 10, name

    # Nothing to draw: the figures still exist and say so.
    empty = ReportData("Empty", None, None, None, generated_at=T0)
    for path in write_figures(empty, tmp_path / "empty").values():
        assert _not_blank(path) > 0.5


def _bars(ax) -> list[tuple[float, float, float]]:
    """(x, bottom, top) of every error bar drawn on `ax`."""
    from matplotlib.container import ErrorbarContainer

    return sorted(
        (float(seg[0][0]), float(seg[0][1]), float(seg[1][1]))
        for c in ax.containers
        if isinstance(c, ErrorbarContainer)
        for cols in c.lines[2]
        for seg in cols.get_segments()
    )


def test_pareto_figure_has_error_bars_and_an_honest_fid_axis(data: ReportData):
    from budget_lab.report.figures import fid_axis_range, pareto_figure

    for report in (data, noisy_sweep()):
        ax = pareto_figure(report).axes[0]
        # One vertical bar per trial with an interval, from its lo to its hi, at its cost.
        expected = sorted(
            (t.cost_usd, t.fid_lo, t.fid_hi) for t in report.trials if t.fid_lo is not None
        )
        assert len(_bars(ax)) == len(expected) and np.allclose(_bars(ax), expected)
        # The FID axis holds every interval (every FID without one) with a margin.
        bottom, top = ax.get_ylim()
        margin = 0.05 * (top - bottom)
        for t in report.trials:
            if t.fid is not None:
                lo, hi = t.fid_interval
                assert bottom + margin <= lo and hi <= top - margin, (t.number, bottom, top)
        assert "95% interval" in ax.get_ylabel()

    # Three overlapping intervals 4 points wide, 3.5 points apart: the axis does not zoom in
    # until they fill the plot; it spans at least four interval widths.
    close = noisy_sweep()
    close.trials = close.trials[:3]
    ax = pareto_figure(close).axes[0]
    bottom, top = ax.get_ylim()
    assert top - bottom >= 4 * 4.0 and fid_axis_range(close.trials) == (bottom, top)
    assert "N=64" in ax.get_ylabel()

    # An older sweep (FIDs without intervals): no bars, every FID in view.
    old = noisy_sweep(intervals=False)
    ax = pareto_figure(old).axes[0]
    bottom, top = ax.get_ylim()
    assert _bars(ax) == [] and ax.get_ylabel() == "FID"  # no N known either
    assert all(bottom < t.fid < top for t in old.trials)


def _table_rows(text: str, title: str) -> dict[int, str]:
    """{trial number: its first line} of the rich table titled `title` in `text`."""
    body = text.split(title, 1)[1].split("└", 1)[0]
    return {
        int(m.group(1)): line for line in body.splitlines() if (m := re.match(r"│ *(\d+) *│", line))
    }


def test_sub_cent_costs_and_intervals_in_the_tables(tmp_path: Path):
    """A CPU sweep: every cost keeps its digits (never $0.00) in the terminal, the HTML table
    and the figure's axis; scores show their intervals and N."""
    from budget_lab.report.figures import pareto_figure
    from budget_lab.report.html import write_html_report
    from budget_lab.report.terminal import print_report

    report = noisy_sweep()
    for width in (200, 80):  # 80: too narrow for one table, KID goes to a "Scores" table
        console = Console(record=True, width=width, color_system=None)
        print_report(report, console)
        text = console.export_text()
        rows = _table_rows(text, "Trials")
        assert sorted(rows) == [0, 1, 2, 3, 4]
        for row in rows.values():  # no number cut short (only the params may be)
            assert "…" not in "".join(row.split("│")[1:-2]), row
        scores = rows if width == 200 else _table_rows(text, "Scores")
        for n, (fid, lo, hi, cost) in _NOISY.items():
            assert f"{fid:.1f} [{lo:.1f}, {hi:.1f}]" in rows[n] and usd(cost) in rows[n]
            assert "0.0312 ± 0.0041" in scores[n] and "$0.00 " not in rows[n]
        assert "$0.0105" in rows[1] and "$0.025" in rows[4] and "$0.0042" in rows[4]  # + wasted
        header = text.split("Trials (5)")[1].split("│ 0")[0]
        assert "FID [95% CI]" in header and "N=64" in header  # one N for all: in the header
        assert ("Scores" in text) == (width == 80)

    page = write_html_report(report, tmp_path / "cpu").read_text()
    for n, (fid, lo, hi, cost) in _NOISY.items():
        row = page.split(f'data-trial="{n}"', 1)[1].split("</tr>", 1)[0]
        assert f'<td class="num fid">{fid:.1f} [{lo:.1f}, {hi:.1f}]</td>' in row
        assert '<td class="num">64</td>' in row and "0.0312 ± 0.0041" in row
        assert f'<td class="num">{usd(cost)}</td>' in row
    assert '<td class="num">$0.0105</td>' in page and '<td class="num">$0.0042</td>' in page

    ticks = [label.get_text() for label in pareto_figure(report).axes[0].get_xticklabels()]
    sub_cent = [t for t in ticks if t not in ("$0.00", "")]
    assert sub_cent and all(re.fullmatch(r"\$0\.0\d+", t) for t in sub_cent), ticks
    assert len(set(ticks)) == len(ticks)  # no two ticks rounded to the same label


def test_html_report_is_self_contained(data: ReportData, tmp_path: Path):
    from budget_lab.report.html import write_html_report

    out = tmp_path / "report"
    index = write_html_report(data, out)
    page = index.read_text()

    assert index == out / "index.html"
    assert page.count('class="trial-row') == len(data.trials) == 6
    assert page.count('class="trial-row pareto"') == len(PARETO)
    for state, n in (("COMPLETE", 4), ("PRUNED", 1), ("FAIL", 1)):
        assert page.count(f'data-state="{state}"') == n
    assert "mask_ratio-005" in page and "budget cap reached" in page and "0.75" in page
    # Scores with their noise, and the verdict near the top (before the figures).
    for header in ("FID [95% CI]", "N", "KID ± std", "alignment [95% CI]"):
        assert f"<th>{header}</th>" in page
    assert '<td class="num fid">35.4 [34.6, 36.2]</td>' in page
    assert '<td class="num alignment">0.612 [0.551, 0.673]</td>' in page
    assert '<td class="num fid">42.10</td>' in page  # the older trial: no interval
    verdict = page.index('<p class="verdict" id="verdict">')
    assert verdict < page.index("<h2>Figures</h2>")
    assert "Front (not clearly dominated" in page[verdict:]

    # No external resource: every src is a file beside index.html; no URL scheme anywhere.
    assert "http://" not in page and "https://" not in page and 'src="//' not in page
    sources = [s.split('"', 1)[0] for s in page.split('src="')[1:]]
    assert "pareto.png" in sources and "spend_over_time.png" in sources
    for src in sources:
        assert (out / src).is_file(), src

    # The best three trials that have a grid: #5, #1 and #0 (#2's grid file is missing).
    grids = sorted(p.name for p in out.glob("grid-trial-*.png"))
    assert grids == ["grid-trial-000.png", "grid-trial-001.png", "grid-trial-005.png"]
    assert page.index("grid-trial-005.png") < page.index("grid-trial-001.png")

    # Where the money went: $ per phase x activity from the ledger's split, every total the sum
    # of its cells, the grand total the sweep's; each trial's estimate beside what it cost.
    table = page.split('<table id="cost-split">', 1)[1].split("</table>", 1)[0]
    activities = re.findall(r'<th data-activity="([^"]+)">', table)
    assert activities == ["startup", "train", "checkpoint", "eval", "sample_grid"]
    rows = dict(re.findall(r'<tr class="phase-row" data-phase="([^"]+)">(.*?)</tr>', table))
    assert list(rows) == ["pretrain", "finetune"]  # the larger first

    def dollars(row: str, cls: str) -> list[float]:
        return [float(v) for v in re.findall(rf'<td class="{cls}" data-usd="([^"]+)"', row)]

    total_row = table.split('<tr class="total">', 1)[1]
    by_phase = {phase: dollars(row, "num phase-total")[0] for phase, row in rows.items()}
    by_activity = dollars(total_row, "num activity-total")
    for phase, row in rows.items():
        assert sum(dollars(row, "num")) == pytest.approx(by_phase[phase])
        assert by_phase[phase] == pytest.approx(sum(spend_by(data.spend, "phase")[phase]))
    for i in range(len(activities)):
        assert by_activity[i] == pytest.approx(sum(dollars(r, "num")[i] for r in rows.values()))
    finetune = sum(spend_by(data.spend, "phase")["finetune"])
    assert by_activity[activities.index("eval")] == pytest.approx(0.25 * finetune)
    (grand,) = dollars(total_row, "num grand-total")
    assert grand == pytest.approx(sum(by_phase.values())) == pytest.approx(sum(by_activity))
    assert grand == pytest.approx(data.total_usd) == pytest.approx(25.80)
    assert "<td>total</td>" in total_row and "$25.80" in total_row
    trial1 = page.split('data-trial="1"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num estimate">$4.64</td>' in trial1  # $5.10 settled, 10 % over
    assert '<td class="num estimate-error">+10%</td>' in trial1
    trial0 = page.split('data-trial="0"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num estimate">—</td>' in trial0  # an older trial: no estimate

    # Written again into the same folder: overwritten, not duplicated.
    write_html_report(data, out)
    assert len(list(out.glob("*.png"))) == 6 + 3

    # The verdict is text: escaped, its lines kept; no verdict, no paragraph.
    data.verdict = "Best: <b>#5</b> & cheap\nTied: none"
    page = write_html_report(data, tmp_path / "escaped").read_text()
    assert "Best: &lt;b&gt;#5&lt;/b&gt; &amp; cheap\nTied: none" in page
    data.verdict = None
    assert 'id="verdict"' not in write_html_report(data, tmp_path / "none").read_text()


def test_terminal_report(data: ReportData):
    from budget_lab.report.terminal import print_report

    console = Console(record=True, width=200, color_system=None)
    print_report(data, console)
    text = console.export_text()
    assert "Sweep mask_ratio" in text and "Trials (6)" in text
    assert "spent $25.80 of $25.00 budget" in text and "wasted $1.10" in text
    assert "lowest FID 31.2 [30.3, 32.1] N=256: trial #5 (mask_ratio-005)" in text
    # Scores with their noise: FID [95% CI] and N, KID ± std, alignment [95% CI]; an older
    # trial without an interval shows its FID alone, a trial without a score a dash.
    assert "FID [95% CI]" in text and "KID ± std" in text and "alignment [95% CI]" in text
    assert "35.4 [34.6, 36.2]" in text and "31.2 [30.3, 32.1]" in text and "42.10" in text
    assert "0.0123 ± 0.0021" in text and "0.612 [0.551, 0.673]" in text
    assert "Front (not clearly dominated" in text  # the verdict
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        assert state in text
    assert text.count("★") == len(PARETO) + 1  # + the column header
    assert "Spend by phase" in text and "Spend by cluster" in text and "aws-p5" in text
    assert "Spend by activity" in text and "sample_grid" in text


def test_every_renderer_handles_an_empty_report(tmp_path: Path):
    """A workspace with no trial and no spend yet: nothing breaks, everything says so."""
    from budget_lab.report.html import write_html_report
    from budget_lab.report.terminal import print_report
    from budget_lab.report.wandb_report import build_report_spec, summary_tables

    empty = ReportData("Spend in /ws", None, None, None, generated_at=T0)
    page = write_html_report(empty, tmp_path / "r").read_text()
    assert 'class="trial-row' not in page and "No sample grids" in page
    assert "still running" not in page  # not a sweep
    console = Console(record=True, width=100, color_system=None)
    print_report(empty, console)
    assert "no spend recorded" in console.export_text()
    assert all(
        rows == []
        for name, (_, rows) in summary_tables(empty).items()
        if name != "useful_vs_wasted"
    )
    assert build_report_spec(empty, "team", "budget-lab")["title"] == "Cost report: budget-lab"


# --------------------------------------------------------------------------------------------
# The loader: a real Optuna study (journal file) and ledger in a workspace
# --------------------------------------------------------------------------------------------


def _split_segment(sweep: str, trial: int, run: str) -> Segment:
    """A $0.01 local segment of a run that did both phases in one job, split as the sync does."""
    parts = [
        SegmentPart("startup", "masked-pretrain", 10.0, 0.0010),
        SegmentPart("train", "masked-pretrain", 40.0, 0.0040),
        SegmentPart("checkpoint", "masked-pretrain", 10.0, 0.0010),
        SegmentPart("train", "finetune", 20.0, 0.0020),
        SegmentPart("eval", "finetune", 20.0, 0.0020),
    ]
    return Segment(
        key=f"local/{run}/1/0", job_id="1", cluster="local", start=T0, end=T0 + 100.0, gpus=1,
        gpu_seconds=100.0, cost_usd=0.0100, usd_per_gpu_hour=0.36, price_source="fixed",
        run=run, phase="finetune", sweep=sweep, trial=trial, parts=parts,
    )  # fmt: skip


def test_loader_reads_intervals_the_sweeps_tolerance_and_a_verdict(tmp_path: Path):
    import optuna

    from budget_lab.ledger import Ledger
    from budget_lab.report.load import load_report_data
    from budget_lab.sweep.storage import default_storage, open_storage
    from budget_lab.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure()
    study = optuna.create_study(
        study_name="noisy",
        storage=open_storage(default_storage(ws, "noisy")),
        directions=["minimize", "minimize"],
    )
    space = {"mask_ratio": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def add(mask: float, state, attrs: dict) -> None:
        done = state == optuna.trial.TrialState.COMPLETE
        study.add_trial(
            optuna.trial.create_trial(
                params={"mask_ratio": mask},
                distributions=space,
                values=[attrs["fid"], attrs["cost_usd"]] if done else None,
                state=state,
                user_attrs=attrs,
            )
        )

    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    scores = dict(fid_se=1.02, fid_method="jackknife-20", fid_n=64, fid_n_ref=2000)
    add(
        0.25,
        complete,
        dict(
            fid=50.0,
            fid_ci95=[48.0, 52.0],
            kid=0.0312,
            kid_std=0.0041,
            alignment=0.58,
            alignment_ci95=[0.52, 0.64],
            alignment_se=0.031,
            cost_usd=0.0100,
            run="noisy-000",
            estimate_usd=0.0080,
            **scores,
        ),
    )
    # 15 % dearer, FID within the noise: on the front only with the sweep's 20 % tolerance.
    add(0.5, complete, dict(fid=51.0, fid_ci95=[49.0, 53.0], cost_usd=0.0115, **scores))
    add(0.75, complete, dict(fid=70.0, cost_usd=0.0300))  # an older trial: FID only
    add(0.9, pruned, dict(cost_usd=0.0020, cut_reason="lagging at $0.002"))
    # Trial #0 ran in one job over both phases: its segment in the ledger, split by activity as
    # the sync splits it, and the estimate it was launched with.
    with Ledger.for_workspace(ws) as ledger:
        ledger.upsert_segments([_split_segment("noisy", 0, "noisy-000")])
    (ws.sweep_dir("noisy") / "sweep.json").write_text(
        json.dumps({"sweep": "noisy", "objective": "pareto", "spec": {"cost_tolerance": 0.2}})
    )

    data = load_report_data(ws, "noisy")
    first, second, older, cut = sorted(data.trials, key=lambda t: t.number)
    assert (first.fid, first.fid_lo, first.fid_hi, first.fid_n) == (50.0, 48.0, 52.0, 64)
    assert (first.kid, first.kid_std) == (0.0312, 0.0041)
    assert (first.alignment, first.alignment_lo, first.alignment_hi) == (0.58, 0.52, 0.64)
    assert second.kid is None and second.alignment is None
    assert older.fid == 70.0 and older.fid_lo is None and older.fid_n is None
    assert cut.state == "PRUNED" and cut.fid is None and cut.cost_usd == 0.002
    assert data.cost_tolerance == 0.2
    assert {t.number for t in data.trials if t.pareto} == {first.number, second.number}
    # The ledger's split, read back whole: it sums to the spend; the estimate and its error.
    assert first.cost_usd == pytest.approx(0.0100) and data.total_usd == pytest.approx(0.0100)
    assert sum(p.cost_usd for p in data.parts) == pytest.approx(data.total_usd, rel=1e-12)
    by_phase = {k: u + w for k, (u, w) in split_by(data, "phase").items()}
    assert by_phase == pytest.approx({"masked-pretrain": 0.0060, "finetune": 0.0040})
    assert list(split_by(data, "activity")) == ["startup", "train", "checkpoint", "eval"]
    assert (first.estimate_usd, first.estimate_error) == (0.0080, pytest.approx(0.25))
    assert second.estimate_usd is None and second.estimate_error is None
    assert data.verdict and "$ within 20% count as equal" in data.verdict

    # The default tolerance when the sweep does not say: the dearer trial leaves the front.
    (ws.sweep_dir("noisy") / "sweep.json").write_text(json.dumps({"objective": "pareto"}))
    data = load_report_data(ws, "noisy")
    assert data.cost_tolerance == 0.1
    assert {t.number for t in data.trials if t.pareto} == {first.number}


# --------------------------------------------------------------------------------------------
# W&B: the report spec (offline), the push without key / network, the summary run (offline)
# --------------------------------------------------------------------------------------------


_LOCAL = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looking up or connecting to any host but this one fails the test (wandb's own local
    service socket stays allowed)."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL:
            raise AssertionError(f"network access attempted: lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def test_wandb_report_spec_builds_without_network(data: ReportData, no_network):
    import wandb_workspaces.reports.v2 as wr

    from budget_lab.report.wandb_report import _PLOTS, build_report_spec, build_wandb_report

    spec = build_report_spec(data, "my-team", "budget-lab")
    assert json.loads(json.dumps(spec)) == spec  # plain JSON
    assert spec["title"] == "Cost report: mask_ratio"
    tables = spec["summary_run"]["tables"]
    assert [row[0] for row in tables["trials"]["rows"]] == [t.number for t in data.trials]
    assert sorted(row[0] for row in tables["pareto_front"]["rows"]) == sorted(PARETO)
    assert spec["summary_run"]["summary"]["total_usd"] == pytest.approx(25.80)

    panels = [p for b in spec["blocks"] if b["type"] == "panel_grid" for p in b["panels"]]
    charts = {p["table_key"] for p in panels if p["type"] == "custom_chart"}
    assert charts == {f"{key}_table" for key in _PLOTS}  # every logged plot is shown
    assert {p["table"] for p in panels if p["type"] == "table"} == {
        "trials",
        "pareto_front",
        "scored_trials",
        "spend",
        "cost_split",
        "estimate_vs_settled",
    }
    # The trials table and the FID-vs-$ data carry the intervals (None for the older trial #0).
    columns = tables["trials"]["columns"]
    for name in _INTERVAL_COLUMNS:
        assert name in columns, name
    row = dict(zip(columns, tables["trials"]["rows"][1], strict=True))
    assert (row["fid"], row["fid_lo"], row["fid_hi"], row["fid_n"]) == (35.4, 34.6, 36.2, 256)
    assert (row["kid"], row["kid_std"]) == (0.0123, 0.0021)
    assert (row["alignment"], row["alignment_lo"], row["alignment_hi"]) == (0.612, 0.551, 0.673)
    row = dict(zip(columns, tables["trials"]["rows"][0], strict=True))
    assert row["fid"] == 42.1 and row["fid_lo"] is None and row["alignment"] is None
    scored = tables["scored_trials"]
    assert {"fid_lo", "fid_hi", "fid_n"} <= set(scored["columns"])
    assert "Verdict" in spec["blocks"][0]["text"]
    for p in panels:  # inside W&B's 24-column grid
        assert 0 <= p["layout"]["x"] and p["layout"]["x"] + p["layout"]["w"] <= 24

    report = build_wandb_report(spec)
    assert isinstance(report, wr.Report) and report.entity == "my-team"
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 3 and sum(len(g.panels) for g in grids) == len(panels)
    assert "**By activity:** startup $" in spec["blocks"][0]["text"]
    assert "**Estimated before launch:**" in spec["blocks"][0]["text"]
    assert any(isinstance(p, wr.CustomChart) for p in grids[0].panels)
    assert grids[0].runsets[0].query == "mask_ratio-summary"

    with pytest.raises(UserError, match="--entity"):
        build_wandb_report(build_report_spec(data, None, "budget-lab"))


def test_push_without_api_key_writes_the_spec(
    data: ReportData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network
):
    from budget_lab.report.wandb_report import SPEC_FILE, WandbUnavailableError, push_wandb_report

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(WandbUnavailableError, match="no W&B API key") as err:
        push_wandb_report(data, None, "budget-lab", tmp_path / "out")
    assert isinstance(err.value, UserError)
    spec_path = tmp_path / "out" / SPEC_FILE
    assert str(spec_path) in str(err.value)
    assert json.loads(spec_path.read_text())["summary_run"]["name"] == "mask_ratio-summary"


def test_push_without_network_says_so(
    data: ReportData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from budget_lab.report.wandb_report import SPEC_FILE, WandbUnavailableError, push_wandb_report

    with socket.socket() as s:  # a local port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(WandbUnavailableError, match=r"cannot reach W&B at http://127\.0\.0\.1"):
        push_wandb_report(data, "my-team", "budget-lab", tmp_path, timeout=2.0)
    assert (tmp_path / SPEC_FILE).is_file()


def _logged_table(run_files: Path, key: str) -> dict:
    pattern = re.compile(rf"{re.escape(key)}_\d+_[0-9a-f]+\.table\.json")  # <key>_<step>_<hash>
    (path,) = (p for p in (run_files / "media" / "table").iterdir() if pattern.fullmatch(p.name))
    return json.loads(path.read_text())


def test_sweep_summary_run_offline(data: ReportData, tmp_path: Path, monkeypatch, no_network):
    from budget_lab.report.wandb_report import log_sweep_summary, open_summary_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = open_summary_run(data, "budget-lab-test", mode="offline", dir=tmp_path)
    try:
        log_sweep_summary(data, run)
        run_files = Path(run.dir)
        summary = dict(run.summary)
        assert summary["total_usd"] == pytest.approx(25.80)
        assert summary["wasted_usd"] == pytest.approx(1.10)
        assert summary["best_fid"] == 31.2 and summary["n_trials"] == 6
        assert (summary["best_fid_lo"], summary["best_fid_hi"]) == (30.3, 32.1)
        assert summary["verdict"] == data.verdict
        estimated = [t for t in data.trials if t.estimate_usd is not None]
        assert summary["estimate_usd"] == pytest.approx(sum(t.estimate_usd for t in estimated))
    finally:
        run.finish()

    trials = _logged_table(run_files, "trials")
    col = {name: i for i, name in enumerate(trials["columns"])}
    assert len(trials["data"]) == len(data.trials)
    for row, t in zip(trials["data"], sorted(data.trials, key=lambda t: t.number), strict=True):
        assert row[col["trial"]] == t.number and row[col["state"]] == t.state
        assert row[col["fid"]] == t.fid and row[col["cost_usd"]] == pytest.approx(t.cost_usd)
        assert row[col["pareto"]] == t.pareto and row[col["mask_ratio"]] == t.params["mask_ratio"]
        for name in _INTERVAL_COLUMNS:  # the measurement columns, None where not measured
            assert row[col[name]] == getattr(t, name), (t.number, name)

    front = _logged_table(run_files, "pareto_front")
    assert sorted(r[0] for r in front["data"]) == sorted(PARETO)
    scatter = _logged_table(run_files, "fid_vs_usd_table")  # the wandb.plot.scatter data
    assert sorted(r[2] for r in scatter["data"]) == [0, 1, 2, 5]
    col = {name: i for i, name in enumerate(scatter["columns"])}
    by_trial = {r[col["trial"]]: r for r in scatter["data"]}
    assert [by_trial[5][col[k]] for k in ("fid_lo", "fid_hi", "fid_n")] == [30.3, 32.1, 256]
    assert by_trial[0][col["fid_lo"]] is None  # older trial: no interval
    # The intervals as a line plot: a vertical segment (lo, hi at its cost) per trial.
    segments = _logged_table(run_files, "fid_intervals_plot_table")
    col = {name: i for i, name in enumerate(segments["columns"])}
    got = sorted((r[col["trial"]], r[col["cost_usd"]], r[col["fid"]]) for r in segments["data"])
    assert got == [
        ("#1", 5.1, 34.6),
        ("#1", 5.1, 36.2),
        ("#2", 6.0, 37.1),
        ("#2", 6.0, 38.9),
        ("#5", 9.8, 30.3),
        ("#5", 9.8, 32.1),
    ]
    steps = _logged_table(run_files, "pareto_front_plot_table")
    assert [r[:2] for r in steps["data"]][:3] == [[3.2, 42.1], [5.1, 42.1], [5.1, 35.4]]
    for key in ("spend_over_time_plot", "spend_by_phase_plot", "useful_vs_wasted_plot"):
        assert _logged_table(run_files, f"{key}_table")["data"]

    # Where the money went, as the ledger split it: $ per phase x activity, summing to the total;
    # by phase and by activity (tables and bar plots); each trial's estimate vs settled.
    split = _logged_table(run_files, "cost_split")
    assert split["columns"] == ["phase", "activity", "cost_usd", "wasted_usd", "gpu_hours"]
    cells = {(r[0], r[1]): r[2] for r in split["data"]}
    assert set(cells) == {(phase, a) for phase, acts in _SPLIT.items() for a in acts}
    assert sum(cells.values()) == pytest.approx(summary["total_usd"]) == pytest.approx(25.80)
    assert sum(r[3] for r in split["data"]) == pytest.approx(summary["wasted_usd"])
    for key, label in (("spend_by_phase", "phase"), ("spend_by_activity", "activity")):
        table = _logged_table(run_files, key)
        assert table["columns"] == [label, "useful_usd", "wasted_usd", "total_usd"]
        assert sum(r[3] for r in table["data"]) == pytest.approx(25.80)
    by_activity = {r[0]: r[3] for r in _logged_table(run_files, "spend_by_activity")["data"]}
    assert list(by_activity) == ["startup", "train", "checkpoint", "eval", "sample_grid"]
    assert by_activity["eval"] == pytest.approx(
        sum(v for (_, a), v in cells.items() if a == "eval")
    )
    assert _logged_table(run_files, "spend_by_activity_plot_table")["data"]
    estimates = _logged_table(run_files, "estimate_vs_settled")
    col = {name: i for i, name in enumerate(estimates["columns"])}
    got = {r[col["trial"]]: r for r in estimates["data"]}
    assert sorted(got) == sorted(_ERRORS)  # #0, from an older study, had no estimate
    for number, error in _ERRORS.items():
        row = got[number]
        assert row[col["error"]] == pytest.approx(error)
        assert row[col["settled_usd"]] / row[col["estimate_usd"]] - 1 == pytest.approx(error)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_loader(data: ReportData, monkeypatch: pytest.MonkeyPatch) -> list:
    """Stand in for budget_lab.report.load (the study + ledger reader): returns `data`."""
    calls: list = []

    def load_report_data(workspace, sweep):
        calls.append((workspace, sweep))
        return data

    module = types.ModuleType("budget_lab.report.load")
    module.load_report_data = load_report_data  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "budget_lab.report.load", module)
    return calls


def test_cli_report_terminal_and_html(fake_loader, tmp_path: Path, capsys):
    from budget_lab.cli import main

    ws = tmp_path / "ws"
    code = main(
        ["report", "--sweep", "mask_ratio", "--out", str(tmp_path / "r"), "--workspace", str(ws)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Trials (6)" in out and f"wrote {tmp_path / 'r' / 'index.html'}" in out
    assert (tmp_path / "r" / "pareto.png").is_file()
    ((workspace, sweep),) = fake_loader
    assert workspace.root == ws.resolve() and sweep == "mask_ratio"


def test_cli_report_wandb_offline_exits_2_with_the_spec(
    fake_loader, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, no_network
):
    from budget_lab.cli import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    ws = tmp_path / "ws"
    code = main(["report", "--sweep", "mask_ratio", "--wandb", "--workspace", str(ws)])
    err = capsys.readouterr().err
    assert code == 2
    assert "budget-lab: error: no W&B API key" in err and "Traceback" not in err
    assert (ws / "sweeps" / "mask_ratio" / "report" / "wandb_report_spec.json").is_file()
