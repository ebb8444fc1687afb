"""A restore is all or nothing, as the caller sees it (tolaria/restore_state.py).

An exception or KeyboardInterrupt that escapes the middle of a restore leaves the Governor
marked "restore incomplete": snapshot() refuses, every check panics, last_good_state is intact,
and the next execute_rollback() completes the restore exactly. A Ctrl-C (SIGINT) that arrives
during the restore is held until the model is whole, then delivered. Both snapshot stores.
"""

from __future__ import annotations

import math
import signal
from typing import Any

import pytest
import torch
from restore_hook import RestoreHook
from torch import nn

from tolaria.governor import TolariaGovernor

STORES = ["reference", "native"]
INCOMPLETE = "governor_restore_incomplete"


def build() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), RestoreHook(), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


BATCHES = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The model's tensors and the optimizer's, as raw bytes (bit-exact, NaN == NaN)."""
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().reshape(-1).view(torch.uint8).clone() for t in tensors]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


Diverged = tuple[TolariaGovernor, nn.Sequential, torch.optim.Optimizer, list[torch.Tensor]]


def diverged(backend: str) -> Diverged:
    """A Governor whose LKG is 3 healthy steps in, then 2 huge steps and NaN in two tensors."""
    model, opt = build()
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend=backend)
    for x in BATCHES[:3]:
        step(model, opt, x)
    assert gov.snapshot().committed
    lkg = state(model, opt)
    for x in BATCHES[3:5]:
        step(model, opt, x * 100)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
        model[3].weight[1, 1] = math.nan
    assert gov.check_health()
    return gov, model, opt, lkg


def assert_marked(gov: TolariaGovernor, lkg_view: dict[str, torch.Tensor], interrupted_by: str) -> None:
    """Everything the contract promises while a restore is incomplete."""
    assert gov.restore_incomplete is not None and interrupted_by in gov.restore_incomplete
    with pytest.raises(RuntimeError, match=r"snapshot\(\) refused: a rollback was interrupted"):
        gov.snapshot()
    with pytest.raises(RuntimeError, match="Call execute_rollback"):
        gov.reset()
    history = list(gov.loss_history)
    assert gov.check_vital_signs(0.5) is True and list(gov.loss_history) == history  # not judged
    assert gov.pending_panic is not None and gov.pending_panic.reason == INCOMPLETE
    assert gov.check_health() is True and gov.observe(0.5) is True
    assert gov.pending_panic.reason == INCOMPLETE
    current = gov.last_good_state
    assert current is not None and current.keys() == lkg_view.keys()
    assert all(torch.equal(current[k], lkg_view[k]) for k in lkg_view)  # the LKG is intact


def completes_exactly(gov: TolariaGovernor, model: nn.Module, opt: torch.optim.Optimizer,
                      lkg: list[torch.Tensor]) -> None:  # fmt: skip
    """The next rollback finishes the restore: bit-exact, reported, and training matches a run
    that never diverged."""
    report = gov.execute_rollback()
    assert report.panic_reason == INCOMPLETE and report.optimizer_state == "restored"
    assert gov.restore_incomplete is None and same(state(model, opt), lkg)
    assert gov.snapshot().committed
    clean, clean_opt = build()
    for x in BATCHES[:3]:
        step(clean, clean_opt, x)
    step(clean, clean_opt, BATCHES[5])
    step(model, opt, BATCHES[5])
    assert same(state(model, opt), state(clean, clean_opt))


@pytest.mark.parametrize("backend", STORES)
def test_a_keyboard_interrupt_raised_from_a_hook_mid_restore_marks_it_and_the_next_rollback_completes_it(
    backend: str,
) -> None:
    gov, model, opt, lkg = diverged(backend)
    lkg_view = {k: v.clone() for k, v in gov.last_good_state.items()}  # type: ignore[union-attr]

    def interrupt() -> None:
        raise KeyboardInterrupt

    model[1].on_restore = interrupt  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        gov.execute_rollback()
    # The weights and the moments (rewritten in place) are back, but the optimizer's state was
    # never installed: nothing in the tensors shows that, the mark does.
    assert_marked(gov, lkg_view, "KeyboardInterrupt")
    model[1].on_restore = None  # type: ignore[assignment]
    completes_exactly(gov, model, opt, lkg)


@pytest.mark.parametrize("backend", STORES)
def test_an_exception_inside_the_store_write_leaves_nan_weights_marked_not_hidden(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gov, model, opt, lkg = diverged(backend)
    lkg_view = {k: v.clone() for k, v in gov.last_good_state.items()}  # type: ignore[union-attr]
    store = gov._store
    write_all = store.restore

    def write_half(targets: Any) -> Any:
        write_all(list(targets)[:1])  # '0.weight' comes back ...
        raise OSError("simulated failure half-way through the write")  # ... '3.weight' does not

    monkeypatch.setattr(store, "restore", write_half)
    with pytest.raises(OSError, match="half-way"):
        gov.execute_rollback()
    assert not math.isnan(model[0].weight[0, 0].item()) and math.isnan(model[3].weight[1, 1].item())
    assert_marked(gov, lkg_view, "OSError: simulated failure")
    monkeypatch.setattr(store, "restore", write_all)
    completes_exactly(gov, model, opt, lkg)


@pytest.mark.parametrize("backend", STORES)
def test_a_ctrl_c_during_the_restore_waits_until_the_model_is_whole(backend: str) -> None:
    gov, model, opt, lkg = diverged(backend)
    model[1].on_restore = lambda: signal.raise_signal(signal.SIGINT)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        gov.execute_rollback()
    # The interrupt was delivered only once model and optimizer were the LKG again.
    assert gov.restore_incomplete is None and same(state(model, opt), lkg)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    model[1].on_restore = None  # type: ignore[assignment]
    assert gov.snapshot().committed


@pytest.mark.parametrize("backend", STORES)
def test_a_second_ctrl_c_interrupts_at_once_and_leaves_the_mark(backend: str) -> None:
    gov, model, opt, lkg = diverged(backend)
    lkg_view = {k: v.clone() for k, v in gov.last_good_state.items()}  # type: ignore[union-attr]

    def insist() -> None:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # a user who really means it (or a hung hook)

    model[1].on_restore = insist  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        gov.execute_rollback()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_marked(gov, lkg_view, "KeyboardInterrupt")
    model[1].on_restore = None  # type: ignore[assignment]
    completes_exactly(gov, model, opt, lkg)
