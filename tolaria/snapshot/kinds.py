"""Which tensors a snapshot can hold, and why the others cannot.

A store copies a tensor's bytes out and back (``memcpy`` by address in the native engine), so
it takes dense tensors with plain memory: real, complex, integer or bool, any device, contiguous
or not, ``nn.Parameter`` or not. For everything else :func:`refusal` says why and what to do,
and every refusal is raised before anything is copied (never a torch error from inside a copy):

* a DTensor (FSDP2, tensor parallelism): a store takes its local shard (``to_local()``), which
  is what the Governor hands it, under the full parameter name;
* no data: the meta device, uninitialized (lazy) parameters or buffers;
* quantized tensors: their scale and zero point are not part of their bytes, so a restore could
  not be bit-exact;
* sparse or other non-strided layouts, and tensor subclasses that override
  ``__torch_dispatch__`` (their values are not plain memory at their data pointer).
"""

from __future__ import annotations

import torch

from tolaria.health.kinds import is_dtensor, no_data_reason

# The dispatch implementation of torch.Tensor and nn.Parameter: a subclass with another one
# computes its values in Python, so its data pointer (if any) is not where they live.
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def refusal(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot be snapshotted, phrased to follow its name ("... is a DTensor"),
    with what to do instead; None when it can."""
    if is_dtensor(tensor):
        return (
            "is a DTensor: snapshot its local shard (tensor.to_local()), as a TolariaGovernor does for "
            "sharded (FSDP2) models"
        )
    missing = no_data_reason(tensor)
    if missing is not None:
        return missing
    if tensor.layout != torch.strided:
        return f"is {tensor.layout}: only strided (dense) tensors can be snapshotted"
    if tensor.is_quantized:
        return (
            f"is quantized ({tensor.dtype}): its scale and zero point are not in its bytes, so it cannot "
            "be restored bit-exactly; guard the float model, before it is quantized"
        )
    if type(tensor).__torch_dispatch__ is not _PLAIN_DISPATCH:
        return (
            f"is a {type(tensor).__name__}, a tensor subclass that overrides __torch_dispatch__ (its values "
            "are not plain memory); snapshot the plain tensors it wraps"
        )
    return None


def check_snapshottable(named: list[tuple[str, torch.Tensor]], what: str) -> None:
    """ValueError naming the first tensor of ``named`` that :func:`refusal` refuses, and why;
    ``what`` says whose tensors they are (``"model tensor"``)."""
    for key, tensor in named:
        reason = refusal(tensor)
        if reason is not None:
            raise ValueError(f"cannot snapshot {what} {key!r}: it {reason}")


__all__ = ["check_snapshottable", "refusal"]
