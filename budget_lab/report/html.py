"""The self-contained HTML report: one ``index.html`` beside its PNG figures, readable offline.

Layout of the output folder::

    out_dir/
      index.html              inline CSS, relative <img> links, no external URL anywhere
      pareto.png ...          the figures of `budget_lab.report.figures.FIGURES`
      grid-trial-007.png      sample grids of the best 3 trials (copied from their run folders)

A Content-Security-Policy <meta> lets the page load nothing but its own inline CSS and script
and the images in its folder. The page needs no JavaScript. A few inline lines mark the page when every image has loaded
(``<html data-images-loaded="N" data-images-broken="0">``) and replace a missing figure with a
note naming its file, for readers who copied index.html without its PNGs.

The per-trial table is ``<table id="trials">`` with one ``<tr class="trial-row">`` per trial
(``data-trial`` and ``data-state`` attributes), so scripts and tests can count and filter rows.
Its scores carry their noise: FID [95% CI] with its N, KID ± std, alignment [95% CI]; costs keep
their sub-cent digits (`data.usd`), and each trial's estimate before launch is shown beside what
the ledger settled, with the error (settled / estimate - 1). The sweep's verdict (what it told
apart beyond the noise and what it could not) is ``<p id="verdict">`` near the top.

Where the money went is ``<table id="cost-split">``: dollars per phase (rows) and activity
(columns: start-up, training, checkpoints, evaluation, ...), from the ledger's split of each
segment over the job's own clock; each cell carries its exact figure in ``data-usd``, and the
totals row and column sum to the sweep's total.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import math
import os
import shutil
from pathlib import Path

from budget_lab.io import atomic_write_text
from budget_lab.report.data import (
    ReportData,
    TrialRow,
    alignment_text,
    best_trials,
    cost_matrix,
    estimate_text,
    fid_text,
    kid_text,
    spend_by,
    usd,
)
from budget_lab.report.figures import FIGURES, write_figures

__all__ = ["write_html_report", "copy_best_grids", "N_BEST_GRIDS"]

N_BEST_GRIDS = 3  # sample grids shown: the best trials by FID

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1d2329; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 24px; }
h2 { margin: 28px 0 10px; font-size: 18px; border-bottom: 1px solid #dde1e6; padding-bottom: 4px; }
.meta { color: #5b6570; margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 14px;
        min-width: 130px; }
.card .label { color: #5b6570; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 600; }
.wasted { color: #c0392b; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #5b6570; font-size: 12px; margin-top: 4px; }
.missing { color: #c0392b; padding: 24px; text-align: center; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
th, td { border: 1px solid #dde1e6; padding: 4px 8px; text-align: left; white-space: nowrap; }
th { background: #eef1f4; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.pareto td:first-child { box-shadow: inset 4px 0 #1a9850; }
.scroll { overflow-x: auto; border: 1px solid #dde1e6; border-radius: 6px; }
.state { border-radius: 3px; padding: 0 6px; font-size: 12px; font-weight: 600; }
.state-COMPLETE { background: #dff0d8; color: #2d6a2d; }
.state-PRUNED { background: #fdebd3; color: #9a5b13; }
.state-FAIL { background: #f8d7da; color: #8a1f2b; }
.state-RUNNING { background: #d9ecf7; color: #1f5f8a; }
.grids { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 14px; }
tr.total td { font-weight: 600; background: #eef1f4; }
.verdict { background: #fff; border: 1px solid #dde1e6; border-left: 4px solid #1a9850;
           border-radius: 6px; padding: 10px 14px; margin: 16px 0 0; white-space: pre-line; }
footer { color: #8a939c; font-size: 12px; margin-top: 32px; }
"""

# Marks the page when all images have loaded, and names a missing figure in place of it.
_SCRIPT = """
(function () {
  var imgs = Array.prototype.slice.call(document.images);
  function broken(img) {
    var note = document.createElement("div");
    note.className = "missing";
    note.textContent = "missing figure: " + img.getAttribute("src");
    img.replaceWith(note);
  }
  window.addEventListener("load", function () {
    var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
    imgs.filter(function (i) { return ok.indexOf(i) < 0; }).forEach(broken);
    document.documentElement.setAttribute("data-images-loaded", String(ok.length));
    document.documentElement.setAttribute("data-images-broken", String(imgs.length - ok.length));
  });
})();
"""


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# Nothing but the page's own style, its own script and images in the report's folder may load,
# even if someone edits the page: the browser blocks anything else (and says so on the console).
# The hashes are of _CSS and _SCRIPT exactly as they are written into the page.
_CSP = (
    "default-src 'none'; img-src 'self'; "
    f"style-src 'sha256-{_sha256(_CSS)}'; script-src 'sha256-{_sha256(_SCRIPT)}'"
)


_FIGURE_CAPTIONS = {
    "pareto": "FID vs $ per trial; bars: the FID's 95% interval. The green step line is the "
    "front within the noise: no other trial is better beyond the noise (FID intervals apart, "
    "or cheaper beyond the cost tolerance) and no worse in the other. Crosses: pruned and "
    "failed trials.",
    "spend_over_time": "Cumulative spend: useful (kept work) and wasted (lost work).",
    "spend_by_phase": "Spend by training phase (each job's time split over the phases it ran).",
    "spend_by_activity": "Spend by activity: start-up, training, checkpoint writes, evaluation, "
    "sample grids, idle after a stop request, other.",
    "spend_by_cluster": "Spend by cluster.",
    "spend_by_trial": "Spend by trial.",
}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _param(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _resolve_grid(trial: TrialRow) -> Path | None:
    """The trial's grid PNG: `grid_path` as given, else relative to its run folder."""
    if not trial.grid_path:
        return None
    path = Path(trial.grid_path)
    if not path.is_absolute() and not path.is_file() and trial.run_dir:
        path = Path(trial.run_dir) / path
    return path if path.is_file() else None


def copy_best_grids(
    data: ReportData, out_dir: str | os.PathLike[str], n: int = N_BEST_GRIDS
) -> list[tuple[TrialRow, str]]:
    """Copy the sample grids of the `n` best trials that have one into `out_dir`.

    Returns ``(trial, file name in out_dir)`` pairs, best first. Grids copied by an earlier
    report into the same folder are removed first.
    """
    out = Path(out_dir)
    for stale in out.glob("grid-trial-*.png"):  # from an earlier report in the same folder
        stale.unlink()
    copied = []
    for trial in best_trials(data.trials, len(data.trials)):
        if len(copied) == n:
            break
        source = _resolve_grid(trial)
        if source is None:
            continue
        name = f"grid-trial-{trial.number:03d}.png"
        shutil.copyfile(source, out / name)
        copied.append((trial, name))
    return copied


def _cards(data: ReportData) -> str:
    best = best_trials(data.trials, 1)
    states = ", ".join(
        f"{data.count(s)} {s.lower()}"
        for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        if data.count(s)
    )
    cards = [
        ("spent", usd(data.total_usd), ""),
        ("useful", usd(data.useful_usd), ""),
        ("wasted", usd(data.wasted_usd), "wasted"),
        ("GPU-hours", _num(data.gpu_hours), ""),
        ("trials", str(len(data.trials)), ""),
        ("lowest FID", f"{fid_text(best[0])} (#{best[0].number})" if best else "—", ""),
    ]
    if data.budget_usd is not None:
        cards.insert(1, ("budget", usd(data.budget_usd), ""))
    items = "\n".join(
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value {cls}">{_e(value)}</div></div>'
        for label, value, cls in cards
    )
    return f'<div class="cards" id="summary">\n{items}\n</div>\n<p class="meta">{_e(states)}</p>'


def _verdict(data: ReportData) -> str:
    """The sweep's verdict as a paragraph (its lines kept); "" without one."""
    if not data.verdict:
        return ""
    return f'<p class="verdict" id="verdict"><b>Verdict.</b> {_e(data.verdict)}</p>'


def _trial_table(data: ReportData) -> str:
    keys = sorted({k for t in data.trials for k in t.params})
    head = ["#", "state", "FID [95% CI]", "N", "KID ± std", "alignment [95% CI]", "cost"]
    head += ["estimate", "error", "wasted", "GPU-h", "Pareto", "run", *keys]
    rows = []
    for t in sorted(data.trials, key=lambda t: t.number):
        estimate, error = estimate_text(t)
        cells = [
            f'<td class="num">{t.number}</td>',
            f'<td><span class="state state-{_e(t.state)}">{_e(t.state)}</span></td>',
            f'<td class="num fid">{_e(fid_text(t))}</td>',
            f'<td class="num">{"—" if t.fid_n is None else t.fid_n}</td>',
            f'<td class="num kid">{_e(kid_text(t))}</td>',
            f'<td class="num alignment">{_e(alignment_text(t))}</td>',
            f'<td class="num">{usd(t.cost_usd)}</td>',
            f'<td class="num estimate">{estimate}</td>',
            f'<td class="num estimate-error">{error}</td>',
            f'<td class="num">{usd(t.wasted_usd)}</td>',
            f'<td class="num">{_num(t.gpu_hours)}</td>',
            f"<td>{'&#9733;' if t.pareto else ''}</td>",
            f"<td>{_e(t.run or '—')}</td>",
            *(f"<td>{_e(_param(t.params[k])) if k in t.params else '—'}</td>" for k in keys),
        ]
        cls = "trial-row pareto" if t.pareto else "trial-row"
        rows.append(
            f'<tr class="{cls}" data-trial="{t.number}" data-state="{_e(t.state)}">'
            + "".join(cells)
            + "</tr>"
        )
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return (
        '<div class="scroll"><table id="trials">\n'
        f"<thead><tr>{header}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table></div>"
    )


def _spend_table(data: ReportData) -> str:
    runs = spend_by(data.spend, "run")
    gpu_h: dict[str, float] = {}
    clusters: dict[str, set[str]] = {}
    for row in data.spend:
        name = row.run or "(no run)"
        gpu_h[name] = gpu_h.get(name, 0.0) + row.gpu_seconds / 3600.0
        clusters.setdefault(name, set()).add(row.cluster)
    rows = "\n".join(
        f"<tr><td>{_e(run)}</td><td>{_e(', '.join(sorted(clusters[run])))}</td>"
        f'<td class="num">{_num(gpu_h[run])}</td><td class="num">{usd(u + w)}</td>'
        f'<td class="num">{usd(u)}</td><td class="num wasted">{usd(w)}</td></tr>'
        for run, (u, w) in runs.items()
    )
    return (
        '<div class="scroll"><table id="spend">\n<thead><tr><th>run</th><th>cluster</th>'
        "<th>GPU-h</th><th>total</th><th>useful</th><th>wasted</th></tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody></table></div>"
    )


_ACTIVITY_NAMES = {
    "startup": "start-up",
    "train": "training",
    "checkpoint": "checkpoints",
    "eval": "evaluation",
    "sample_grid": "sample grids",
    "idle": "idle",
    "other": "other",
}


def _cost_split(data: ReportData) -> str:
    """Dollars per phase x activity, with a total per phase, per activity and overall."""
    phases, activities, cells = cost_matrix(data)
    if not phases:
        return '<p class="meta">No spend recorded yet.</p>'

    def cell(value: float, cls: str = "num") -> str:
        return f'<td class="{cls}" data-usd="{value!r}">{usd(value)}</td>'

    rows = []
    for phase in phases:
        values = [cells.get((phase, a), 0.0) for a in activities]
        rows.append(
            f'<tr class="phase-row" data-phase="{_e(phase)}"><td>{_e(phase)}</td>'
            + "".join(cell(v) for v in values)
            + cell(sum(values), "num phase-total")
            + "</tr>"
        )
    per_activity = [sum(cells.get((p, a), 0.0) for p in phases) for a in activities]
    rows.append(
        '<tr class="total"><td>total</td>'
        + "".join(cell(v, "num activity-total") for v in per_activity)
        + cell(sum(per_activity), "num grand-total")
        + "</tr>"
    )
    header = "".join(
        f'<th data-activity="{_e(a)}">{_e(_ACTIVITY_NAMES.get(a, a))}</th>' for a in activities
    )
    return (
        '<div class="scroll"><table id="cost-split">\n'
        f"<thead><tr><th>phase</th>{header}<th>total</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table></div>"
    )


def _figures(files: dict[str, Path]) -> str:
    items = []
    for name in FIGURES:
        if name in files:
            items.append(
                f'<figure id="fig-{_e(name)}"><img src="{_e(files[name].name)}" '
                f'alt="{_e(name)}"><figcaption>{_e(_FIGURE_CAPTIONS[name])}</figcaption></figure>'
            )
    return '<div class="figures">\n' + "\n".join(items) + "\n</div>"


def _grids(grids: list[tuple[TrialRow, str]]) -> str:
    if not grids:
        return '<p class="meta">No sample grids: no finished trial has one yet.</p>'
    items = "\n".join(
        f'<figure class="grid"><img src="{_e(name)}" alt="samples of trial {t.number}">'
        f"<figcaption>trial #{t.number} ({_e(t.run or '')}): FID {_e(fid_text(t))}, "
        f"{usd(t.cost_usd)}</figcaption></figure>"
        for t, name in grids
    )
    return f'<div class="grids">\n{items}\n</div>'


def write_html_report(data: ReportData, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``index.html``, its figures and the best trials' sample grids into `out_dir`.

    Returns the path of index.html. Files of an earlier report in the same folder are
    overwritten.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_figures(data, out)
    grids = copy_best_grids(data, out)

    meta = []
    if data.sweep:
        meta.append(f"sweep <b>{_e(data.sweep)}</b>")
    if data.objective_formula or data.objective:
        meta.append(f"objective <code>{_e(data.objective_formula or data.objective)}</code>")
    if data.stop_reason:
        meta.append(f"stopped: {_e(data.stop_reason)}")
    elif data.sweep:
        meta.append("still running")
    meta.append(f"generated {_e(_when(data.generated_at))}")

    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(data.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{_e(data.title)}</h1>
<p class="meta">{" &middot; ".join(meta)}</p>
{_cards(data)}
{_verdict(data)}
<h2>Figures</h2>
{_figures(files)}
<h2>Trials ({len(data.trials)})</h2>
{_trial_table(data)}
<h2>Samples of the best trials</h2>
{_grids(grids)}
<h2>Cost by phase and activity</h2>
{_cost_split(data)}
<h2>Spend by run</h2>
{_spend_table(data)}
<footer>budget-lab report &middot; all amounts in USD; useful + wasted = total.</footer>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return atomic_write_text(out / "index.html", page)
