"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on 2 spawned CPU ranks over gloo, with both
snapshot stores: every rank snapshots, verifies and restores its own local shards, and the ranks
agree on every decision through the Governor's one all-reduce.

The harness is tests/spawned_group.py (spawn, a free port, a deadline per group, the 0.1 s sleep
after destroy_process_group); each rank reports what it saw to a JSON file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from spawned_group import free_port, join_rank, leave_group
from spawned_group import run_group as run_spawned
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

STORES = ("native", "reference")


# -- harness (tests/spawned_group.py) ---------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_rank(rank, world, port)
    results = {backend: fsdp_scenario(rank, world, backend) for backend in STORES}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    leave_group()


def run_group(world: int, tmp_path: Path) -> list[dict[str, Any]]:
    return run_spawned(_worker, (world, free_port(), str(tmp_path)), world, tmp_path, "FSDP2 group")


# -- the scenario (runs inside the ranks) ----------------------------------------------------
def _sharded(world: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """The same model on every rank, each layer and the root sharded with fully_shard. Uneven
    on purpose: ``4.weight`` (1 x 3) and ``4.bias`` (1) leave rank 1 an empty shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


BATCHES = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))


def _shards(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's local shards of every parameter and every optimizer moment, as raw bytes."""
    tensors = [p.to_local() for p in model.parameters()]  # type: ignore[operator]
    for param in model.parameters():
        for value in opt.state.get(param, {}).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value.to_local() if hasattr(value, "to_local") else value)
    return [t.detach().reshape(-1).view(torch.uint8).clone() for t in tensors]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def fsdp_scenario(rank: int, world: int, backend: str) -> dict[str, Any]:
    """Guarded FSDP2 training; a NaN written into rank 1's shard of ``0.weight``; the rollback;
    the step after it, beside an undisturbed twin run."""
    from tolaria import telemetry
    from tolaria.governor import TolariaGovernor
    from tolaria.snapshot import make_store
    from tolaria.telemetry import TelemetryEventType, TelemetryHub

    seen: list[telemetry.TelemetryEvent] = []
    telemetry.set_hub(TelemetryHub([telemetry.CallbackSink(seen.append)]))
    model, opt = _sharded(world)
    twin, twin_opt = _sharded(world)
    gov = TolariaGovernor(model, optimizer=opt, process_group="auto", snapshot_backend=backend)
    for x in BATCHES[:3]:
        for net, net_opt in ((model, opt), (twin, twin_opt)):
            net_opt.zero_grad()
            loss = _loss(net, x)
            loss.backward()
            if net is model:
                assert not gov.check_vital_signs(loss) and not gov.check_health()
            net_opt.step()
    started = time.perf_counter()
    committed = gov.snapshot().committed
    snapshot_s = time.perf_counter() - started
    lkg = gov.last_good_state
    assert lkg is not None
    lkg_shapes = {key: list(value.shape) for key, value in lkg.items()}
    pre_fault = _shards(model, opt)

    opt.zero_grad()  # one more step (the twin takes none), then the fault on rank 1 only
    _loss(model, BATCHES[3] * 10).backward()
    opt.step()
    if rank == 1:
        with torch.no_grad():
            model[0].weight.to_local()[1, 2] = math.nan  # type: ignore[operator]
    vetoed = gov.snapshot()  # a capture of the sick shard is committed nowhere
    panicked = gov.check_health()
    panic = gov.pending_panic
    started = time.perf_counter()
    report = gov.execute_rollback()
    rollback_s = time.perf_counter() - started
    restored = _same(_shards(model, opt), pre_fault)
    # Moments that no longer exist are rebuilt as DTensors around fresh local shards.
    opt.state.clear()
    again = gov.execute_rollback()
    rebuilt = _same(_shards(model, opt), pre_fault) and again.optimizer_state == "restored"
    rebuilt_types = sorted({type(v).__name__ for s in opt.state.values() for v in s.values()})

    for net, net_opt in ((model, opt), (twin, twin_opt)):  # the next step, on both runs
        net_opt.zero_grad()
        _loss(net, BATCHES[5]).backward()
        net_opt.step()
    from tolaria.health import check_tensors
    from tolaria.health.dispatch import triton_reads_cpu

    kernel_matches = None  # the fused kernel reads the same local shards as the reference
    if triton_reads_cpu():  # these ranks' shards are CPU tensors
        pairs = list(model.named_parameters()) + [(f"{n}.grad", p.grad) for n, p in model.named_parameters()]
        kernel = check_tensors(pairs, backend="triton")
        reference = check_tensors(pairs, backend="reference")
        kernel_matches = kernel.norms == pytest.approx(reference.norms, rel=1e-6) and kernel.healthy
    dtensor_error = ""
    try:
        make_store(backend).capture([("0.weight", model[0].weight)])
    except ValueError as error:
        dtensor_error = str(error)
    panics = [e.to_dict()["data"] for e in seen if e.event_type is TelemetryEventType.GOVERNOR_PANIC]
    return {
        "committed": committed, "vetoed": [vetoed.committed, vetoed.first_bad],
        "panicked": panicked, "reason": panic.reason if panic else None,
        "first_bad": panic.first_bad if panic else None, "fault_ranks": panics[-1]["fault_ranks"],
        "optimizer_state": report.optimizer_state, "restored_bit_exact": restored,
        "rebuilt_bit_exact": rebuilt, "rebuilt_types": rebuilt_types,
        "next_step_equals_undisturbed": _same(_shards(model, opt), _shards(twin, twin_opt)),
        "lkg_shapes": lkg_shapes,
        "lkg_has_moments": any(k.startswith("@optimizer/") for k in gov._store.keys),
        "dtensor_error": dtensor_error, "kernel_matches": kernel_matches,
        "snapshot_s": snapshot_s, "rollback_s": rollback_s,
    }  # fmt: skip


# -- the tests (run in pytest's process) -----------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_group(2, tmp_path_factory.mktemp("fsdp_two_ranks"))


@pytest.mark.parametrize("backend", STORES)
def test_a_nan_in_one_ranks_shard_is_caught_and_named_on_every_rank(
    backend: str, two_ranks: list[dict[str, Any]]
) -> None:
    for seen in (ranks[backend] for ranks in two_ranks):
        assert seen["committed"] is True and seen["panicked"] is True
        assert seen["reason"] == "governor_nonfinite_params"
        assert seen["first_bad"] == "0.weight"  # the full parameter name, on the healthy rank too
        assert seen["fault_ranks"] == [1]  # ... and the rank whose shard it was


@pytest.mark.parametrize("backend", STORES)
def test_every_shard_and_moment_comes_back_bit_exact_and_the_next_step_matches(
    backend: str, two_ranks: list[dict[str, Any]]
) -> None:
    for seen in (ranks[backend] for ranks in two_ranks):
        assert seen["optimizer_state"] == "restored" and seen["lkg_has_moments"] is True
        assert seen["restored_bit_exact"] is True
        assert seen["rebuilt_bit_exact"] is True and seen["rebuilt_types"] == ["DTensor", "Tensor"]
        assert seen["next_step_equals_undisturbed"] is True


@pytest.mark.parametrize("backend", STORES)
def test_a_sick_shard_vetoes_the_commit_on_both_ranks(backend: str, two_ranks: list[dict[str, Any]]) -> None:
    healthy, sick = (ranks[backend] for ranks in two_ranks)
    assert healthy["vetoed"] == [False, None] and sick["vetoed"] == [False, "0.weight"]


@pytest.mark.parametrize("backend", STORES)
def test_the_lkg_holds_each_ranks_local_shards_under_the_full_names(
    backend: str, two_ranks: list[dict[str, Any]]
) -> None:
    rank0, rank1 = (ranks[backend]["lkg_shapes"] for ranks in two_ranks)
    assert rank0["0.weight"] == [4, 4] and rank1["0.weight"] == [4, 4]  # 8 rows: 4 each
    assert rank0["2.weight"] == [2, 8] and rank1["2.weight"] == [1, 8]  # 3 rows: 2 and 1
    assert rank0["4.bias"] == [1] and rank1["4.bias"] == [0]  # 1 row: rank 1 holds none
    for ranks in two_ranks:
        assert "is a DTensor: snapshot its local shard (tensor.to_local())" in ranks[backend]["dtensor_error"]


def test_the_fused_kernel_reads_the_same_local_shards(two_ranks: list[dict[str, Any]]) -> None:
    from tolaria.health.dispatch import triton_health, triton_reads_cpu

    if triton_health() is None:
        pytest.skip("Triton is not importable here (CI has it, and fails this skip)")
    if not triton_reads_cpu():
        pytest.skip("the ranks' shards are CPU tensors, which Triton reads only under TRITON_INTERPRET=1")
    assert all(ranks[backend]["kernel_matches"] is True for ranks in two_ranks for backend in STORES)
