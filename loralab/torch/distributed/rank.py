"""One rank's training: the same loop on one process (the reference) and under DDP on N."""

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from loralab._validate import non_negative_int, positive_int
from loralab.torch.distributed.hook import BucketRecord, ByteCounter, counting_allreduce_hook
from loralab.torch.distributed.runs import RunConfig, build_model, global_batches

__all__ = ["RankResult", "train_rank", "train_single", "device_for", "backend_for"]


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


def device_for(device: Any, rank: int) -> torch.device:
    """The torch device of ``rank``: "cuda" is GPU ``rank % device_count``; None: CUDA if present."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available here; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


def backend_for(device: torch.device, backend: str | None) -> str:
    """``backend``, or NCCL on CUDA when available, else gloo."""
    if backend is not None:
        return backend
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def train_rank(
    run: RunConfig, *, rank: int = 0, world_size: int = 1, device: Any = "cpu"
) -> RankResult:
    """Train ``run`` as rank ``rank`` of ``world_size`` on its shard of every global batch.

    Inside an initialised process group the model is wrapped in DDP with
    `counting_allreduce_hook` (the twins hold no buffers, so the gradients are the only traffic
    per step); without one (``world_size == 1``) it is the plain single-process loop. Same
    model, batches and Adam either way.

    Parameters
    ----------
    run : RunConfig
    rank, world_size : int
        This process's shard is rows ``rank * b`` to ``(rank + 1) * b`` of each global batch,
        ``b = global_batch / world_size``.
    device : str or torch.device, optional
        ``"cuda"`` uses GPU ``rank % device_count``; None picks CUDA when present.
    """
    world_size = positive_int("world_size", world_size, "train_rank")
    rank = non_negative_int("rank", rank, "train_rank")
    if rank >= world_size:
        raise ValueError(f"train_rank: rank={rank} is not below world_size={world_size}")
    if run.global_batch % world_size:
        raise ValueError(
            f"train_rank: global_batch={run.global_batch} is not divisible by world_size={world_size}"
        )
    device = device_for(device, rank)
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


def train_single(run: RunConfig, *, device: Any = "cpu") -> RankResult:
    """The reference: ``run`` in this process on the whole global batch (no process group)."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("train_single: a process group is initialised here; run it outside one")
    return train_rank(run, rank=0, world_size=1, device=device)
