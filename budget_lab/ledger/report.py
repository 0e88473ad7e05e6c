"""Cost reports as text: an aligned table, CSV or JSON, from `Ledger.report` rows.

rows = ledger.report("phase", sweep="mask_ratio")
print(format_report(rows, by="phase", fmt="csv"))
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from datetime import datetime, timezone

from budget_lab.errors import ConfigError
from budget_lab.ledger.store import ReportRow
from budget_lab.units import usd

__all__ = ["FORMATS", "Score", "format_report", "report_totals"]

#: Output formats of `format_report`.
FORMATS = ("table", "csv", "json")


def report_totals(rows: list[ReportRow]) -> ReportRow:
    """All groups added up (group "total")."""
    return ReportRow(
        group="total",
        segments=sum(r.segments for r in rows),
        gpu_hours=sum(r.gpu_hours for r in rows),
        cost_usd=sum(r.cost_usd for r in rows),
        useful_usd=sum(r.useful_usd for r in rows),
        wasted_usd=sum(r.wasted_usd for r in rows),
        estimated_usd=sum(r.estimated_usd for r in rows),
        price_sources=sorted({s for r in rows for s in r.price_sources}),
        first_start=min((r.first_start for r in rows), default=0.0),
        last_end=max((r.last_end for r in rows), default=0.0),
    )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


#: A group's score as `format_report` takes it: {"fid", "fid_lo", "fid_hi", "fid_n"} (the run's
#: final FID, its 95 % interval and its N, from the run folder's eval.json).
Score = dict[str, float | int | None]


def _score_text(score: Score | None) -> str:
    if not score or score.get("fid") is None:
        return "—"
    text = f"{score['fid']:.1f}"
    if score.get("fid_lo") is not None and score.get("fid_hi") is not None:
        text += f" [{score['fid_lo']:.1f}, {score['fid_hi']:.1f}]"
    return text + (f" N={score['fid_n']}" if score.get("fid_n") else "")


def format_report(
    rows: list[ReportRow],
    *,
    by: str,
    fmt: str = "table",
    title: str = "",
    scores: dict[str, Score] | None = None,
) -> str:
    """Rows (plus a total) as `fmt`: table | csv | json. `scores` (by group; runs and trials):
    what each group's money bought, its FID with interval and N, as one more column."""
    if fmt not in FORMATS:
        raise ConfigError(f"report format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    total = report_totals(rows)
    if fmt == "json":
        out_rows = []
        for r in rows:
            row = asdict(r)
            if scores is not None:
                row["score"] = scores.get(r.group)
            out_rows.append(row)
        return json.dumps({"by": by, "rows": out_rows, "total": asdict(total)}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        extra = ["fid", "fid_ci95_lo", "fid_ci95_hi", "fid_n"] if scores is not None else []
        writer.writerow(
            [by, "segments", "gpu_hours", "cost_usd", "useful_usd", "wasted_usd",
             "estimated_usd", "price_sources", "first_start", "last_end", *extra]
        )  # fmt: skip
        for r in [*rows, total]:
            score = (scores or {}).get(r.group) or {}
            writer.writerow(
                [r.group, r.segments, f"{r.gpu_hours:.6f}", f"{r.cost_usd:.6f}",
                 f"{r.useful_usd:.6f}", f"{r.wasted_usd:.6f}", f"{r.estimated_usd:.6f}",
                 ";".join(r.price_sources), _iso(r.first_start) if r.segments else "",
                 _iso(r.last_end) if r.segments else "",
                 *(["" if score.get(k) is None else score[k] for k in ("fid", "fid_lo", "fid_hi",
                    "fid_n")] if scores is not None else [])]
            )  # fmt: skip
        return out.getvalue()

    # A plain aligned table: rich renders ~1,500 rows/s, too slow for a report over thousands of
    # runs; this stays well under a second at 100,000 segments.
    header = [by, "segments", "GPU-hours", "cost $", "useful $", "wasted $", "price sources"]
    if scores is not None:
        header.insert(-1, "FID [95% CI] N")
    digits = 2 if total.cost_usd >= 10 else 4  # a CPU demo costs cents: show them

    def money(x: float) -> str:  # a sub-cent part never reads 0.0000 (three significant digits)
        return f"{x:,.2f}" if digits == 2 else usd(x).removeprefix("$")

    body = []
    for r in [*rows, total]:
        sources = ", ".join(r.price_sources)
        if r.estimated_usd > 0:
            sources += f" (${r.estimated_usd:,.2f} estimated)"
        body.append(
            [r.group, f"{r.segments:,}", f"{r.gpu_hours:,.{digits}f}", money(r.cost_usd),
             money(r.useful_usd), money(r.wasted_usd), sources]
        )  # fmt: skip
        if scores is not None:
            body[-1].insert(-1, "" if r is total else _score_text(scores.get(r.group)))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = {0, len(cells) - 1}  # names and sources left-aligned, figures right-aligned
        padded = zip(cells, widths, strict=True)
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(padded)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out += [line(header), rule, *(line(b) for b in body[:-1]), rule, line(body[-1])]
    return "\n".join(out)
