"""``health_backend="triton"`` on a machine where Triton cannot read CPU memory (a GPU machine
without TRITON_INTERPRET): the model's tensors take the kernel, but a snapshot's host copies
(staging bytes, AdamW's CPU step counts) are verified by the compiled CPU pass instead of raising
(:func:`tolaria.health.host_backend`). The GPU machine is emulated here by switching the
interpreter flag off, as a real CUDA run has it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolaria import TolariaGovernor
from tolaria.bench import fake_device
from tolaria.health import check_tensors, dispatch, host_backend

triton_kernels = pytest.importorskip("tolaria.health.triton_kernels")
from tolaria.health import plan  # noqa: E402  (needs Triton, which the line above asserts)


@pytest.fixture
def no_cpu_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton imports, but its kernels cannot read CPU tensors: a CUDA machine's case."""
    plan.clear_plans()
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
    assert plan.cpu_runtime() is None


def test_triton_becomes_auto_for_host_copies_only_where_it_cannot_read_them(
    no_cpu_triton: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert host_backend("triton") == "auto" and not dispatch.triton_reads_cpu()
    assert [host_backend(b) for b in ("auto", "native", "reference")] == ["auto", "native", "reference"]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # what "triton" does to host bytes here
        check_tensors([("x", torch.ones(3))], backend="triton")
    with fake_device.fake_device_checks():  # a CPU runtime installed: the kernel path reads CPU tensors
        assert host_backend("triton") == "triton" and dispatch.triton_reads_cpu()
    monkeypatch.setattr(triton_kernels, "INTERPRETED", True)
    assert host_backend("triton") == "triton"  # the interpreter reads CPU tensors: the kernel stays
    assert dispatch.triton_reads_cpu()


def test_without_an_importable_triton_the_backend_stays_so_the_check_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "_triton_plan", None)
    monkeypatch.setattr(dispatch, "_triton_error", "ImportError: no triton here")
    assert host_backend("triton") == "triton" and not dispatch.triton_reads_cpu()
    with pytest.raises(RuntimeError, match="needs an importable Triton: ImportError: no triton here"):
        check_tensors([("x", torch.ones(3))], backend="triton")


@pytest.mark.parametrize("store", ["native", "reference"])
def test_snapshots_of_a_triton_governor_verify_commit_reject_and_restore(
    no_cpu_triton: None, store: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # AdamW's state now holds CPU step counts, as it does beside a CUDA model
    governor = TolariaGovernor(model, optimizer=optimizer, snapshot_backend=store, health_backend="triton")
    assert governor.snapshot().committed is True
    good = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    with torch.no_grad():
        model[1].weight[0, 1] = float("nan")
    rejected = governor.snapshot()
    assert rejected.committed is False and rejected.first_bad == "1.weight"
    optimizer.state[model[0].weight]["exp_avg"].add_(1.0)
    governor.execute_rollback(optimizer=optimizer)
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), moments, strict=True))
