"""CUDA behaviour of the reference store and the Governor (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.snapshot import ReferenceSnapshotStore
from tolaria.telemetry import TelemetryEvent, TelemetryEventType

pytestmark = pytest.mark.cuda


def cuda_model(batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 32)]
    layers += [nn.BatchNorm1d(32)] if batch_norm else []
    layers += [nn.Tanh(), nn.Linear(32, 4)]
    return nn.Sequential(*layers).cuda()


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    return t.clone()


def same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(bits(v), expected[k]) for k, v in model.state_dict().items())


def test_store_capture_is_pinned_stream_ordered_and_bit_exact() -> None:
    live = {"w": torch.randn(512, 512, device="cuda"), "n": torch.arange(5, device="cuda")}
    expected = {k: v.clone() for k, v in live.items()}
    store = ReferenceSnapshotStore()
    ticket = store.capture(live)
    assert ticket.in_flight
    side = torch.cuda.Stream()
    store.make_stream_wait(side)  # the side stream's write waits for the capture's copies
    with torch.cuda.stream(side):
        live["w"].add_(1)
    lkg = store.last_good_state
    assert lkg is not None and store.pinned and all(t.is_pinned() for t in lkg.values())
    assert torch.equal(lkg["w"], expected["w"].cpu()) and torch.equal(lkg["n"], expected["n"].cpu())
    torch.cuda.synchronize()
    store.restore(live)
    assert all(torch.equal(live[k], expected[k]) for k in live)


def test_governor_snapshot_is_asynchronous_and_rollback_bit_exact(events: list[TelemetryEvent]) -> None:
    model = cuda_model()
    model(torch.randn(8, 16, device="cuda"))  # BatchNorm statistics written during forward
    good = {k: bits(v) for k, v in model.state_dict().items()}
    gov = TolariaGovernor(model, snapshot_backend="reference")
    info = gov.snapshot()
    assert info.committed is None  # in flight: verified when next needed
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.mul_(2)
    lkg = gov.last_good_state
    assert lkg is not None and all(t.device.type == "cpu" and t.is_pinned() for t in lkg.values())
    assert all(torch.equal(bits(lkg[k]), v.cpu()) for k, v in good.items())
    report = gov.execute_rollback()
    assert report.rollback_occurred and same_state(model, good)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert len([e for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]) == 1


def test_sick_cuda_snapshot_is_rejected_when_resolved(events: list[TelemetryEvent]) -> None:
    model = cuda_model()
    gov = TolariaGovernor(model, snapshot_backend="reference")
    lkg = gov.last_good_state
    with torch.no_grad():
        model[0].weight[3, 3] = math.nan  # type: ignore[index]
    assert gov.snapshot().committed is None
    assert gov.last_good_state is lkg  # resolving rejected the sick capture
    alerts = [e for e in events if e.event_type is TelemetryEventType.HEALTH_ALERT]
    assert len(alerts) == 1 and alerts[0].data.first_bad == "0.weight"  # type: ignore[union-attr]


def test_snapshot_inside_a_side_stream_raises() -> None:
    gov = TolariaGovernor(cuda_model(), snapshot_backend="reference")
    with torch.cuda.stream(torch.cuda.Stream()), pytest.raises(RuntimeError, match="non-default CUDA stream"):
        gov.snapshot()


def test_adam_on_cuda_continues_like_a_clean_run() -> None:
    gen = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(8, 16, generator=gen).cuda(), torch.randn(8, 4, generator=gen).cuda()) for _ in range(5)
    ]

    def step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        opt.step()

    clean = cuda_model(batch_norm=False)
    clean_opt = torch.optim.Adam(clean.parameters(), lr=1e-2)
    for batch in data:
        step(clean, clean_opt, batch)
    model = cuda_model(batch_norm=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend="reference")
    for batch in data[:4]:
        step(model, opt, batch)
    gov.snapshot()
    step(model, opt, (data[0][0] * 1e4, data[0][1]))  # ordered after the capture by the pre-hook
    model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
    assert gov.check_health()
    assert gov.execute_rollback().optimizer_state == "restored"
    step(model, opt, data[4])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters(), strict=True))


def test_check_health_finds_sick_cuda_gradients() -> None:
    model = cuda_model(batch_norm=False)
    gov = TolariaGovernor(model, snapshot_backend="reference")
    model(torch.randn(4, 16, device="cuda")).sum().backward()
    assert gov.check_health() is False
    model[2].bias.grad[1] = math.inf  # type: ignore[index]
    assert gov.check_health() is True
    assert gov.execute_rollback().panic_reason == "governor_nonfinite_grads"


@pytest.mark.parametrize("store", ["native", "reference"])
def test_a_triton_governor_verifies_its_host_copies_without_the_interpreter(store: str) -> None:
    """health_backend="triton" on a CUDA model: AdamW's step counts stay on the CPU and the
    reference store's copies live there; both are verified by the CPU pass (host_backend)."""
    pytest.importorskip("triton")
    from tolaria.health import triton_kernels

    assert not triton_kernels.INTERPRETED  # the GPU machine's case: the interpreter is off
    model = cuda_model(batch_norm=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 16, device="cuda")).sum().backward()
    optimizer.step()
    governor = TolariaGovernor(model, optimizer=optimizer, snapshot_backend=store, health_backend="triton")
    governor.snapshot()
    lkg = governor.last_good_state  # resolves the capture: verified, committed, no raise
    assert lkg is not None and torch.equal(lkg["2.weight"], model[2].weight.detach().cpu())
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    governor.snapshot()
    kept = governor.last_good_state  # resolves the sick capture: rejected, the good one stays
    assert kept is not None and torch.equal(kept["2.weight"], lkg["2.weight"])
    assert math.isfinite(float(kept["2.weight"][0, 0]))
