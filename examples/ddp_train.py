"""DDP training guarded by tolaria: every rank panics, rolls back and carries on together.

Launch with torchrun (CPU with gloo shown; on GPUs the NCCL backend is picked automatically):

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 60 --nan-step 25

Each rank trains a small regression model on its own data shard. At ``--nan-step`` rank 1 (the
last rank with one process) feeds a batch containing a NaN, so its loss is NaN: its Governor
sees the fault, the group agrees, and every rank restores its own Last Known Good before
anything is written by the optimizer. The run ends by checking that the replicas are still
identical and printing one summary line per rank.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tolaria import TolariaGovernor


def say(line: str) -> None:
    """Print ``line`` as one whole line: a single write that ends with the newline, then a flush.

    The ranks share one terminal or pipe. ``print`` writes the text and the newline separately,
    and with unbuffered output (``PYTHONUNBUFFERED``, ``python -u``) each is its own write, so
    another rank's line could land between them (``...True[rank 1] done: ...``).
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--nan-step", type=int, default=25, help="step of rank 1's NaN batch; -1: never")
    parser.add_argument("--snapshot-every", type=int, default=10, help="steps between snapshots (default 10)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a peer (default 60)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    # The group's timeout is the knob that bounds how long a rank waits for a dead or hung peer.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; the seed keeps runs repeatable
    model = DDP(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # process_group="auto": agree with the default group on every decision (a no-op without one).
    # Panics and rollbacks are logged by the default telemetry sink, naming the faulty rank(s).
    governor = TolariaGovernor(model, optimizer=optimizer, process_group="auto")

    shard = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    true_weights = torch.linspace(-1.0, 1.0, 8).unsqueeze(1)
    faulty_rank = min(1, world - 1)
    rollbacks, loss_value = 0, math.nan
    for step in range(args.steps):
        inputs = torch.randn(64, 8, generator=shard)
        targets = inputs @ true_weights
        if step == args.nan_step and rank == faulty_rank:
            inputs[0, 0] = math.nan  # a corrupt batch on one rank only
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(inputs), targets)
        # Every rank gets the same answer, so every rank skips backward together (DDP needs that).
        if governor.check_vital_signs(loss):
            governor.execute_rollback()
            rollbacks += 1
            continue
        loss.backward()
        if governor.check_health():  # non-finite weights/gradients, gradient explosions
            governor.execute_rollback()
            rollbacks += 1
            continue
        optimizer.step()
        loss_value = loss.item()
        if (step + 1) % args.snapshot_every == 0:
            governor.snapshot()  # committed on every rank or on none

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    in_sync = bool(torch.equal(flat, reference))
    say(
        f"[rank {rank}] done: final loss {loss_value:.4f}, rollbacks {rollbacks}, "
        f"replicas identical: {in_sync}"
    )
    dist.destroy_process_group()
    # A gloo worker thread drops its last collective's tensors just after the collective returns,
    # and that needs the GIL. If the interpreter is already shutting down by then, the process
    # aborts ("terminate called without an active exception": about one run in four with torch
    # 2.13 on CPU, with or without tolaria). Sleeping hands the GIL to those threads first.
    time.sleep(0.1)
    if not in_sync:
        raise SystemExit(f"rank {rank}: the replicas diverged")


if __name__ == "__main__":
    main()
