"""Reports: summary.json round trip, Pareto front and spend aggregates, PNG figures, the HTML
page, the terminal tables, the W&B report spec (offline) and the W&B summary run (offline)."""

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
from budget_lab.report.data import (
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
    cost_usd is the sum of its rows. COMPLETE trials have a sample grid except #2, whose grid
    file is gone (the report must skip it).
    """
    trials, spend = [], []
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
        for phase, usd, lost in phases:
            seconds = 1200.0 * usd / cost
            spend.append(
                SpendRow(
                    run=run,
                    trial=number,
                    phase=phase,
                    cluster=cluster,
                    start=start,
                    end=start + seconds,
                    cost_usd=usd,
                    wasted_usd=lost,
                    gpu_seconds=seconds * (8 if cluster == "aws-p5" else 1),
                )
            )
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

    # Written again into the same folder: overwritten, not duplicated.
    write_html_report(data, out)
    assert len(list(out.glob("*.png"))) == 5 + 3


def test_terminal_report(data: ReportData):
    from budget_lab.report.terminal import print_report

    console = Console(record=True, width=200, color_system=None)
    print_report(data, console)
    text = console.export_text()
    assert "Sweep mask_ratio" in text and "Trials (6)" in text
    assert "spent $25.80 of $25.00 budget" in text and "wasted $1.10" in text
    assert "best FID 31.20: trial #5 (mask_ratio-005)" in text
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        assert state in text
    assert text.count("★") == len(PARETO) + 1  # + the column header
    assert "Spend by phase" in text and "Spend by cluster" in text and "aws-p5" in text


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
        "spend",
    }
    for p in panels:  # inside W&B's 24-column grid
        assert 0 <= p["layout"]["x"] and p["layout"]["x"] + p["layout"]["w"] <= 24

    report = build_wandb_report(spec)
    assert isinstance(report, wr.Report) and report.entity == "my-team"
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 3 and sum(len(g.panels) for g in grids) == len(panels)
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
    finally:
        run.finish()

    trials = _logged_table(run_files, "trials")
    col = {name: i for i, name in enumerate(trials["columns"])}
    assert len(trials["data"]) == len(data.trials)
    for row, t in zip(trials["data"], sorted(data.trials, key=lambda t: t.number), strict=True):
        assert row[col["trial"]] == t.number and row[col["state"]] == t.state
        assert row[col["fid"]] == t.fid and row[col["cost_usd"]] == pytest.approx(t.cost_usd)
        assert row[col["pareto"]] == t.pareto and row[col["mask_ratio"]] == t.params["mask_ratio"]

    front = _logged_table(run_files, "pareto_front")
    assert sorted(r[0] for r in front["data"]) == sorted(PARETO)
    scatter = _logged_table(run_files, "fid_vs_usd_table")  # the wandb.plot.scatter data
    assert sorted(r[2] for r in scatter["data"]) == [0, 1, 2, 5]
    steps = _logged_table(run_files, "pareto_front_plot_table")
    assert [r[:2] for r in steps["data"]][:3] == [[3.2, 42.1], [5.1, 42.1], [5.1, 35.4]]
    for key in ("spend_over_time_plot", "spend_by_phase_plot", "useful_vs_wasted_plot"):
        assert _logged_table(run_files, f"{key}_table")["data"]


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
