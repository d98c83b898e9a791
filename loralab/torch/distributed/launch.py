"""N processes on this machine: spawn, meet through a TCPStore on a free port, report failures."""

import dataclasses
import datetime
import json
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loralab._validate import positive_int, positive_number
from loralab.fileio import atomic_write
from loralab.torch.distributed.hook import BucketRecord
from loralab.torch.distributed.rank import RankResult, backend_for, device_for, train_rank
from loralab.torch.distributed.runs import RunConfig, build_model

__all__ = ["RankError", "DistributedTimeout", "DDPResult", "train_ddp", "HOST"]

HOST = "127.0.0.1"


class RankError(RuntimeError):
    """A rank of a distributed run failed; ``rank`` says which, the message carries its traceback."""

    def __init__(self, rank: int, world_size: int, detail: str):
        self.rank, self.world_size = rank, world_size
        super().__init__(f"rank {rank} of {world_size} failed: {detail}")


class DistributedTimeout(TimeoutError):
    """A distributed run did not finish in time; its processes were stopped."""


@dataclass
class DDPResult:
    """One run over N processes, as rank 0 saw it, checked against the other ranks.

    Attributes
    ----------
    run : RunConfig
    world_size : int
    params : dict of str to ndarray
        The trainable parameters after training (rank 0's), named as in the twin (``"0.lora_A"``).
    replica_diff : float
        Largest difference between any rank's parameters and rank 0's (DDP keeps them equal).
    buckets : list of list of BucketRecord
        Per step, the buckets DDP all-reduced.
    seconds_per_step : list of float
        Rank 0's wall time per step (forward, backward with all-reduce, Adam).
    losses : list of float
        Per step, the mean over ranks of each rank's shard loss (= the global batch's loss).
    backend, device : str
    """

    run: RunConfig
    world_size: int
    params: dict[str, np.ndarray]
    replica_diff: float
    buckets: list[list[BucketRecord]]
    seconds_per_step: list[float]
    losses: list[float]
    backend: str = "gloo"
    device: str = "cpu"

    @property
    def allreduce_bytes(self) -> list[int]:
        """Bytes handed to all-reduce at each step (the sum over that step's buckets)."""
        return [sum(bk.nbytes for bk in step) for step in self.buckets]

    @property
    def allreduce_bytes_per_step(self) -> int:
        """Bytes all-reduced per step; the same every step (a ValueError says so if not)."""
        counts = set(self.allreduce_bytes)
        if len(counts) != 1:
            raise ValueError(
                f"DDPResult: all-reduce bytes differ between steps: {self.allreduce_bytes}"
            )
        return counts.pop()

    def trained_model(self) -> torch.nn.Module:
        """The run's twin (on the CPU) holding the trained parameters: ready for `save_adapter`."""
        model = build_model(self.run)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.params:
                    p.copy_(torch.as_tensor(self.params[name]))
        return model

    def max_param_diff(self, other: dict[str, np.ndarray]) -> float:
        """Largest |difference| between these parameters and ``other`` (same names required)."""
        if set(other) != set(self.params):
            raise ValueError(
                f"max_param_diff: parameter names differ: {sorted(set(other) ^ set(self.params))}"
            )
        return max(float(np.max(np.abs(self.params[n] - other[n]))) for n in self.params)


def _save_rank(out: Path, index: int, rank: int, result: RankResult) -> None:
    from safetensors.numpy import save_file

    stem = out / f"run{index}-rank{rank}"
    atomic_write(f"{stem}.safetensors", lambda tmp: save_file(result.params, tmp))
    record = {
        "buckets": [[dataclasses.asdict(bk) for bk in step] for step in result.buckets],
        "seconds_per_step": result.seconds_per_step,
        "losses": result.losses,
    }
    atomic_write(f"{stem}.json", json.dumps(record))


def _load_rank(out: Path, index: int, rank: int) -> RankResult:
    from safetensors.numpy import load_file

    stem = out / f"run{index}-rank{rank}"
    record = json.loads(Path(f"{stem}.json").read_text())
    buckets = [[BucketRecord(**bk) for bk in step] for step in record["buckets"]]
    params = load_file(f"{stem}.safetensors")
    return RankResult(params, buckets, record["seconds_per_step"], record["losses"])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    runs: Sequence[RunConfig],
    out: str,
    device: Any,
    backend: str | None,
    timeout: float,
) -> None:
    """One spawned rank: join the group through the parent's TCPStore, train every run, save."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dev = device_for(device, rank)
    # The collectives' own timeout is longer than the parent's: the parent reports first.
    patience = datetime.timedelta(seconds=timeout + 60)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=patience)
    dist.init_process_group(
        backend_for(dev, backend), store=store, rank=rank, world_size=world_size, timeout=patience
    )
    try:
        for index, run in enumerate(runs):
            _save_rank(
                Path(out),
                index,
                rank,
                train_rank(run, rank=rank, world_size=world_size, device=dev),
            )
    except BaseException as exc:
        # When one rank fails, its peers fail next (their all-reduce loses its partner): the
        # time of each failure lets the parent report the first, which is the cause.
        failure = {"time": time.time(), "error": f"{type(exc).__name__}: {exc}"}
        failure["traceback"] = traceback.format_exc()
        atomic_write(Path(out) / f"failure-rank{rank}.json", json.dumps(failure))
        raise
    finally:
        dist.destroy_process_group()


def _first_failure(out: Path, nproc: int, fallback: RankError) -> RankError:
    """The rank that failed first, by the records `_worker` leaves; ``fallback`` when none did."""
    failures = {}
    for rank in range(nproc):
        path = out / f"failure-rank{rank}.json"
        if path.is_file():
            failures[rank] = json.loads(path.read_text())
    if not failures:
        return fallback
    rank = min(failures, key=lambda r: failures[r]["time"])
    detail = f"{failures[rank]['error']}\n{failures[rank]['traceback'].strip()}"
    later = [f"rank {r}: {f['error']}" for r, f in sorted(failures.items()) if r != rank]
    if later:
        detail += "\nthen, as a consequence:\n  " + "\n  ".join(later)
    return RankError(rank, nproc, detail)


def _stop(processes: Sequence[Any]) -> None:
    """Terminate, then kill, every process still alive, and reap them all."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _summary(trace: str) -> str:
    """The last line of a traceback (the exception), then the whole traceback."""
    lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
    return f"{lines[-1] if lines else 'unknown error'}\n{trace.strip()}"


def train_ddp(
    runs: Sequence[RunConfig],
    *,
    nproc: int = 2,
    timeout: float = 300.0,
    device: Any = None,
    backend: str | None = None,
) -> list[DDPResult]:
    """Train each run in ``runs`` data-parallel over ``nproc`` new processes on this machine.

    The processes are started once (``torch.multiprocessing``, start method "spawn") and train the
    runs one after the other in one process group. They meet through a ``TCPStore`` that this
    process opens on 127.0.0.1 with port 0 (the system picks a free one, so runs at the same time
    never collide) and hands to them.

    Parameters
    ----------
    runs : sequence of RunConfig
    nproc : int
        Number of ranks; must divide every run's ``global_batch``.
    timeout : float
        Seconds for the whole call, start-up included; then every process is stopped and
        `DistributedTimeout` raised.
    device : str or torch.device, optional
        "cpu" or "cuda" (rank i on GPU i mod count); None: CUDA when present.
    backend : str, optional
        None: NCCL on CUDA when available, else gloo.

    Returns
    -------
    list of DDPResult, one per run.

    Raises
    ------
    RankError
        When a rank raises or dies (the message names the rank and carries its traceback); the
        other ranks are stopped.
    DistributedTimeout
        When the run outlasts ``timeout``.
    """
    runs = list(runs)
    if not all(isinstance(r, RunConfig) for r in runs):
        raise TypeError(f"train_ddp: runs must be a sequence of RunConfig, got {runs!r}")
    if not runs:
        raise ValueError("train_ddp: runs is empty; give at least one RunConfig")
    nproc = positive_int("nproc", nproc, "train_ddp")
    timeout = positive_number("timeout", timeout, "train_ddp")
    for run in runs:
        if run.global_batch % nproc:
            raise ValueError(
                f"train_ddp: global_batch={run.global_batch} is not divisible by nproc={nproc}"
            )
    dev = device_for(device, 0)
    with tempfile.TemporaryDirectory(prefix="loralab-ddp-") as out:
        store = dist.TCPStore(
            HOST,
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout),
        )
        args = (nproc, store.port, runs, out, device, backend, float(timeout))
        ctx = mp.start_processes(_worker, args=args, nprocs=nproc, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.2, grace_period=1.0):
                if time.monotonic() > deadline:
                    running = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                    raise DistributedTimeout(
                        f"train_ddp: {nproc} processes did not finish within timeout={timeout} s "
                        f"(ranks still running: {running}); they were stopped. A rank that waits "
                        "in an all-reduce for a peer that never comes waits until then."
                    )
        except mp.ProcessRaisedException as e:
            _stop(ctx.processes)
            fallback = RankError(e.error_index, nproc, _summary(e.msg))
            raise _first_failure(Path(out), nproc, fallback) from None
        except mp.ProcessExitedException as e:
            _stop(ctx.processes)
            raise _first_failure(
                Path(out), nproc, RankError(e.error_index, nproc, str(e))
            ) from None
        finally:
            _stop(ctx.processes)
            del store
            for error_file in ctx.error_files:  # torch writes a failed rank's traceback there
                Path(error_file).unlink(missing_ok=True)  # and never removes it
        return [
            _gather(Path(out), i, run, nproc, backend_for(dev, backend), dev)
            for i, run in enumerate(runs)
        ]


def _gather(
    out: Path, index: int, run: RunConfig, nproc: int, backend: str, device: torch.device
) -> DDPResult:
    ranks = [_load_rank(out, index, rank) for rank in range(nproc)]
    first = ranks[0]
    replica_diff = max(
        (
            float(np.max(np.abs(r.params[n] - first.params[n])))
            for r in ranks[1:]
            for n in first.params
        ),
        default=0.0,
    )
    losses = np.mean([r.losses for r in ranks], axis=0).tolist()
    return DDPResult(
        run,
        nproc,
        first.params,
        replica_diff,
        first.buckets,
        first.seconds_per_step,
        losses,
        backend=backend,
        device=device.type,
    )
