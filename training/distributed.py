"""Data-parallel training: the same ``train`` in every process, launched by torchrun.

    torchrun --nproc_per_node 2 -m visionrpc.training.distributed pets \\
        --data DIR --repository DIR [the options of ``visionrpc train pets``]

Each process trains on its shard of the training set (a DistributedSampler) with the
gradients averaged by DistributedDataParallel: gloo on the CPU, nccl on GPUs, one GPU
per process. ``--bs`` is per process. Validation is sharded and gathered back in order,
so every process sees the same metrics; only the first prints and writes the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .cli import add_training_arguments, config_from_args
from .kinds import KINDS
from .train import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m visionrpc.training.distributed",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("kind", choices=tuple(KINDS))
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        parser.error("start it with torchrun, which tells each process its rank")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    else:
        # Processes on one machine share its cores; more threads than cores thrash.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(config_from_args(args))
        # The others wait while the first exports, so that all leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
