"""The suite's Markdown report, which the docs' Benchmarks page inlines."""

from __future__ import annotations

import time
from pathlib import Path

from loralab.bench.config import BenchConfig, Check, Results
from loralab.bench.sections import SECTIONS
from loralab.bench.sections._table import shown, table

__all__ = ["to_markdown", "command_line"]


def _limit(c: Check) -> float | None:
    """The number of a check's target ("<= 1.35" -> 1.35), when it was missed."""
    if c.met is not False:
        return None
    try:
        return float(str(c.target).split()[-1])
    except ValueError:
        return None


def _met(c: Check) -> str:
    return "" if c.met is None else ("yes" if c.met else "**no**")


def command_line(cfg: BenchConfig) -> str:
    """The ``loralab bench`` command line that gives this configuration."""
    flags = " --quick" if cfg.quick else ""
    default_repeats = (BenchConfig.tiny() if cfg.quick else BenchConfig()).repeats
    flags += f" --repeats {cfg.repeats}" if cfg.repeats != default_repeats else ""
    flags += f" --threads {cfg.threads}" if cfg.threads else ""
    flags += f" --clock {cfg.clock}" if cfg.clock != "wall" else ""
    flags += f" --seed {cfg.seed}" if cfg.seed else ""
    return f"loralab bench{flags}"


def to_markdown(res: Results, figures: list[str]) -> str:
    """The results as Markdown: the machine, a summary of every check, then each section."""
    cfg = res.config
    out = [
        f"Measured by `{command_line(cfg)}` "
        f"on {time.strftime('%Y-%m-%d')}; each ratio is the median of {cfg.repeats} paired, "
        "alternating repeats.",
        "",
        "### Machine",
        "",
        table(["", ""], [[k, v] for k, v in res.machine.items()]),
        "",
        "### Summary",
        "",
        table(
            ["section", "ratio", "measured", "target", "met"],
            [[c.section, c.name, shown(c.value, _limit(c)), c.target, _met(c)] for c in res.checks],
        ),
        "",
    ]
    for section in SECTIONS.values():
        out += section.markdown(res)
    if res.notes:
        out += ["Notes:", ""] + [f"- {n}" for n in res.notes] + [""]
    out += [f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in figures]
    return "\n".join(out).rstrip() + "\n"
