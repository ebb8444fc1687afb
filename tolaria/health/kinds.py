"""Every kind of tensor a PyTorch model holds, as the dense real tensor a health check reads.

The kernels and the reference read dense, strided, real tensors. Models hold more than that:

* **DTensor** (FSDP2's ``fully_shard``, tensor parallelism): this rank's local shard is checked
  (``to_local()``, no copy), under the full parameter name; ranks agree on the verdict through
  the Governor's one all-reduce (:mod:`tolaria.distributed`).
* **sparse** gradients (``nn.Embedding(sparse=True)``): the values of the coalesced tensor.
  Coalescing sums duplicate indices, so the norm of the values is the norm of the tensor, and a
  NaN anywhere in the tensor is a NaN among its values. CSR/CSC/BSR/BSC hold no duplicates.
* **complex**: checked as their real view (``torch.view_as_real``), whose L2 norm is the complex
  tensor's; each non-finite real or imaginary part counts as one non-finite element.
* **quantized**: finite by construction; checked as their dequantized values (for the norm).

Tensors without data cannot be checked and raise ValueError naming the tensor and what to do:
the meta device, and uninitialized (lazy) parameters or buffers. So does any other layout
(nested/jagged tensors).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from operator import attrgetter

import torch
from torch.nn.parameter import is_lazy

_SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` when it has been imported, else None: no DTensor can
    exist before its module is imported, so a model without one pays no import."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(tensor: object) -> bool:
    kind = dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of the same memory: in-place writes reach the DTensor),
    any other tensor itself."""
    if type(tensor) in _PLAIN_TYPES or not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()  # type: ignore[attr-defined,no-any-return]


def no_data_reason(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` holds no values to read (meta, lazy), with what to do; None when it has."""
    if is_lazy(tensor):
        return (
            "is an uninitialized (lazy) parameter or buffer: materialize the model first (run one "
            "forward pass, so its lazy modules infer their shapes)"
        )
    if tensor.is_meta:
        return (
            "is on the meta device and holds no data: materialize the model first "
            "(model.to_empty(device=...), then initialize or load its weights)"
        )
    return None


def readable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the dense real tensor a health check reads (module docstring). Copies only
    for sparse COO tensors that are not coalesced, lazy conjugates and quantized tensors.

    Raises ValueError naming ``name`` for a tensor without data or of an unsupported layout."""
    tensor = local_tensor(tensor)
    missing = no_data_reason(tensor)
    if missing is not None:
        raise ValueError(f"tensor {name!r} {missing}")
    layout = tensor.layout
    if layout is not torch.strided:
        if layout is torch.sparse_coo:
            tensor = tensor.detach().coalesce().values()
        elif layout in _SPARSE_COMPRESSED:
            tensor = tensor.detach().values()
        else:
            raise ValueError(
                f"tensor {name!r} has layout {layout}; health checks read strided or sparse tensors"
            )
    if tensor.is_quantized:
        return tensor.detach().dequantize()
    if tensor.is_complex():
        return torch.view_as_real(tensor.detach().resolve_conj().resolve_neg())
    return tensor


_SPECIAL_DTYPES = frozenset(
    {torch.complex32, torch.complex64, torch.complex128, torch.qint8, torch.quint8, torch.qint32,
     torch.quint4x2, torch.quint2x4}
)  # fmt: skip
_type_of, _layout, _dtype, _device = type, attrgetter("layout"), attrgetter("dtype"), attrgetter("device")


def _all_plain(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor is already what a check reads: a few C-level passes instead of a
    Python call per tensor (a 5,000-tensor model checks every step)."""
    return (
        set(map(_type_of, tensors)) <= _PLAIN_TYPES
        and set(map(_layout, tensors)) == {torch.strided}
        and not set(map(_dtype, tensors)) & _SPECIAL_DTYPES
        and all(device.type != "meta" for device in set(map(_device, tensors)))
    )


def readable_all(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`readable` of every tensor, in order (the tensors themselves when all are plain)."""
    if _all_plain(tensors):
        return list(tensors)
    return [readable(name, tensor) for name, tensor in zip(names, tensors, strict=True)]


__all__ = ["dtensor_type", "is_dtensor", "local_tensor", "no_data_reason", "readable", "readable_all"]
