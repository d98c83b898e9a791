"""Markdown helpers shared by the sections and the report."""

from __future__ import annotations

__all__ = ["table", "mib", "shown"]


def mib(n: int | None) -> str:
    """Bytes as MiB with one decimal, or "n/a" when not measured."""
    return "n/a" if not n else f"{n / 2**20:.1f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def shown(value: float, limit: float | None = None) -> str:
    """``value`` with three decimals, or as many more (up to six) as it takes not to round onto
    a ``limit`` it missed: 1.35046 against <= 1.35 reads 1.3505, not 1.350."""
    digits = 3
    if limit is not None and value != limit:
        while digits < 6 and round(value, digits) == round(limit, digits):
            digits += 1
    return f"{value:.{digits}f}"
