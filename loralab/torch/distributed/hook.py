"""Counting what DDP sends: a communication hook beside the count from the parameters' shapes."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["BucketRecord", "ByteCounter", "counting_allreduce_hook", "predicted_allreduce_bytes"]


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
        """Open the list of the next step's buckets (call before each backward pass)."""
        self.steps.append([])

    def record(self, bucket: Any) -> None:
        """Append a `BucketRecord` of ``bucket`` (a ``dist.GradBucket``) to the current step."""
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


def predicted_allreduce_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient DDP all-reduces per step, from shapes: sum over trainable p of numel × itemsize.

    LoRA on a (d, k) matrix W0 contributes r (d + k) numbers; full fine-tuning every parameter.
    """
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
