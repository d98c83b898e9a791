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

from loralab.torch.distributed.compare import compare, run_cli
from loralab.torch.distributed.hook import (
    BucketRecord,
    ByteCounter,
    counting_allreduce_hook,
    predicted_allreduce_bytes,
)
from loralab.torch.distributed.launch import DDPResult, DistributedTimeout, RankError, train_ddp
from loralab.torch.distributed.rank import RankResult, train_rank, train_single
from loralab.torch.distributed.runs import MODELS, RunConfig, build_model, global_batches

__all__ = [
    "MODELS",
    "RunConfig",
    "build_model",
    "global_batches",
    "BucketRecord",
    "ByteCounter",
    "counting_allreduce_hook",
    "predicted_allreduce_bytes",
    "RankResult",
    "train_rank",
    "train_single",
    "DDPResult",
    "RankError",
    "DistributedTimeout",
    "train_ddp",
    "compare",
    "run_cli",
]
