"""The harness of the multi-rank tests (test_distributed.py, test_fsdp.py): gloo groups of
ranks spawned from pytest on a free port, each with a deadline (a hung rank fails the test
instead of hanging CI), each rank writing what it saw to ``rank<N>.json``."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Deadline of one spawned group, start-up included (a healthy run needs a fraction of it).
GROUP_DEADLINE_S = 150.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def join_rank(rank: int, world: int, port: int) -> None:
    """Inside a spawned rank: one thread (a 2-core machine runs every rank at once), then the group."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip


def leave_group() -> None:
    """Inside a spawned rank, at the end: a last barrier, then destroy the group and sleep 0.1 s
    so gloo's threads drop their tensors before exit (see examples/ddp_train.py)."""
    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.1)


def run_group(
    worker: Callable[..., None], args: tuple[Any, ...], world: int, tmp_path: Path, what: str = "group"
) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks of ``worker(rank, *args)`` and return each rank's JSON results.
    Fails the test when a rank raises (with its traceback) or the group misses its deadline."""
    procs = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_DEADLINE_S
    try:
        while not procs.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank {what} missed its {GROUP_DEADLINE_S:.0f} s deadline")
    finally:
        for process in procs.processes:
            if process.is_alive():
                process.kill()
    return [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]
