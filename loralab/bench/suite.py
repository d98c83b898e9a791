"""`run_bench`: run the sections, print and write the report and the figures."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from loralab.bench.config import DEFAULT_OUT, BenchConfig, Results
from loralab.bench.figures import write_figures
from loralab.bench.machine import blas_threads, machine_info, numpy_threads, optional_torch
from loralab.bench.report import to_markdown
from loralab.bench.sections import SECTIONS
from loralab.bench.timing import CLOCKS
from loralab.fileio import atomic_write

__all__ = ["run_bench", "run_sections_main"]


def run_bench(
    config: BenchConfig,
    out: Path | str | None = DEFAULT_OUT,
    *,
    sections: tuple[str, ...] = tuple(SECTIONS),
    log: Callable[[str], None] = print,
) -> Results:
    """Run the suite (or some ``sections``), print the results and return them.

    Unless ``out`` is None, the markdown goes to ``out`` and the figures next to it (the
    figures only for the whole suite). PyTorch, when installed, runs with as many threads as
    NumPy's BLAS (``config.threads``, or NumPy's current count).
    """
    if config.clock not in CLOCKS:
        raise ValueError(f"run_bench: clock must be one of {list(CLOCKS)}, got {config.clock!r}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"run_bench: unknown sections {unknown}; known: {list(SECTIONS)}")
    out = None if out is None else Path(out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    with blas_threads(config.threads):
        torch = optional_torch()
        if torch is not None:
            torch.set_num_threads(numpy_threads())
        res = Results(config, machine_info())
        res.machine["clock"] = (
            "wall time (time.perf_counter)"
            if config.clock == "wall"
            else "CPU time of the process (time.process_time)"
        )
        for key, value in res.machine.items():
            log(f"{key}: {value}")
        for name in sections:
            SECTIONS[name].run(res, log)
    whole = tuple(sections) == tuple(SECTIONS)
    figures = write_figures(res, out.parent) if out is not None and whole else []
    text = to_markdown(res, figures)
    log("")
    log(text)
    if out is not None:
        atomic_write(out, text)
        log(f"wrote {out}" + "".join(f" and {out.parent / f}" for f in figures))
    return res


def run_sections_main(
    sections: tuple[str, ...],
    description: str,
    *,
    repeats: int = 21,
    argv: Sequence[str] | None = None,
) -> Results:
    """The command line of a ``benchmarks/bench_*.py`` script: some ``sections``, nothing written.

    Parses ``[--repeats N] [--threads N] [--clock wall|cpu]`` from ``argv`` (default: sys.argv)
    into the full-size `BenchConfig` and runs `run_bench` on those sections with ``out=None``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        BenchConfig(), repeats=args.repeats, threads=args.threads, clock=args.clock
    )
    return run_bench(config, None, sections=sections)
