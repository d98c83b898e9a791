"""``torchrun --nproc-per-node N -m loralab.torch.distributed``: one rank of a LoRA or full run."""

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch.distributed as dist

from loralab.torch.distributed.hook import predicted_allreduce_bytes
from loralab.torch.distributed.rank import backend_for, device_for, train_rank
from loralab.torch.distributed.runs import MODELS, RunConfig, build_model


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
    device = device_for(None, int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend_for(device, None))
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
