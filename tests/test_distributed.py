"""Every rank agrees: real process groups (gloo on CPU) of 2 and 3 ranks spawned from pytest.

Spawning is slow, so one group runs several scenarios in a row; each scenario builds its own
model and Governor, and each rank reports what it saw to a JSON file that the test compares
across ranks. Every group has a deadline (a hung rank fails the test instead of hanging CI),
and each test uses a free port. In-process tests of the decision logic:
test_distributed_consensus.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from restore_hook import RestoreHook
from spawned_group import GROUP_DEADLINE_S, free_port, join_rank, leave_group
from spawned_group import run_group as run_spawned
from torch import nn

from tolaria import telemetry
from tolaria.distributed import DistributedGovernorError
from tolaria.governor import TolariaGovernor
from tolaria.telemetry import TelemetryEvent, TelemetryEventType, TelemetryHub

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

#: Timeout of the dedicated group in the hang scenario: how long a rank waits for a hung peer.
HANG_TIMEOUT_S = 3.0

Scenario = Callable[[int, int, dict[str, Any]], dict[str, Any]]


# -- harness ---------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str, scenario_names: list[str], shared: Any) -> None:
    join_rank(rank, world, port)
    results: dict[str, Any] = {}
    for name in scenario_names:
        results[name] = SCENARIOS[name](rank, world, {"shared": shared})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    leave_group()  # the hang scenario leaves its dedicated group broken; the default group still works


def run_group(world: int, scenario_names: list[str], tmp_path: Path) -> list[dict[str, Any]]:
    """Run the scenarios on ``world`` spawned ranks; return each rank's results. Fails the test
    when a rank raises (with its traceback) or when the group misses its deadline."""
    shared = mp.get_context("spawn").Event()
    return run_spawned(_worker, (world, free_port(), str(tmp_path), scenario_names, shared), world, tmp_path)


# -- what every scenario uses ----------------------------------------------------------------
def _replica() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """The same model and optimizer on every rank (same seed), as DDP would make them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), RestoreHook())
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """Identical steps on identical data: the replicas stay equal without DDP."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        opt.step()


def _flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _flat_lkg(gov: TolariaGovernor) -> list[float]:
    lkg = gov.last_good_state
    assert lkg is not None
    return torch.cat([lkg[name].reshape(-1) for name, _ in gov.model.named_parameters()]).tolist()


class _Events:
    """The telemetry one rank emits during a scenario."""

    def __init__(self) -> None:
        self.seen: list[TelemetryEvent] = []
        telemetry.set_hub(TelemetryHub([telemetry.CallbackSink(self.seen.append)]))

    def of(self, kind: TelemetryEventType) -> list[dict[str, Any]]:
        return [e.to_dict()["data"] for e in self.seen if e.event_type is kind]


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan  # type: ignore[index]


# -- scenarios (run inside the ranks) --------------------------------------------------------
def nan_params_on_rank_1(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """NaN weights on rank 1 only: every rank panics with the same reason and rolls back."""
    model, opt = _replica()
    events = _Events()
    gov = TolariaGovernor(model, optimizer=opt, process_group="auto")
    _train(model, opt, 3)
    assert gov.snapshot().committed
    lkg = _flat_lkg(gov)
    _train(model, opt, 2)
    if rank == 1:
        _poison(model)
    panicked = gov.check_health()
    report = gov.execute_rollback()
    (panic,) = events.of(TelemetryEventType.GOVERNOR_PANIC)
    (rollback,) = events.of(TelemetryEventType.GOVERNOR_ROLLBACK)
    return {
        "panicked": panicked, "reason": report.panic_reason, "panic_fault_ranks": panic["fault_ranks"],
        "rollback_fault_ranks": rollback["fault_ranks"], "rollback_rank": rollback["rank"],
        "params": _flat(model), "lkg": lkg, "optimizer_state": report.optimizer_state,
    }  # fmt: skip


def sick_shard_vetoes_the_commit(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """A snapshot taken while rank ``world - 1`` holds NaN weights is committed nowhere."""
    model, opt = _replica()
    events = _Events()
    gov = TolariaGovernor(model, optimizer=opt, process_group="auto")
    before = _flat_lkg(gov)
    _train(model, opt, 2)
    if rank == world - 1:
        _poison(model)
    info = gov.snapshot()
    kept = _flat_lkg(gov)
    gov.execute_rollback()
    restored = _flat(model)
    _train(model, opt, 1)
    healthy = gov.snapshot()  # the same ranks agree to commit once every shard is healthy
    snapshots = events.of(TelemetryEventType.GOVERNOR_SNAPSHOT)
    return {
        "committed": info.committed, "first_bad": info.first_bad, "lkg_before": before, "lkg_kept": kept,
        "restored": restored, "vetoed_by": snapshots[1]["fault_ranks"],
        "alerts": len(events.of(TelemetryEventType.HEALTH_ALERT)), "healthy_committed": healthy.committed,
        "lkg_after": _flat_lkg(gov), "params_after": _flat(model),
    }  # fmt: skip


def divergence_on_rank_1(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Rank 1's loss diverges (3 anomalies in a row) while the others stay calm."""
    model, _ = _replica()
    gov = TolariaGovernor(model, process_group="auto")
    calm = [1.0 + 0.01 * i for i in range(10)]
    verdicts = [gov.check_vital_signs(loss) for loss in calm]
    for _ in range(3):
        verdicts.append(gov.check_vital_signs(100.0 if rank == 1 else 1.05))
    history = list(gov.loss_history)
    report = gov.execute_rollback()
    return {
        "verdicts": verdicts, "reason": report.panic_reason, "loss_at_panic": report.loss_at_panic,
        "history": history, "consecutive_after": gov.consecutive_panics,
    }  # fmt: skip


def most_severe_reason_wins(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 has NaN gradients, rank 1 NaN weights: everyone reports the weights."""
    model, opt = _replica()
    gov = TolariaGovernor(model, optimizer=opt, process_group="auto")
    events = _Events()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if rank == 0:
        model[2].bias.grad[0] = math.nan  # type: ignore[index]
    if rank == 1:
        _poison(model)
    panicked = gov.check_health()
    (panic,) = events.of(TelemetryEventType.GOVERNOR_PANIC)
    report = gov.execute_rollback()
    return {"panicked": panicked, "reason": report.panic_reason, "fault_ranks": panic["fault_ranks"]}


def a_failed_rollback_raises_everywhere(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Rank 1's restore raises: rank 1 re-raises its error, every other rank raises
    DistributedGovernorError naming rank 1; the LKG survives, so a retry succeeds."""
    model, opt = _replica()
    gov = TolariaGovernor(model, optimizer=opt, process_group="auto")
    lkg = _flat_lkg(gov)
    _train(model, opt, 2)
    if rank == 1:

        def broken() -> None:
            raise OSError("simulated restore failure")

        model[3].on_restore = broken
    try:
        gov.execute_rollback()
        error = ("none", "", [])
    except DistributedGovernorError as exc:
        error = ("DistributedGovernorError", str(exc), list(exc.ranks))
    except OSError as exc:
        error = ("OSError", str(exc), [])
    model[3].on_restore = None
    retried = gov.execute_rollback()
    return {"error": error, "retried": retried.rollback_occurred, "params": _flat(model), "lkg": lkg}


def a_raising_check_does_not_hang_its_peers(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """A rank whose check raises (a bad loss) still takes part; its peers raise too."""
    model, _ = _replica()
    gov = TolariaGovernor(model, process_group="auto")
    try:
        gov.check_vital_signs("oops" if rank == 1 else 1.0)
        return {"error": "none"}
    except DistributedGovernorError as exc:
        return {"error": "DistributedGovernorError", "ranks": list(exc.ranks)}
    except TypeError:
        return {"error": "TypeError"}


def a_hung_rank_surfaces_as_an_error(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Rank 1 hangs inside its rollback; rank 0 gets DistributedGovernorError once the
    dedicated group's timeout expires, instead of waiting forever. Runs last: the dedicated
    group is unusable afterwards."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=HANG_TIMEOUT_S))
    model, opt = _replica()
    dist.barrier()  # start together: the short timeout must only ever catch the simulated hang
    gov = TolariaGovernor(model, optimizer=opt, process_group=group)
    released = ctx["shared"]
    if rank == 1:
        model[3].on_restore = lambda: released.wait(timeout=60)  # "hung" until rank 0 gives up
    try:
        gov.execute_rollback()
        outcome = "no error"
    except DistributedGovernorError as exc:
        outcome = str(exc)
    finally:
        released.set()
    return {"outcome": outcome}


def ddp_end_to_end(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """A DDP-wrapped model trains on per-rank shards; rank 1 sees a NaN batch once (NaN loss)
    and later NaN gradients once; every rank rolls back together and training goes on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    events = _Events()
    gov = TolariaGovernor(model, optimizer=opt, process_group="auto")
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
    target = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    losses, rollbacks_match_lkg = [], []
    for step in range(30):
        x = torch.randn(32, 4, generator=gen)
        y = x @ target
        if rank == 1 and step == 12:
            x[0, 0] = math.nan
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if gov.check_vital_signs(loss):
            lkg = _flat_lkg(gov)
            gov.execute_rollback()
            rollbacks_match_lkg.append(_flat(model) == lkg)
            continue
        loss.backward()
        if rank == 1 and step == 20:
            model.module[0].weight.grad[0, 0] = math.inf
        if gov.check_health():
            lkg = _flat_lkg(gov)
            gov.execute_rollback()
            rollbacks_match_lkg.append(_flat(model) == lkg)
            continue
        opt.step()
        losses.append(loss.item())
        if step % 5 == 4:
            assert gov.snapshot().committed
    rollbacks = events.of(TelemetryEventType.GOVERNOR_ROLLBACK)
    return {
        "first_loss": losses[0], "last_loss": losses[-1], "params": _flat(model),
        "rollbacks": [(r["reason"], r["fault_ranks"]) for r in rollbacks],
        "rollbacks_match_lkg": rollbacks_match_lkg,
    }  # fmt: skip


SCENARIOS: dict[str, Scenario] = {
    f.__name__: f
    for f in (
        nan_params_on_rank_1, sick_shard_vetoes_the_commit, divergence_on_rank_1, most_severe_reason_wins,
        a_failed_rollback_raises_everywhere, a_raising_check_does_not_hang_its_peers,
        a_hung_rank_surfaces_as_an_error, ddp_end_to_end,
    )
}  # fmt: skip


# -- the tests (run in pytest's process) -----------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    names = [
        "nan_params_on_rank_1", "sick_shard_vetoes_the_commit", "divergence_on_rank_1",
        "most_severe_reason_wins", "a_failed_rollback_raises_everywhere",
        "a_raising_check_does_not_hang_its_peers", "a_hung_rank_surfaces_as_an_error",
    ]  # fmt: skip
    return run_group(2, names, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    names = ["nan_params_on_rank_1", "sick_shard_vetoes_the_commit", "ddp_end_to_end"]
    return run_group(3, names, tmp_path_factory.mktemp("three_ranks"))


def _all(ranks: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    return [r[scenario] for r in ranks]


@pytest.mark.parametrize("world", [2, 3])
def test_nan_on_rank_1_rolls_every_rank_back_to_the_same_lkg(
    world: int, two_ranks: list[dict[str, Any]], three_ranks: list[dict[str, Any]]
) -> None:
    results = _all(two_ranks if world == 2 else three_ranks, "nan_params_on_rank_1")
    for rank, seen in enumerate(results):
        assert seen["panicked"] is True and seen["reason"] == "governor_nonfinite_params"
        assert seen["panic_fault_ranks"] == [1] and seen["rollback_fault_ranks"] == [1]
        assert seen["rollback_rank"] == rank and seen["optimizer_state"] == "restored"
        assert seen["params"] == seen["lkg"]
    assert all(seen["params"] == results[0]["params"] for seen in results)


@pytest.mark.parametrize("world", [2, 3])
def test_a_sick_shard_on_one_rank_vetoes_the_commit_everywhere(
    world: int, two_ranks: list[dict[str, Any]], three_ranks: list[dict[str, Any]]
) -> None:
    results = _all(two_ranks if world == 2 else three_ranks, "sick_shard_vetoes_the_commit")
    sick = world - 1
    for rank, seen in enumerate(results):
        assert seen["committed"] is False and seen["vetoed_by"] == [sick]
        assert seen["first_bad"] == ("0.weight" if rank == sick else None)
        assert seen["alerts"] == (1 if rank == sick else 0)  # only the sick rank has sick tensors
        assert seen["lkg_kept"] == seen["lkg_before"] == seen["restored"]
        assert seen["healthy_committed"] is True and seen["lkg_after"] == seen["params_after"]
    assert all(seen["lkg_after"] == results[0]["lkg_after"] for seen in results)


def test_divergence_seen_by_one_rank_panics_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    calm_rank, diverging = _all(two_ranks, "divergence_on_rank_1")
    for seen in (calm_rank, diverging):
        assert seen["verdicts"] == [False] * 12 + [True]
        assert seen["reason"] == "governor_divergence" and seen["consecutive_after"] == 0
    assert diverging["loss_at_panic"] == 100.0 and math.isnan(calm_rank["loss_at_panic"])
    # The calm rank kept its two calm samples but withdrew the one from the step that panicked.
    assert calm_rank["history"] == [1.0 + 0.01 * i for i in range(10)] + [1.05, 1.05]
    assert diverging["history"] == [1.0 + 0.01 * i for i in range(10)]


def test_the_most_severe_reason_is_reported_by_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    for seen in _all(two_ranks, "most_severe_reason_wins"):
        assert seen == {"panicked": True, "reason": "governor_nonfinite_params", "fault_ranks": [0, 1]}


def test_a_rollback_that_fails_on_one_rank_raises_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    healthy, failing = _all(two_ranks, "a_failed_rollback_raises_everywhere")
    kind, message, ranks = healthy["error"]
    assert kind == "DistributedGovernorError" and ranks == [1]
    assert "rollback failed on rank(s) [1]" in message
    assert failing["error"][:2] == ["OSError", "simulated restore failure"]
    for seen in (healthy, failing):
        assert seen["retried"] is True and seen["params"] == seen["lkg"]


def test_a_rank_that_raises_in_a_check_makes_its_peers_raise(two_ranks: list[dict[str, Any]]) -> None:
    calm, raising = _all(two_ranks, "a_raising_check_does_not_hang_its_peers")
    assert raising == {"error": "TypeError"}
    assert calm == {"error": "DistributedGovernorError", "ranks": [1]}


def test_a_rank_hung_in_its_rollback_surfaces_as_an_error_not_a_hang(two_ranks: list[dict[str, Any]]) -> None:
    waiting, _hung = _all(two_ranks, "a_hung_rank_surfaces_as_an_error")
    assert "could not agree on a rollback" in waiting["outcome"]
    assert "process group's timeout" in waiting["outcome"]


def test_ddp_training_rolls_back_together_and_keeps_learning(three_ranks: list[dict[str, Any]]) -> None:
    results = _all(three_ranks, "ddp_end_to_end")
    for seen in results:
        assert seen["rollbacks"] == [["governor_nan", [1]], ["governor_nonfinite_grads", [1]]]
        assert seen["rollbacks_match_lkg"] == [True, True]
        assert math.isfinite(seen["last_loss"]) and seen["last_loss"] < seen["first_loss"]
    assert all(seen["params"] == results[0]["params"] for seen in results)


@pytest.mark.slow
def test_the_readme_ddp_example_runs_under_torchrun() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(example), "--steps", "30", "--nan-step", "12", "--snapshot-every", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=GROUP_DEADLINE_S, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for rank in (0, 1):
        assert f"[rank {rank}] done:" in output and "rollbacks 1, replicas identical: True" in output
    assert "governor_nan, seen by rank(s) [1]" in output
