"""Every kind of parameter and buffer a PyTorch user can have, through a guarded step and a
rollback, with both snapshot stores: sparse gradients, complex parameters and gradients, frozen
parameters and buffers, and the tensors that cannot be snapshotted (meta, lazy, quantized,
sparse buffers, dispatch subclasses), which get a clear error before anything is copied.

Sharded (FSDP2 / DTensor) parameters are in test_fsdp.py.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from tolaria.governor import TolariaGovernor
from tolaria.health import check_tensors
from tolaria.health.dispatch import triton_reads_cpu
from tolaria.snapshot import make_store

STORES = ["reference", "native"]

# The kernel runs on these CPU models' tensors under TRITON_INTERPRET=1 (conftest sets it on a
# machine without a GPU); on a GPU machine it cannot, and those cases skip there (and on CI, where
# a skip fails, a missing Triton is caught).
HEALTH = [
    "reference",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not triton_reads_cpu(), reason="needs TRITON_INTERPRET=1")
    ),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so a comparison is bit-exact (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


def state_of(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


# -- sparse gradients ------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 4, sparse=True)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids)).sum()


def sparse_step(model: Bag, opts: list[torch.optim.Optimizer], ids: torch.Tensor) -> None:
    for opt in opts:
        opt.zero_grad()
    model(ids).backward()  # repeated ids: an uncoalesced sparse gradient with duplicate indices
    for opt in opts:
        opt.step()


def bag_and_optimizers() -> tuple[Bag, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = Bag()
    sparse = torch.optim.SparseAdam([model.emb.weight], lr=0.1)
    return model, [sparse, torch.optim.Adam(model.head.parameters())]


@pytest.mark.parametrize("health_backend", HEALTH)
@pytest.mark.parametrize("store", STORES)
def test_sparse_gradients_are_checked_through_their_coalesced_values(store: str, health_backend: str) -> None:
    model, (sparse_opt, _) = bag_and_optimizers()
    gov = TolariaGovernor(model, optimizer=sparse_opt, snapshot_backend=store, health_backend=health_backend)
    ids = torch.tensor([1, 3, 1, 1, 7])
    model(ids).backward()
    grad = model.emb.weight.grad
    assert grad is not None and grad.is_sparse and not grad.is_coalesced()
    assert gov.check_health() is False
    dense = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]  # type: ignore[union-attr]
    assert gov.last_grad_norm == pytest.approx(math.sqrt(sum(float(g.square().sum()) for g in dense)))
    # A NaN in one of the duplicate rows reaches the coalesced values.
    values = grad._values().clone()
    values[2, 1] = math.nan
    indices = grad._indices()
    model.emb.weight.grad = torch.sparse_coo_tensor(indices, values, grad.shape, check_invariants=True)
    assert gov.check_health() is True
    panic = gov.pending_panic
    assert panic is not None and panic.reason == "governor_nonfinite_grads"
    assert panic.first_bad == "emb.weight.grad"
    assert gov.execute_rollback().rollback_occurred


@pytest.mark.parametrize("store", STORES)
def test_sparse_training_rolls_back_bit_exactly_and_the_next_step_matches(store: str) -> None:
    clean, clean_opts = bag_and_optimizers()
    model, opts = bag_and_optimizers()
    gov = TolariaGovernor(model, optimizer=opts[0], snapshot_backend=store)
    batches = [torch.tensor([i % 12, (3 * i) % 12, i % 12]) for i in range(6)]
    for ids in batches[:3]:
        sparse_step(clean, clean_opts, ids)
        sparse_step(model, opts, ids)
        assert gov.observe(torch.tensor(0.0)) is False  # the deferred path reads sparse grads too
    assert gov.snapshot().committed
    lkg = state_of(model)
    for ids in batches[3:5]:
        sparse_step(model, opts, ids)
    with torch.no_grad():
        model.emb.weight[5, 0] = math.inf
    assert gov.check_health()
    report = gov.execute_rollback()
    assert report.optimizer_state == "restored" and same_bits(state_of(model), lkg)
    # The head's Adam is not the Governor's: give it the clean run's state (a copy: loading
    # keeps fitting tensors, and two runs stepping one step counter would skew both).
    opts[1].load_state_dict(copy.deepcopy(clean_opts[1].state_dict()))
    sparse_step(clean, clean_opts, batches[5])
    sparse_step(model, opts, batches[5])
    assert same_bits(state_of(model), state_of(clean))


# -- complex parameters and gradients --------------------------------------------------------
class Filter(nn.Module):
    """A complex-valued filter bank followed by a real readout."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dtype=torch.complex64))
        self.readout = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout((x.to(torch.complex64) * self.w).abs()).pow(2).mean()


def complex_model() -> tuple[Filter, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = Filter()
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def complex_step(model: Filter, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).backward()
    opt.step()


@pytest.mark.parametrize("health_backend", HEALTH)
@pytest.mark.parametrize("store", STORES)
def test_complex_parameters_and_gradients_are_checked_as_real_views(store: str, health_backend: str) -> None:
    model, opt = complex_model()
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend=store, health_backend=health_backend)
    model(torch.randn(4, 6)).backward()
    assert model.w.grad is not None and model.w.grad.is_complex()
    assert gov.check_health() is False
    expected = math.sqrt(sum(float(p.grad.abs().square().sum()) for p in model.parameters()))  # type: ignore[union-attr]
    assert gov.last_grad_norm == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        model.w.grad[3] = complex(0.0, math.nan)  # only the imaginary part is sick
    assert gov.check_health() and gov.pending_panic.first_bad == "w.grad"  # type: ignore[union-attr]
    gov.execute_rollback()
    with torch.no_grad():
        model.w[1] = complex(math.inf, 0.0)
    assert gov.check_health() and gov.pending_panic.first_bad == "w"  # type: ignore[union-attr]
    report = check_tensors([("w", model.w)], backend=health_backend)
    assert report.posinf == [1] and report.nonfinite == [1]  # one sick part of one element


@pytest.mark.parametrize("store", STORES)
def test_complex_training_rolls_back_bit_exactly_and_the_next_step_matches(store: str) -> None:
    clean, clean_opt = complex_model()
    model, opt = complex_model()
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend=store)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 6, generator=gen) for _ in range(5)]
    for x in xs[:3]:
        complex_step(clean, clean_opt, x)
        complex_step(model, opt, x)
        assert gov.check_health() is False
    assert gov.snapshot().committed
    lkg = state_of(model)
    complex_step(model, opt, xs[3] * 100)
    with torch.no_grad():
        model.w[0] = complex(math.nan, math.nan)
    assert gov.check_health()
    assert gov.execute_rollback().optimizer_state == "restored" and same_bits(state_of(model), lkg)
    complex_step(clean, clean_opt, xs[4])
    complex_step(model, opt, xs[4])
    assert same_bits(state_of(model), state_of(clean))


# -- frozen parameters and buffers -----------------------------------------------------------
@pytest.mark.parametrize("store", STORES)
def test_frozen_parameters_and_buffers_of_every_dtype_come_back(store: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen backbone layer
    model.register_buffer("seen", torch.zeros(3, dtype=torch.bool))
    model.register_buffer("calls", torch.zeros((), dtype=torch.int64))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend=store)
    lkg = state_of(model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()  # BatchNorm updates its running statistics
        assert gov.check_health() is False
        opt.step()
        model.calls += 1
        model.seen[int(model.calls) % 3] = True
    with torch.no_grad():
        model[0].weight.fill_(math.nan)  # the frozen layer is watched and restored all the same
    assert gov.check_health() and gov.pending_panic.first_bad == "0.weight"  # type: ignore[union-attr]
    gov.execute_rollback()
    assert same_bits(state_of(model), lkg)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


# -- tensors that cannot be snapshotted: a clear error, before any copy ----------------------
@pytest.mark.parametrize("store", STORES)
def test_a_model_on_meta_is_refused_at_construction_with_what_to_do(store: str) -> None:
    model = nn.Linear(3, 2, device="meta")
    refused = r"model tensor 'weight': it is on the meta device and holds no data: materialize the model"
    with pytest.raises(ValueError, match=refused + r" first \(model.to_empty"):
        TolariaGovernor(model, snapshot_backend=store)
    with pytest.raises(ValueError, match=r"named_tensors\['w'\]: it is on the meta device"):
        make_store(store).capture([("w", torch.ones(2, device="meta"))])
    model.to_empty(device="cpu")
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    assert TolariaGovernor(model, snapshot_backend=store).last_good_state is not None


@pytest.mark.parametrize("store", STORES)
def test_a_lazy_model_is_refused_until_it_is_materialized(store: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that lazy modules are experimental
        model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 1))
    refused = r"model tensor '0.weight': it is an uninitialized \(lazy\) parameter or buffer: materialize"
    with pytest.raises(ValueError, match=refused + r" the model first \(run one forward pass"):
        TolariaGovernor(model, snapshot_backend=store)
    with pytest.raises(ValueError, match="uninitialized"):
        check_tensors(model.named_parameters())
    model(torch.randn(2, 5))  # shapes inferred
    gov = TolariaGovernor(model, snapshot_backend=store)
    assert gov.check_health() is False and gov.last_good_state["0.weight"].shape == (3, 5)  # type: ignore[index]


@pytest.mark.parametrize("store", STORES)
def test_quantized_sparse_and_subclass_buffers_are_refused_by_name(store: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    refused = {
        "q": (quantized, r"it is quantized \(torch.qint8\): its scale and zero point are not in its bytes"),
        "s": (torch.eye(3).to_sparse(), r"it is torch.sparse_coo: only strided \(dense\) tensors"),
        "z": (Wrapped(torch.ones(3)), r"it is a Wrapped, a tensor subclass that overrides __torch_dispatch"),
    }
    for name, (tensor, message) in refused.items():
        model = nn.Linear(2, 2)
        model.register_buffer(name, tensor)
        with pytest.raises(ValueError, match=rf"cannot snapshot model tensor '{name}': {message}"):
            TolariaGovernor(model, snapshot_backend=store)
        with pytest.raises(ValueError, match=rf"cannot snapshot named_tensors\['{name}'\]: {message}"):
            make_store(store).capture([(name, tensor)])


class Wrapped(torch.Tensor):
    """A minimal wrapper subclass: its values live in ``inner``, not at its own data pointer."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> Wrapped:
        made = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)
        made.inner = inner
        return made  # type: ignore[no-any-return]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(t: Any) -> Any:
            return t.inner if isinstance(t, Wrapped) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
