"""Markdown helpers shared by the sections and the report."""

from __future__ import annotations

__all__ = ["table", "mib"]


def mib(n: int | None) -> str:
    """Bytes as MiB with one decimal, or "n/a" when not measured."""
    return "n/a" if not n else f"{n / 2**20:.1f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
