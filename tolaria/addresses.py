"""The data addresses of many tensors, read in one C loop.

Every per-step scan asks each tensor where its data lies: a cached health plan is found by its
tensors' addresses, and a snapshot copies each tensor from its current address. From Python,
``Tensor.data_ptr()`` costs about 55 ns a call on this project's CPU machine, so a step that
checks 5,000 parameters and 5,000 gradients spends half a millisecond or more just asking.

torch exports the C function that its own compiled-code caches use for the same read
(``torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr``, its address as an int:
``void* f(PyObject*)``, the tensor's ``data_ptr()``). :func:`addresses` calls it from
``tolaria._C.addresses`` for objects whose type is exactly ``torch.Tensor`` or
``nn.Parameter``, and ``Tensor.data_ptr`` for every other object (a subclass may answer through
``__torch_function__``) and for any tensor the reader refuses (sparse, no storage), which then
raises the Python error the twin raises. The result equals
``tuple(map(torch.Tensor.data_ptr, tensors))`` (:func:`addresses_in_python`, the twin), with no
interpreted step per tensor.

The reader is bound at import only after a self-test against ``data_ptr()`` (plain tensors,
a parameter, an offset view, an empty tensor). It is not bound without the compiled extension,
without the export (another torch), when the self-test disagrees, or with
``TOLARIA_ADDRESS_READER=0``; :func:`reader_bound` says which, and the twin's answers are the
same, only slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from tolaria import _ext

READER_ENV = "TOLARIA_ADDRESS_READER"

_log = logging.getLogger(__name__)
_data_ptr = torch.Tensor.data_ptr
_compiled_addresses = _ext.compiled("addresses")
_bind = _ext.compiled("bind_address_reader")


def addresses_in_python(tensors: Sequence[Any]) -> tuple[int, ...]:
    """The twin of ``tolaria._C.addresses``: ``data_ptr()`` of each tensor, in order."""
    return tuple(map(_data_ptr, tensors))


def torch_reader() -> int | None:
    """The address of torch's exported data-pointer reader, or None when this torch has none."""
    try:
        from torch._C._dynamo import guards
    except ImportError:
        return None
    reader = getattr(guards, "_torchinductor_pyobject_tensor_data_ptr", None)
    return reader if isinstance(reader, int) and reader else None


def _self_test() -> bool:
    """Whether the bound reader gives ``data_ptr()``'s answers on the tensors the scans pass."""
    base = torch.arange(8, dtype=torch.float32)
    samples = [base, base[3:], torch.nn.Parameter(torch.ones(2, 3)), torch.empty(0), base.view(2, 4).t()]
    return bool(_compiled_addresses(samples) == addresses_in_python(samples))


def _bind_reader() -> str | None:
    """Bind torch's reader into the extension; None when bound, else why not."""
    if _bind is None or _compiled_addresses is None:
        return "the compiled extension (with addresses) is not loaded"
    _bind(0, (), _data_ptr)  # the twin's answers until the reader has passed its self-test
    if os.environ.get(READER_ENV, "1").strip() == "0":
        return f"{READER_ENV}=0"
    reader = torch_reader()
    if reader is None:
        return f"torch {torch.__version__} does not export _torchinductor_pyobject_tensor_data_ptr"
    _bind(reader, (torch.Tensor, torch.nn.Parameter), _data_ptr)
    if not _self_test():
        _bind(0, (), _data_ptr)
        _log.warning("torch's data-pointer reader disagreed with Tensor.data_ptr(); not used")
        return "the reader's self-test disagreed with Tensor.data_ptr()"
    return None


_unbound_reason = _bind_reader()


def reader_bound() -> bool:
    """True when :func:`addresses` reads plain tensors' addresses through torch's C reader."""
    return _unbound_reason is None


def reader_unbound_reason() -> str | None:
    """Why the reader is not bound (None when it is)."""
    return _unbound_reason


if _compiled_addresses is not None:

    def addresses(tensors: Sequence[Any]) -> tuple[int, ...]:
        """``data_ptr()`` of each tensor in the list or tuple ``tensors``, in one C loop; raises
        what ``Tensor.data_ptr`` raises (TypeError for a non-tensor, RuntimeError for a tensor
        without a data pointer)."""
        result: tuple[int, ...] = _compiled_addresses(tensors)
        return result

else:
    addresses = addresses_in_python


__all__ = [
    "READER_ENV",
    "addresses",
    "addresses_in_python",
    "reader_bound",
    "reader_unbound_reason",
    "torch_reader",
]
