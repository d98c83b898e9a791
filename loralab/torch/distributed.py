"""Data-parallel fine-tuning of the twin on ``torch.distributed``, and what LoRA saves in communication.

Data parallelism keeps one replica of the model in each of N processes (*ranks*). Every step each
rank computes the gradient of its shard of the global batch; before the optimizer step the ranks
**all-reduce** (average) their gradients, so every replica takes the same step.
PyTorch's ``DistributedDataParallel`` (DDP) does that all-reduce bucket by bucket, for the
parameters that require a gradient and for no others. Full fine-tuning therefore sends the
gradient of every weight each step; LoRA sends r (d + k) numbers per adapted (d, k) matrix W0
(the gradients of A, of shape (r, k), and of B, of shape (d, r)).

This module runs it for real, with PyTorch's own engine:

- `RunConfig`: which shipped model (the digits MLP or the Genesis GPT), LoRA or full
  fine-tuning, how many Adam steps on which global batch;
- `train_ddp`: spawns N processes on 127.0.0.1 (gloo on CPU, NCCL on GPUs), each training on
  its shard of every global batch under DDP, and returns a `DDPResult` per run;
- `train_single`: the same run in this process on the whole batch, the reference that N
  processes must reproduce to round-off;
- `ByteCounter` / `counting_allreduce_hook`: a DDP communication hook that records every bucket
  DDP hands to all-reduce (its tensors and bytes), then all-reduces it as DDP's default hook does;
- `predicted_allreduce_bytes`: the same number from the parameters' shapes alone.

``loralab ddp`` (see `run_cli`) prints the comparison. Under ``torchrun`` the same `train_rank`
runs with the launcher's rendezvous::

    torchrun --nproc-per-node 2 -m loralab.torch.distributed --model gpt

Examples
--------
>>> run = RunConfig(model="mlp", steps=2)                     # doctest: +SKIP
>>> [ddp] = train_ddp([run], nproc=2)                         # doctest: +SKIP
>>> ddp.allreduce_bytes_per_step == predicted_allreduce_bytes(build_model(run))  # doctest: +SKIP
True
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
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
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from loralab.datasets import load_digits, shift_digits
from loralab.fileio import atomic_write
from loralab.models import get_batch, load_corpus, load_gpt
from loralab.models.digits import load_digits_mlp
from loralab.torch.convert import to_torch
from loralab.torch.inject import inject_lora

__all__ = [
    "MODELS",
    "RunConfig",
    "BucketRecord",
    "ByteCounter",
    "counting_allreduce_hook",
    "RankResult",
    "DDPResult",
    "RankError",
    "DistributedTimeout",
    "build_model",
    "global_batches",
    "predicted_allreduce_bytes",
    "train_rank",
    "train_single",
    "train_ddp",
    "compare",
    "run_cli",
]

#: The shipped models a run can fine-tune, and the task each is adapted to.
MODELS = {
    "mlp": "the digits MLP (64-256-256-10) on the digits turned a quarter turn; LoRA on every Linear",
    "gpt": "the Genesis GPT (2 blocks, d = 64) on The Devil's Dictionary; LoRA on q and v",
}
_LORA_TARGETS = {"mlp": ["0", "2", "4"], "gpt": ["q", "v"]}
_FAULTS = (None, "raise", "hang")
HOST = "127.0.0.1"


# ----- what to run ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: the same on one process and on N.

    Parameters
    ----------
    model : {"mlp", "gpt"}
        A shipped pre-trained model, see `MODELS`.
    full : bool
        Full fine-tuning (every parameter trains) instead of LoRA.
    r, alpha : int, float
        LoRA's rank and scale (ΔW = (alpha / r) B A); ignored when ``full``.
    steps : int
        Adam steps.
    global_batch : int
        Examples per step over all ranks (for the GPT: windows of ``context`` characters); each
        of N ranks takes a contiguous shard of ``global_batch / N``, so N must divide it.
    context : int
        Characters per window (GPT only).
    lr : float, optional
        Adam's learning rate; None: 1e-2 for LoRA, 1e-3 for full fine-tuning (which moves every
        weight, so takes smaller steps).
    seed : int
        The adapters' initial values and the batches (a ``numpy.random.Generator``).
    dtype : {"float64", "float32"}
        Float64 makes N processes agree with one to round-off.
    bucket_cap_mb : float
        DDP's bucket size in MB (its default is 25): smaller buckets, more all-reduce calls.
    fault : {None, "raise", "hang"}
        For the tests and the tutorial: make rank ``fault_rank`` raise, or hang, at its first
        step, to see how a failure is reported and how the timeout ends a hang.
    fault_rank : int
    """

    model: str = "mlp"
    full: bool = False
    r: int = 4
    alpha: float = 8.0
    steps: int = 5
    global_batch: int = 16
    context: int = 32
    lr: float | None = None
    seed: int = 0
    dtype: str = "float64"
    bucket_cap_mb: float = 25.0
    fault: str | None = None
    fault_rank: int = 1

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(
                f"RunConfig: model must be one of {sorted(MODELS)}, got {self.model!r}"
            )
        if not isinstance(self.full, bool):
            raise TypeError(f"RunConfig: full must be a bool, got {self.full!r}")
        for name in ("r", "steps", "global_batch", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RunConfig: {name} must be a positive integer, got {value!r}")
        for name in ("alpha", "lr", "bucket_cap_mb"):
            value = getattr(self, name)
            if value is None and name == "lr":
                continue
            if isinstance(value, bool) or not np.isfinite(value) or value <= 0:
                raise ValueError(
                    f"RunConfig: {name} must be a positive finite number, got {value!r}"
                )
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"RunConfig: dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if self.fault not in _FAULTS:
            raise ValueError(f"RunConfig: fault must be one of {_FAULTS}, got {self.fault!r}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default for the mode."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.full else 1e-2

    @property
    def mode(self) -> str:
        """``"full"`` or ``"lora"``."""
        return "full" if self.full else "lora"


def build_model(run: RunConfig) -> torch.nn.Module:
    """The twin that ``run`` trains, on the CPU: the pre-trained base, then LoRA or all trainable.

    LoRA: `loralab.torch.inject_lora` on the targets of `MODELS` with ``seed`` (B = 0, so the
    model starts equal to its base), every other parameter frozen. Full: every parameter trains.
    """
    base = load_digits_mlp()[0] if run.model == "mlp" else load_gpt()
    twin = to_torch(base, dtype=run.dtype)
    if run.full:
        for p in twin.parameters():
            p.requires_grad_(True)
    else:
        inject_lora(twin, _LORA_TARGETS[run.model], r=run.r, alpha=run.alpha, seed=run.seed)
    return twin


def global_batches(run: RunConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``run.steps`` global batches (x, y), the same in every process (drawn from ``seed``).

    MLP: x (global_batch, 64) rotated digits, y (global_batch,) labels. GPT: x and y
    (global_batch, context) character ids, y shifted by one.
    """
    rng = np.random.default_rng(run.seed)
    if run.model == "mlp":
        data = shift_digits(load_digits(dtype=run.dtype), "rotate90")
        picks = [rng.integers(0, len(data), size=run.global_batch) for _ in range(run.steps)]
        return [(data.x[i], data.y[i]) for i in picks]
    ids = load_corpus("devil").train
    return [get_batch(ids, run.global_batch, run.context, rng) for _ in range(run.steps)]


def predicted_allreduce_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient DDP all-reduces per step, from shapes: sum over trainable p of numel × itemsize.

    LoRA on a (d, k) matrix W0 contributes r (d + k) numbers; full fine-tuning every parameter.
    """
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ----- counting what DDP sends ---------------------------------------------------------------
@dataclass(frozen=True)
class BucketRecord:
    """One bucket handed to all-reduce: its index, its gradient tensors and its flat buffer's size."""

    index: int
    tensors: int
    numel: int
    nbytes: int


class ByteCounter:
    """State of `counting_allreduce_hook`: the buckets of every step, in the order DDP sent them.

    Call `start_step` before each backward pass; ``steps[i]`` lists step i's `BucketRecord` s.
    """

    def __init__(self, process_group: Any = None):
        self.process_group = process_group
        self.steps: list[list[BucketRecord]] = []

    def start_step(self) -> None:
        self.steps.append([])

    def record(self, bucket: Any) -> None:
        buffer = bucket.buffer()
        grads = bucket.gradients()
        nbytes = buffer.numel() * buffer.element_size()
        # The flat buffer is exactly the bucket's gradients, end to end: no padding is sent.
        assert nbytes == sum(g.numel() * g.element_size() for g in grads)
        self.steps[-1].append(BucketRecord(bucket.index(), len(grads), buffer.numel(), nbytes))


def counting_allreduce_hook(
    state: ByteCounter, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: record the bucket in ``state``, then average it across ranks.

    The averaging is DDP's own default (``allreduce_hook``: divide by N, all-reduce the sum), so
    training is unchanged. Register with ``ddp_model.register_comm_hook(ByteCounter(), this)``.
    """
    state.record(bucket)
    return default_hooks.allreduce_hook(state.process_group, bucket)


# ----- one rank's training -------------------------------------------------------------------
@dataclass
class RankResult:
    """What one process saw: its trainable parameters after training, buckets, times, losses."""

    params: dict[str, np.ndarray]
    buckets: list[list[BucketRecord]]
    seconds_per_step: list[float]
    losses: list[float]


def _loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Through the (DDP) wrapper's forward, so that DDP prepares its backward hooks.
    logits = net(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _fault(run: RunConfig, rank: int) -> None:
    if run.fault is None or rank != run.fault_rank:
        return
    if run.fault == "raise":
        raise RuntimeError(f"fault injected in rank {rank} (RunConfig.fault='raise')")
    time.sleep(10**6)  # "hang": the parent's timeout ends it


def _device(device: Any, rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


def train_rank(
    run: RunConfig, *, rank: int = 0, world_size: int = 1, device: Any = "cpu"
) -> RankResult:
    """Train ``run`` as rank ``rank`` of ``world_size`` on its shard of every global batch.

    Inside an initialised process group the model is wrapped in DDP with
    `counting_allreduce_hook` (the twins hold no buffers, so the gradients are the only traffic
    per step); without one
    (``world_size == 1``) it is the plain single-process loop. Same model, batches and Adam.

    Parameters
    ----------
    run : RunConfig
    rank, world_size : int
        This process's shard is rows ``rank * b`` to ``(rank + 1) * b`` of each global batch,
        ``b = global_batch / world_size``.
    device : str or torch.device, optional
        ``"cuda"`` uses GPU ``rank % device_count``; None picks CUDA when present.
    """
    if run.global_batch % world_size:
        raise ValueError(
            f"train_rank: global_batch={run.global_batch} is not divisible by world_size={world_size}"
        )
    device = _device(device, rank)
    model = build_model(run).to(device)
    net, counter = model, None
    if dist.is_available() and dist.is_initialized():
        counter = ByteCounter()
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=run.bucket_cap_mb,
        )
        net.register_comm_hook(counter, counting_allreduce_hook)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=run.learning_rate)
    b = run.global_batch // world_size
    seconds, losses = [], []
    for x, y in global_batches(run):
        x, y = (torch.as_tensor(a[rank * b : (rank + 1) * b], device=device) for a in (x, y))
        _fault(run, rank)
        start = time.perf_counter()
        if counter is not None:
            counter.start_step()
        loss = _loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients, bucket by bucket, during the backward
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    params = {
        n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad
    }
    return RankResult(params, counter.steps if counter else [], seconds, losses)


# ----- N processes ---------------------------------------------------------------------------
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


def _backend(device: torch.device, backend: str | None) -> str:
    if backend is not None:
        return backend
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


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
    dev = _device(device, rank)
    # The collectives' own timeout is longer than the parent's: the parent reports first.
    patience = datetime.timedelta(seconds=timeout + 60)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=patience)
    dist.init_process_group(
        _backend(dev, backend), store=store, rank=rank, world_size=world_size, timeout=patience
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
    if not runs or not all(isinstance(r, RunConfig) for r in runs):
        raise TypeError(f"train_ddp: runs must be a non-empty sequence of RunConfig, got {runs!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"train_ddp: nproc must be a positive integer, got {nproc!r}")
    for run in runs:
        if run.global_batch % nproc:
            raise ValueError(
                f"train_ddp: global_batch={run.global_batch} is not divisible by nproc={nproc}"
            )
    if not (isinstance(timeout, (int, float)) and np.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"train_ddp: timeout must be a positive number of seconds, got {timeout!r}"
        )
    dev = _device(device, 0)
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
        return [
            _gather(Path(out), i, run, nproc, _backend(dev, backend), dev)
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


def train_single(run: RunConfig, *, device: Any = "cpu") -> RankResult:
    """The reference: ``run`` in this process on the whole global batch (no process group)."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("train_single: a process group is initialised here; run it outside one")
    return train_rank(run, rank=0, world_size=1, device=device)


# ----- the comparison the CLI prints ---------------------------------------------------------
def compare(
    model: str = "mlp",
    *,
    full: bool = False,
    nproc: int = 2,
    steps: int = 5,
    global_batch: int = 16,
    timeout: float = 300.0,
    device: Any = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Run LoRA and full fine-tuning of ``model`` on ``nproc`` processes and on one; compare.

    Returns
    -------
    dict
        ``max_param_diff_vs_single`` (of the LoRA run, or of the full run when ``full``),
        ``allreduce_bytes_per_step_lora`` / ``_full`` (measured by the hook),
        ``predicted_bytes_lora`` / ``_full`` (from shapes), ``trainable_params`` (LoRA's),
        ``total_params`` (the base model's: what full fine-tuning trains), the measured and
        predicted ratios, ``seconds_per_step_lora`` / ``_full`` (medians on rank 0), the bucket
        layout of each and the run's settings.
    """
    runs = {
        mode: RunConfig(
            model=model, full=mode == "full", steps=steps, global_batch=global_batch, seed=seed
        )
        for mode in ("lora", "full")
    }
    results = dict(
        zip(runs, train_ddp(list(runs.values()), nproc=nproc, timeout=timeout, device=device))
    )
    chosen = runs["full" if full else "lora"]
    single = train_single(chosen, device=device)
    lora_model, full_model = build_model(runs["lora"]), build_model(runs["full"])
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in full_model.parameters())
    lora_bytes = results["lora"].allreduce_bytes_per_step
    full_bytes = results["full"].allreduce_bytes_per_step
    return {
        "model": model,
        "mode": chosen.mode,
        "nproc": nproc,
        "steps": steps,
        "global_batch": global_batch,
        "dtype": chosen.dtype,
        "backend": results["lora"].backend,
        "device": results["lora"].device,
        "max_param_diff_vs_single": results[chosen.mode].max_param_diff(single.params),
        "max_replica_diff": max(r.replica_diff for r in results.values()),
        "allreduce_bytes_per_step_lora": lora_bytes,
        "allreduce_bytes_per_step_full": full_bytes,
        "predicted_bytes_lora": predicted_allreduce_bytes(lora_model),
        "predicted_bytes_full": predicted_allreduce_bytes(full_model),
        "trainable_params": trainable,
        "total_params": total,
        "allreduce_ratio": lora_bytes / full_bytes,
        "predicted_ratio": trainable / total,
        "buckets_lora": [bk.tensors for bk in results["lora"].buckets[-1]],
        "buckets_full": [bk.tensors for bk in results["full"].buckets[-1]],
        "seconds_per_step_lora": statistics.median(results["lora"].seconds_per_step),
        "seconds_per_step_full": statistics.median(results["full"].seconds_per_step),
    }


def _print_comparison(c: dict[str, Any]) -> None:
    mode = "full fine-tuning" if c["mode"] == "full" else "LoRA"
    print(
        f"loralab ddp: {c['model']} ({MODELS[c['model']]})\n"
        f"  {c['nproc']} processes ({c['backend']} on {c['device']}), {c['steps']} Adam steps, "
        f"global batch {c['global_batch']} ({c['global_batch'] // c['nproc']} per rank), {c['dtype']}"
    )
    print(
        f"  {mode}: largest parameter difference from one process on the whole batch: "
        f"{c['max_param_diff_vs_single']:.3g}"
    )
    for label, key in (("LoRA", "lora"), ("full", "full")):
        tensors = c[f"buckets_{key}"]
        print(
            f"  bytes all-reduced per step, {label:<4}: {c[f'allreduce_bytes_per_step_{key}']:>12,} "
            f"(predicted from shapes {c[f'predicted_bytes_{key}']:,}; {len(tensors)} bucket(s) "
            f"of {' + '.join(map(str, tensors))} tensors)"
        )
    print(
        f"  ratio LoRA / full: {c['allreduce_ratio']:.4f}; predicted trainable / total = "
        f"{c['trainable_params']:,} / {c['total_params']:,} = {c['predicted_ratio']:.4f}"
    )
    print(
        f"  time per step (median, rank 0): LoRA {1e3 * c['seconds_per_step_lora']:.1f} ms, "
        f"full {1e3 * c['seconds_per_step_full']:.1f} ms"
    )


def run_cli(args: argparse.Namespace) -> int:
    """``loralab ddp``: the work behind the parser that ``loralab.cli`` declares."""
    result = compare(
        args.model,
        full=args.full,
        nproc=args.nproc,
        steps=args.steps,
        global_batch=args.batch,
        timeout=args.timeout,
        device=None if args.device == "auto" else args.device,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_comparison(result)
    return 0


# ----- under torchrun ------------------------------------------------------------------------
def _torchrun_main(argv: Sequence[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m loralab.torch.distributed``: one rank of a LoRA or full run."""
    parser = argparse.ArgumentParser(prog="python -m loralab.torch.distributed")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error(
            "run me under torchrun (RANK and WORLD_SIZE are not set); or use `loralab ddp`"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(None, int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(_backend(device, None))
    try:
        run = RunConfig(model=args.model, full=args.full, steps=args.steps, global_batch=args.batch)
        result = train_rank(run, rank=rank, world_size=world_size, device=device)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        sent = [sum(bk.nbytes for bk in step) for step in result.buckets]
        print(
            json.dumps(
                {
                    "allreduce_bytes": sent,
                    "predicted": predicted_allreduce_bytes(build_model(run)),
                    "losses": result.losses,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun_main())
