"""How budget-lab writes amounts for people: one formatter for dollars, used by every table."""

from __future__ import annotations

import math

__all__ = ["usd"]


def usd(x: float | None) -> str:
    """Dollars with enough digits to tell costs apart: cents from $0.10 up (``$1,234.56``),
    three significant digits below (``$0.0042``, ``$0.0567``, ``$0.000123``), so a sub-cent
    cost never shows as ``$0.00``; "—" for None."""
    if x is None or not math.isfinite(x):
        return "—"
    if x == 0 or abs(x) >= 0.1:
        return f"${x:,.2f}"
    digits = 2 - math.floor(math.log10(abs(x)))  # 3 significant digits
    text = f"{x:.{digits}f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"
