"""The ``loralab`` command line.

Each subcommand is one pair of functions: ``_add_<name>_parser(subparsers)`` declares its options
and returns its parser, ``_run_<name>(args) -> int`` does the work and returns the exit code. To
add a subcommand, write the pair and list it in ``SUBCOMMANDS``.

Bad input is one line on stderr and exit code 2, never a traceback: a subcommand raises
``UsageError`` with the message, and argparse's own errors go the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from loralab import counting
from loralab._validate import positive_int
from loralab.params_report import format_params_report, format_presets, format_qlora_memory
from loralab.quant.memory import qlora_memory


class UsageError(Exception):
    """Bad command-line input; ``main`` prints the message as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and call sys.exit
        raise UsageError(f"{self.prog}: error: {message}")


def _check_positive(args: argparse.Namespace, prog: str, **flags: str) -> None:
    """Refuse any of ``flags`` (dest -> flag) given with a value < 1 (argparse made it an int)."""
    for dest, flag in flags.items():
        if getattr(args, dest) is not None:
            try:
                positive_int(flag, getattr(args, dest), f"{prog}: error")
            except ValueError as e:
                raise UsageError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# loralab params


def _add_params_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "params",
        help="LoRA trainable parameters and training memory for a real model",
        description=(
            "Count LoRA trainable parameters and estimate training memory (weights, gradients, "
            "optimizer states; activations left out) of full fine-tuning against LoRA, for a "
            "published model (--preset) or an explicit shape."
        ),
    )
    model = p.add_argument_group("model (a preset, or an explicit shape)")
    model.add_argument("--preset", metavar="NAME", help="a published model, see --list-presets")
    model.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    model.add_argument("--d-model", type=int, metavar="N", help="residual width")
    model.add_argument("--layers", type=int, metavar="N", help="number of transformer blocks")
    model.add_argument("--d-ff", type=int, metavar="N", help="MLP hidden width")
    model.add_argument("--heads", type=int, metavar="N", help="query heads")
    model.add_argument(
        "--kv-heads", type=int, metavar="N", help="key/value heads (default: --heads)"
    )
    model.add_argument(
        "--vocab",
        type=int,
        metavar="N",
        help="vocabulary size (without it, totals exclude the embeddings)",
    )
    model.add_argument("--gated-mlp", action="store_true", help="SwiGLU MLP with a gate matrix")
    model.add_argument("--tied-embeddings", action="store_true", help="output head = embedding")
    lora = p.add_argument_group("LoRA and training")
    lora.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    lora.add_argument(
        "--targets",
        default="q,v",
        metavar="LIST",
        help=f"comma list among {','.join(counting.TARGETS)} (default: q,v)",
    )
    lora.add_argument("--dtype", choices=tuple(counting.DTYPE_BYTES), default="fp16")
    lora.add_argument("--optimizer", choices=tuple(counting.OPTIMIZER_STATES), default="adam")
    lora.add_argument(
        "--quant",
        choices=("nf4", "fp4", "int4", "int8"),
        help="QLoRA: the frozen base quantized blockwise (blocks of 64), see loralab.quant",
    )
    lora.add_argument(
        "--double-quant", action="store_true", help="with --quant: the absmax constants in 8 bits"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


_SHAPE_FLAGS = {
    "d_model": "--d-model",
    "layers": "--layers",
    "d_ff": "--d-ff",
    "heads": "--heads",
}


def _shape_from_args(args: argparse.Namespace) -> counting.TransformerShape:
    given = [flag for dest, flag in _SHAPE_FLAGS.items() if getattr(args, dest) is not None]
    given += [
        f for f, v in (("--kv-heads", args.kv_heads), ("--vocab", args.vocab)) if v is not None
    ]
    if args.preset is not None:
        if given:
            raise UsageError(
                "loralab params: error: give --preset or a shape, not both "
                f"(got {', '.join(given)})"
            )
        try:
            return counting.get_preset(args.preset)
        except ValueError as e:
            raise UsageError(f"loralab params: error: {e}") from None
    missing = [flag for dest, flag in _SHAPE_FLAGS.items() if getattr(args, dest) is None]
    if missing:
        raise UsageError(
            "loralab params: error: give --preset NAME or a full shape; "
            f"missing {', '.join(missing)}"
        )
    try:
        return counting.TransformerShape(
            d_model=args.d_model,
            n_layers=args.layers,
            d_ff=args.d_ff,
            n_heads=args.heads,
            n_kv_heads=args.kv_heads,
            vocab_size=0 if args.vocab is None else args.vocab,
            gated_mlp=args.gated_mlp,
            tied_embeddings=args.tied_embeddings,
        )
    except ValueError as e:
        raise UsageError(f"loralab params: error: {e}") from None


def _run_params(args: argparse.Namespace) -> int:
    if args.list_presets:
        print(format_presets(as_json=args.json))
        return 0
    _check_positive(args, "loralab params", r="--r")
    shape = _shape_from_args(args)
    try:
        est = counting.memory_estimate(
            shape, args.r, args.targets, dtype=args.dtype, optimizer=args.optimizer
        )
    except ValueError as e:
        raise UsageError(f"loralab params: error: {e}") from None
    if args.double_quant and args.quant is None:
        raise UsageError("loralab params: error: --double-quant needs --quant")
    qlora = None if args.quant is None else qlora_memory(est, args.quant, args.double_quant)
    if args.json:
        report = {"model": shape.name, **est.to_dict(), "embeddings_included": shape.vocab_size > 0}
        print(json.dumps(report | ({"qlora": qlora} if qlora else {}), indent=2))
    else:
        print(format_params_report(shape, est) + (format_qlora_memory(qlora) if qlora else ""))
    return 0


def _add_grade_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "grade",
        help="run students' exercise notebooks and print a score per exercise",
        description="Execute exercise notebooks and score each exercise (exit 1 when any fails).",
    )
    parser.add_argument(
        "notebooks", nargs="+", help="student notebook(s) (.ipynb) or folders of notebooks"
    )
    parser.add_argument("--timeout", default="120", help="seconds per cell (default 120)")
    parser.add_argument(
        "--time-limit", help="seconds per call of a student's function (default: the checks' 5)"
    )
    parser.add_argument("-j", "--jobs", help="notebooks graded at once (default 1)")
    parser.add_argument("--csv", metavar="FILE", help="write the gradebook: one row per notebook")
    parser.add_argument("--feedback", metavar="DIR", help="write one Markdown file per notebook")
    parser.add_argument("--seed", help="draw the checks' test cases from this seed")
    parser.add_argument(
        "--memory-limit", metavar="MB", help="MiB of memory per student kernel (POSIX; 0: none)"
    )
    return parser


def _run_grade(args: argparse.Namespace) -> int:
    from loralab.exercises.grade import main as grade_main  # nbclient only when grading

    options = [f"--timeout={args.timeout}"]
    for flag in ("time_limit", "jobs", "csv", "feedback", "seed", "memory_limit"):
        value = getattr(args, flag)
        if value is not None:
            options.append(f"--{flag.replace('_', '-')}={value}")
    return grade_main([*args.notebooks, *options])


# ---------------------------------------------------------------------------------------------
# loralab demo


def _add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="see LoRA work in under a minute: adapt a pre-trained MLP to a shifted task",
        description=(
            "Adapt an MLP pre-trained on handwritten digits (shipped with loralab) to the same "
            "digits turned a quarter turn, with full fine-tuning, the output layer alone and LoRA "
            "at ranks 1, 4 and 8; print trainable parameters, peak memory, step time, accuracy "
            "and size on disk, and draw the learning curves."
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="adapters' initial values and batch order")
    p.add_argument(
        "--out",
        default="loralab-demo",
        metavar="DIR",
        help="folder for the adapters, weights and demo.png (default: ./loralab-demo)",
    )
    p.add_argument("--quick", action="store_true", help="a few seconds: fewer steps (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loralab import demo

    try:
        config = demo.DemoConfig(seed=args.seed, out=Path(args.out), quick=args.quick)
    except ValueError as e:  # argparse made the types right; a value can still be wrong
        raise UsageError(f"loralab demo: error: {e}") from None
    try:
        demo.run_demo(config, progress=not args.no_progress)
    except demo.DemoError as e:
        raise UsageError(f"loralab demo: error: {e}") from None
    return 0


# ---------------------------------------------------------------------------------------------
# loralab bench


def _add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from loralab.bench import DEFAULT_OUT

    p = subparsers.add_parser(
        "bench",
        help="run the benchmark suite and write its markdown table and figures",
        description=(
            "Measure, as ratios of two sides run alternately in one process: the autograd "
            "engine's overhead over hand-written NumPy and PyTorch eager, LoRA over full "
            "fine-tuning (time and peak memory, with the bounds from the shapes), merged and "
            "unmerged inference, and the fused LoRA backward over composed primitive ops."
        ),
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        metavar="FILE",
        help=f"markdown results; figures go next to it (default: {DEFAULT_OUT})",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (for tests)")
    p.add_argument("--repeats", type=int, metavar="N", help="paired repeats per ratio (default 21)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and data")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="BLAS and PyTorch threads (default: NumPy's current count; needs threadpoolctl)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or the process's CPU time (steadier on a busy machine with --threads 1)",
    )
    return p


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from loralab import bench

    _check_positive(args, "loralab bench", repeats="--repeats", threads="--threads")
    config = bench.BenchConfig.tiny() if args.quick else bench.BenchConfig()
    if args.repeats is not None:
        config = dataclasses.replace(config, repeats=args.repeats)
    config = dataclasses.replace(config, seed=args.seed, threads=args.threads, clock=args.clock)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(
            f"loralab bench: error: --out {str(out)!r} is a folder; give a file name such as "
            f"{str(out / 'results.md')!r}"
        )
    try:  # before any work: try a temporary file where the report will go
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise UsageError(
            f"loralab bench: error: cannot write to --out {str(out)!r}: {e.strerror or e}"
        ) from None
    try:
        bench.run_bench(config, out)
    except ValueError as e:
        raise UsageError(f"loralab bench: error: {e}") from None
    return 0


# ---------------------------------------------------------------------------------------------
# loralab ddp (the work is in loralab.torch.distributed, imported only when the command runs)


def _add_ddp_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ddp",
        help="data-parallel fine-tuning on torch.distributed: what LoRA saves in communication",
        description=(
            "Fine-tune a shipped model with LoRA and fully, data-parallel over N processes on "
            "this machine (DistributedDataParallel; gloo on CPU, NCCL on GPUs), and on one "
            "process on the whole batch; print the largest parameter difference between the two, "
            "the bytes all-reduced per step (LoRA and full, counted by a DDP communication hook), "
            "their ratio against trainable / total parameters, and the time per step."
        ),
    )
    p.add_argument("--nproc", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp", help="default: mlp")
    p.add_argument(
        "--full", action="store_true", help="compare full fine-tuning (not LoRA) with one process"
    )
    p.add_argument("--steps", type=int, default=5, help="Adam steps (default: 5)")
    p.add_argument("--batch", type=int, default=16, help="global batch (default: 16)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before the processes are stopped"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _run_ddp(args: argparse.Namespace) -> int:
    try:
        from loralab.torch import distributed
    except ImportError as e:
        raise UsageError(f"loralab ddp: error: {e}") from None
    try:
        return distributed.run_cli(args)
    except ValueError as e:
        raise UsageError(f"loralab ddp: error: {e}") from None
    except (distributed.RankError, distributed.DistributedTimeout) as e:
        print(f"loralab ddp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loralab ddp: interrupted; every process was stopped", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Registry: name -> (add parser, run).

SUBCOMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "params": (_add_params_parser, _run_params),
    "demo": (_add_demo_parser, _run_demo),
    "bench": (_add_bench_parser, _run_bench),
    "grade": (_add_grade_parser, _run_grade),
    "ddp": (_add_ddp_parser, _run_ddp),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``loralab`` argument parser with every subcommand in ``SUBCOMMANDS``."""
    parser = _Parser(prog="loralab", description="Learn LoRA (Low-Rank Adaptation) by building it.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser, run in SUBCOMMANDS.values():
        add_parser(subparsers).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``loralab`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.run(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except BrokenPipeError:  # `loralab params ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as e:  # --help exits through argparse
        return e.code if isinstance(e.code, int) else 0
