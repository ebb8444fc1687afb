"""Rank consensus without spawning processes: reason priority, the decision logic against
scripted peers, the stores' two-phase resolve, and "no group, no collective".

The real multi-process behaviour (gloo, 2 and 3 ranks, DDP) is in test_distributed.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tolaria import _ext, distributed, rank_codes, telemetry
from tolaria.distributed import (
    CODE_RANK_ERROR,
    REASON_PRIORITY,
    DistributedGovernorError,
    LocalDecisions,
    RankConsensus,
    make_decisions,
    reason_code,
    reason_of,
    resolve_process_group,
)
from tolaria.governor import TolariaGovernor
from tolaria.snapshot import make_store
from tolaria.snapshot.store import SnapshotStore
from tolaria.telemetry import TelemetryEvent, TelemetryEventType, TelemetryHub
from tolaria.watch import Watch

STORE_BACKENDS = ["reference"] + (["native"] if _ext.extension() is not None else [])


class ScriptedConsensus(RankConsensus):
    """A RankConsensus whose peers are a script: each exchange returns the scripted codes of the
    other ranks with this rank's own code in its slot (no process group involved)."""

    def __init__(self, rank: int, peer_codes: list[list[int]]) -> None:
        self.rank, self.world_size = rank, len(peer_codes[0])
        self.global_ranks = tuple(range(self.world_size))
        self.fault_ranks, self.veto_ranks = (), ()
        self.script: Iterator[list[int]] = iter(peer_codes)
        self.sent: list[int] = []

    def exchange(self, code: int, what: str) -> tuple[int, ...]:
        codes = list(next(self.script))
        codes[self.rank] = code
        self.sent.append(code)
        return tuple(codes)


def warm_watch(losses: int = 10) -> Watch:
    watch = Watch()
    for i in range(losses):
        assert watch.observe_loss(1.0 + 0.01 * i) is None
    return watch


# -- codes -----------------------------------------------------------------------------------
def test_reason_codes_follow_the_documented_priority() -> None:
    codes = [reason_code(r) for r in REASON_PRIORITY]
    assert codes == sorted(codes) and min(codes) > 0 and max(codes) < CODE_RANK_ERROR
    assert all(reason_of(reason_code(r)) == r for r in REASON_PRIORITY)
    assert reason_of(0) is None
    # a half-restored model is the most severe, then non-finite weights; a divergence the least
    assert REASON_PRIORITY[-2:] == ("governor_nonfinite_params", "governor_restore_incomplete")
    assert REASON_PRIORITY[0] == "governor_divergence"
    with pytest.raises(ValueError, match="unknown panic reason"):
        reason_code("governor_bored")


# -- the decision against scripted peers -----------------------------------------------------
def test_a_healthy_rank_adopts_a_peers_panic_and_withdraws_its_sample() -> None:
    watch = warm_watch()
    history = list(watch.loss.history)
    consensus = ScriptedConsensus(0, [[0, reason_code("governor_nan")]])
    panic = consensus.decide(watch, lambda: watch.observe_loss(1.05), "check_vital_signs")
    assert panic is not None and panic.reason == "governor_nan" and math.isnan(panic.loss)
    assert consensus.sent == [0] and consensus.fault_ranks == (1,)
    assert list(watch.loss.history) == history  # the step the group panicked on is not kept
    assert watch.pending == panic


def test_the_most_severe_reason_wins_and_every_faulty_rank_is_named() -> None:
    watch = warm_watch()
    consensus = ScriptedConsensus(
        1, [[reason_code("governor_divergence"), 0, reason_code("governor_lobotomy")]]
    )
    panic = consensus.decide(watch, lambda: watch.observe_loss(math.inf), "check_vital_signs")
    assert consensus.sent == [reason_code("governor_nan")]
    assert panic is not None and panic.reason == "governor_nan" and panic.loss == math.inf
    assert consensus.fault_ranks == (0, 1, 2)


def test_a_lesser_local_panic_takes_the_groups_reason_but_keeps_its_evidence() -> None:
    watch = warm_watch()
    consensus = ScriptedConsensus(0, [[0, reason_code("governor_nonfinite_params")]])
    panic = consensus.decide(watch, lambda: watch.observe_loss(math.nan), "check_vital_signs")
    assert panic is not None and panic.reason == "governor_nonfinite_params" and math.isnan(panic.loss)
    assert panic.consecutive == 0  # a NaN loss leaves the divergence run as it was (the original's rule)


def _health_report(names: list[str], sick: str | None) -> object:
    from tolaria.health import check_tensors

    tensors = [torch.tensor([math.nan]) if name == sick else torch.ones(1) for name in names]
    return check_tensors(list(zip(names, tensors, strict=True)), backend="reference")


NAMES = ["0.weight", "0.bias", "2.weight", "0.weight.grad", "0.bias.grad", "2.weight.grad"]


def test_a_sick_ranks_slot_names_its_first_sick_tensor_on_every_rank() -> None:
    sick_watch, healthy_watch = Watch(), Watch()
    sick = ScriptedConsensus(1, [[0, 0]])
    report = _health_report(NAMES[:3], "2.weight")
    panic = sick.decide(sick_watch, lambda: sick_watch.observe_tensors(report, 3), "check_health",
                        names=lambda: NAMES)  # fmt: skip
    assert panic is not None and panic.first_bad == "2.weight"
    (slot,) = sick.sent
    assert rank_codes.decode_slot(slot, NAMES) == (reason_code("governor_nonfinite_params"), "2.weight")
    healthy = ScriptedConsensus(0, [[0, slot]])
    calm = _health_report(NAMES[:3], None)
    agreed = healthy.decide(healthy_watch, lambda: healthy_watch.observe_tensors(calm, 3), "check_health",
                            names=lambda: NAMES)  # fmt: skip
    assert agreed is not None and agreed.reason == "governor_nonfinite_params"
    assert agreed.first_bad == "2.weight" and healthy.fault_ranks == (1,)
    # A rank whose own list holds another name at that position (a pipeline stage) names none.
    other = ScriptedConsensus(0, [[0, slot]])
    stage = ["4.weight", "4.bias", "6.weight"]
    watch = Watch()
    alien = other.decide(watch, lambda: watch.observe_tensors(_health_report(stage, None), 3),
                         "check_health", names=lambda: stage)  # fmt: skip
    assert alien is not None and alien.first_bad is None


def test_slot_values_survive_the_int64_exchange_and_keep_their_codes() -> None:
    for code in range(1, CODE_RANK_ERROR + 1):
        slot = rank_codes.encode_slot(code, NAMES[-1], NAMES)
        assert 0 < slot < 2**63 and slot & rank_codes.CODE_MASK == code
        assert rank_codes.decode_slot(slot, NAMES) == (code, NAMES[-1])
    assert rank_codes.encode_slot(3, "not listed", NAMES) == 3 == rank_codes.encode_slot(3, None, NAMES)
    assert rank_codes.decode_slot(3, NAMES) == (3, None)


def test_when_every_rank_is_healthy_nothing_is_rewound() -> None:
    watch = warm_watch()
    consensus = ScriptedConsensus(0, [[0, 0, 0]])
    assert consensus.decide(watch, lambda: watch.observe_loss(1.2), "check_vital_signs") is None
    assert watch.loss.history[-1] == 1.2 and watch.pending is None and consensus.fault_ranks == ()


def test_a_local_anomaly_below_the_panic_count_stays_local() -> None:
    watch = warm_watch()
    consensus = ScriptedConsensus(0, [[0, 0]])
    assert consensus.decide(watch, lambda: watch.observe_loss(500.0), "check_vital_signs") is None
    assert consensus.sent == [0] and watch.loss.consecutive_panics == 1


def test_a_rank_that_raises_still_takes_part_and_its_peers_raise_too() -> None:
    watch = warm_watch()
    raising = ScriptedConsensus(1, [[0, 0]])
    with pytest.raises(TypeError):
        raising.decide(watch, lambda: watch.observe_loss("not a loss"), "check_vital_signs")
    assert raising.sent == [CODE_RANK_ERROR]
    peer = ScriptedConsensus(0, [[0, CODE_RANK_ERROR]])
    before = list(watch.loss.history)
    with pytest.raises(
        DistributedGovernorError, match=r"rank\(s\) \[1\] raised during check_vital_signs"
    ) as info:
        peer.decide(watch, lambda: watch.observe_loss(1.0), "check_vital_signs")
    assert info.value.ranks == (1,) and list(watch.loss.history) == before


def test_commit_votes_name_the_vetoing_ranks() -> None:
    consensus = ScriptedConsensus(0, [[0, 1, 0], [0, 0, 0]])
    assert consensus.agree_on_commit(True) is False and consensus.veto_ranks == (1,)
    assert consensus.agree_on_commit(True) is True and consensus.veto_ranks == ()


def test_a_failed_peer_rollback_raises_on_the_healthy_rank() -> None:
    consensus = ScriptedConsensus(0, [[0, 1]])
    with pytest.raises(DistributedGovernorError, match=r"rollback failed on rank\(s\) \[1\]"):
        consensus.run_rollback(lambda: "done")
    failing = ScriptedConsensus(1, [[0, 0]])

    def broken() -> str:
        raise RuntimeError("restore exploded")

    with pytest.raises(RuntimeError, match="restore exploded"):
        failing.run_rollback(broken)
    assert failing.sent == [1]


def test_ranked_payloads_keep_every_field_and_add_the_ranks() -> None:
    consensus = ScriptedConsensus(2, [[0, 0, 0]])
    base = telemetry.GovernorRollbackPayload(0, "cpu", "governor_nan", math.nan, 1.0, 1, "governor_nan")
    ranked = consensus.ranked(base, (1,))
    assert isinstance(ranked, telemetry.GovernorRollbackPayload)
    assert ranked.to_dict() == {**base.to_dict(), "rank": 2, "world_size": 3, "fault_ranks": [1]}
    event = TelemetryEvent(TelemetryEventType.GOVERNOR_ROLLBACK, telemetry.Severity.WARNING, "m", ranked)
    assert '"fault_ranks":[1]' in event.to_json()


# -- two-phase resolve of the stores ---------------------------------------------------------
@pytest.fixture(params=STORE_BACKENDS)
def store(request: pytest.FixtureRequest) -> SnapshotStore:
    return make_store(request.param)


def test_a_vetoed_capture_leaves_the_previous_lkg_committed(store: SnapshotStore) -> None:
    live = {"w": torch.arange(6, dtype=torch.float32), "b": torch.ones(2)}
    store.capture(live, meta="first")
    assert store.resolve_agreed(lambda healthy: healthy).committed  # type: ignore[union-attr]
    live["w"].add_(100)
    store.capture(live, meta="second")
    votes: list[bool] = []
    resolution = store.resolve_agreed(lambda healthy: votes.append(healthy) or False)
    assert votes == [True]
    assert resolution is not None and not resolution.committed and resolution.vetoed
    assert resolution.first_bad is None and store.last_resolution == resolution
    assert store.lkg_meta == "first"
    lkg = store.last_good_state
    assert lkg is not None and torch.equal(lkg["w"], torch.arange(6, dtype=torch.float32))
    store.restore(live)
    assert torch.equal(live["w"], torch.arange(6, dtype=torch.float32))
    live["w"].add_(7)  # the next agreed capture commits as usual
    store.capture(live, meta="third")
    assert store.resolve_agreed(lambda healthy: True).committed  # type: ignore[union-attr]
    assert store.lkg_meta == "third" and torch.equal(store.last_good_state["w"], live["w"])  # type: ignore[index]


def test_a_vetoed_first_capture_leaves_no_lkg(store: SnapshotStore) -> None:
    store.capture({"w": torch.ones(3)}, meta="m")
    resolution = store.resolve_agreed(lambda healthy: False)
    assert resolution is not None and resolution.vetoed and not store.has_lkg
    assert store.last_good_state is None and store.lkg_meta is None


def test_a_sick_capture_votes_no_and_nothing_pending_votes_nothing(store: SnapshotStore) -> None:
    votes: list[bool] = []
    assert store.resolve_agreed(lambda healthy: votes.append(healthy) or True) is None
    store.capture({"w": torch.tensor([1.0, math.nan])})
    resolution = store.resolve_agreed(lambda healthy: votes.append(healthy) or False)
    assert votes == [False] and resolution is not None and not resolution.committed
    assert not resolution.vetoed and resolution.first_bad == "w"


def test_a_resolve_that_raises_still_votes_no(store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.capture({"w": torch.ones(3)})

    def broken() -> None:
        raise OSError("copy engine failed")

    monkeypatch.setattr(store, "resolve", broken)
    votes: list[bool] = []
    with pytest.raises(OSError, match="copy engine failed"):
        store.resolve_agreed(lambda healthy: votes.append(healthy) or True)
    assert votes == [False]


# -- no group: no collective, ever -----------------------------------------------------------
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "monitored_barrier",
    "reduce", "reduce_scatter", "all_to_all", "gather", "scatter", "new_group",
)  # fmt: skip


@pytest.fixture
def no_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a collective was issued without a process group")

    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, refuse)


@pytest.mark.parametrize("process_group", [None, "auto"])
def test_without_a_group_no_collective_is_ever_issued(no_collectives: None, process_group: object) -> None:
    assert not dist.is_initialized()  # "auto" then means no group
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters())
    seen: list[TelemetryEvent] = []
    old = telemetry.set_hub(TelemetryHub([telemetry.CallbackSink(seen.append)]))
    try:
        gov = TolariaGovernor(model, optimizer=opt, process_group=process_group)
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        assert gov.snapshot().committed
        assert not gov.check_health() and not gov.check_vital_signs(1.0)
        with torch.no_grad():
            model[0].weight[0, 0] = math.nan  # type: ignore[index]
        assert gov.check_health() and gov.snapshot().committed is False
        assert gov.execute_rollback().panic_reason == "governor_nonfinite_params"
        assert gov.check_vital_signs(math.nan) and gov.execute_rollback().panic_reason == "governor_nan"
        gov.reset()
    finally:
        telemetry.set_hub(old)
    # without a group the payloads are the plain ones, with no rank fields
    assert seen and all("fault_ranks" not in e.to_dict()["data"] for e in seen)


def test_process_group_arguments_are_validated() -> None:
    assert resolve_process_group(None) is None and resolve_process_group("auto") is None
    assert type(make_decisions(None)) is LocalDecisions and not make_decisions("auto").distributed
    with pytest.raises(ValueError, match="process_group must be None, 'auto' or a"):
        TolariaGovernor(nn.Linear(2, 2), process_group="world")
    with pytest.raises(TypeError, match="process_group must be None, 'auto' or a .* got int"):
        TolariaGovernor(nn.Linear(2, 2), process_group=0)


def test_the_module_documents_every_reason_the_governor_can_report() -> None:
    from tolaria import vitals

    reasons = {getattr(vitals, n) for n in vitals.__all__ if n.startswith("REASON_")}
    assert reasons == set(distributed.REASON_PRIORITY)
