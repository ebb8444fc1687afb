"""``tolaria.addresses``: torch's data-pointer reader, called from C, against ``data_ptr()``.

The compiled loop must give exactly what ``tuple(map(torch.Tensor.data_ptr, tensors))`` gives
(its twin), for every kind of object a scan may pass, with the reader bound and without it, and
raise the twin's errors. A subclass must not take the reader: its ``data_ptr()`` may answer
through ``__torch_function__``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tolaria import _ext
from tolaria import addresses as reads

_C = _ext.require_extension()  # CI sets TOLARIA_REQUIRE_NATIVE=1: a missing build fails, not skips


class Shifted(torch.Tensor):
    """A subclass whose ``data_ptr()`` answers through ``__torch_function__`` (off by 8)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = super().__torch_function__(func, types, args, kwargs or {})
        return result + 8 if func is torch.Tensor.data_ptr else result


def samples(device: str) -> list[torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32, device=device)
    grid = base.view(4, 6)
    tensors = [
        base,
        base[5:],  # offset view: the address moves by 20 bytes
        grid.t(),
        grid[:, ::2],
        base.expand(2, 24),
        torch.empty(0, device=device),
        torch.tensor(3.0, device=device),
        nn.Parameter(torch.ones(3, 2, device=device)),
        nn.Linear(3, 2).to(device).weight,
        torch.ones(2, 3, dtype=torch.complex64, device=device),
    ]
    dtypes = (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool)
    tensors += [torch.ones(5, dtype=dtype, device=device) for dtype in dtypes]
    return tensors


@pytest.fixture(params=[True, False], ids=["reader-bound", "reader-unbound"])
def binding(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Each test runs with torch's reader bound (when this torch exports it) and without."""
    if request.param and not reads.reader_bound():
        pytest.fail(f"this torch's reader is not bound: {reads.reader_unbound_reason()}")
    if not request.param:
        _C.bind_address_reader(0, (), torch.Tensor.data_ptr)
    try:
        yield request.param
    finally:
        assert reads._bind_reader() == reads.reader_unbound_reason()  # as the import left it


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_addresses_match_data_ptr(binding: bool, device: str) -> None:
    tensors = samples(device)
    expected = reads.addresses_in_python(tensors)
    assert reads.addresses(tensors) == expected
    assert reads.addresses(tuple(tensors)) == expected
    assert expected[1] == expected[0] + 20
    assert reads.addresses([]) == ()


def test_many_tensors(binding: bool) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(500)])
    params = tuple(model.parameters())
    assert reads.addresses(params) == tuple(p.data_ptr() for p in params)


def test_subclass_answers_through_torch_function(binding: bool) -> None:
    plain = torch.ones(4)
    shifted = plain.as_subclass(Shifted)
    assert shifted.data_ptr() == plain.data_ptr() + 8  # the subclass's own answer
    assert reads.addresses([plain, shifted]) == (plain.data_ptr(), plain.data_ptr() + 8)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (3, TypeError, "doesn't apply to a 'int' object"),
        (None, TypeError, "doesn't apply to a 'NoneType' object"),
        (torch.eye(3).to_sparse(), RuntimeError, "doesn't have storage"),
    ],
    ids=["int", "none", "sparse"],
)
def test_errors_are_the_twins(binding: bool, bad: object, error: type[Exception], message: str) -> None:
    tensors = [torch.ones(2), bad]
    with pytest.raises(error, match=message):
        reads.addresses_in_python(tensors)
    with pytest.raises(error, match=message):
        reads.addresses(tensors)


def test_not_a_sequence() -> None:
    with pytest.raises(TypeError, match="objects must be a list or a tuple"):
        _C.addresses(5)


def test_bind_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="fallback must be callable"):
        _C.bind_address_reader(0, (), 3)
    with pytest.raises(TypeError, match="exact must hold types"):
        _C.bind_address_reader(0, ("Tensor",), torch.Tensor.data_ptr)


def test_reader_is_bound_where_torch_exports_it() -> None:
    """This torch (CI's) exports the reader; the self-test passed and the reader is in use."""
    assert reads.torch_reader() is not None
    assert reads.reader_bound(), reads.reader_unbound_reason()
    assert reads.addresses is not reads.addresses_in_python


def test_environment_switches_the_reader_off() -> None:
    code = (
        "from tolaria import addresses as r, _ext; import torch; "
        "t = [torch.ones(3), torch.ones(3)[1:]]; "
        "assert r.addresses(t) == tuple(x.data_ptr() for x in t); "
        "print(r.reader_bound(), r.reader_unbound_reason())"
    )
    env = {**os.environ, reads.READER_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"False {reads.READER_ENV}=0"
