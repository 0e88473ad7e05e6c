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

__all__ = ["FORMATS", "format_report", "report_totals"]

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


def format_report(rows: list[ReportRow], *, by: str, fmt: str = "table", title: str = "") -> str:
    """Rows (plus a total) as `fmt`: table | csv | json."""
    if fmt not in FORMATS:
        raise ConfigError(f"report format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    total = report_totals(rows)
    if fmt == "json":
        return json.dumps(
            {
                "by": by,
                "rows": [asdict(r) for r in rows],
                "total": asdict(total),
            },
            indent=2,
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [by, "segments", "gpu_hours", "cost_usd", "useful_usd", "wasted_usd",
             "estimated_usd", "price_sources", "first_start", "last_end"]
        )  # fmt: skip
        for r in [*rows, total]:
            writer.writerow(
                [r.group, r.segments, f"{r.gpu_hours:.6f}", f"{r.cost_usd:.6f}",
                 f"{r.useful_usd:.6f}", f"{r.wasted_usd:.6f}", f"{r.estimated_usd:.6f}",
                 ";".join(r.price_sources), _iso(r.first_start) if r.segments else "",
                 _iso(r.last_end) if r.segments else ""]
            )  # fmt: skip
        return out.getvalue()

    # A plain aligned table: rich renders ~1,500 rows/s, too slow for a report over thousands of
    # runs; this stays well under a second at 100,000 segments.
    header = [by, "segments", "GPU-hours", "cost $", "useful $", "wasted $", "price sources"]
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
