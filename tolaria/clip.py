"""``clip_grad_norm_`` that also hands the Governor its gradient verdict: one read of the gradients.

A loop that clips reads every gradient twice per step: ``torch.nn.utils.clip_grad_norm_``
computes each gradient's norm, then the Governor's health check reads the gradients again for
their norms and NaN/Inf. :func:`clip_grad_norm_` takes the same arguments and returns the same
total norm as torch's (it runs torch's own grouping, the same per-tensor norms and torch's
``clip_grads_with_norm_``), and with ``governor=`` hands the per-tensor norms it computed,
*before* clipping, to :meth:`TolariaGovernor.use_gradient_norms`: the next ``check_health()`` or
``observe()`` judges the gradients by those norms (a non-finite gradient has a non-finite norm;
the gradient-norm detector sees the unclipped global norm) and reads no gradient itself.

Only the L2 norm (``norm_type=2.0``) says what the health check says; with another
``norm_type`` nothing is handed and the Governor reads the gradients as usual. Parameters are
still read by the check every step (``check_parameters=True``, the default); a loop that wants
the check to cost no more than the clip can pass ``check_parameters=False`` and rely on the
gradients, the loss and the snapshot's own check of the weights it captures.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from tolaria.health.pairs import GradientNorms

if TYPE_CHECKING:
    from tolaria.governor import TolariaGovernor


def _uses_foreach(grads: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: foreach where supported (None), or where asked and the device has it."""
    if foreach is None and _has_foreach_support(grads, device):
        return True
    if foreach and _device_has_foreach_support(device):
        return True
    if foreach:
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return False


def _groups(grads: list[torch.Tensor]) -> list[tuple[torch.device, list[torch.Tensor], list[int]]]:
    """torch's grouping by (device, dtype), with each member's index in ``grads``."""
    grouped: Any = _group_tensors_by_device_and_dtype([grads], with_indices=True)  # type: ignore[list-item]
    return [(device, group, indices) for (device, _), ([group], indices) in grouped.items()]


def _per_tensor_norms(
    grads: list[torch.Tensor], norm_type: float, foreach: bool | None
) -> list[torch.Tensor]:
    """Each gradient's norm, in input order, computed exactly as torch's ``get_total_norm`` does."""
    norms: list[Any] = [None] * len(grads)
    for device, group, indices in _groups(grads):
        if _uses_foreach(group, device, foreach):
            found = list(torch._foreach_norm(group, norm_type))
        else:
            found = [torch.linalg.vector_norm(g, norm_type) for g in group]
        for index, norm in zip(indices, found, strict=True):
            norms[index] = norm
    return norms


def _clip_with_norm(
    params: list[torch.Tensor], max_norm: float, total: torch.Tensor, foreach: bool | None
) -> None:
    """torch's ``clip_grads_with_norm_`` (torch >= 2.6), or its body where it is missing."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip is not None:
        clip(params, max_norm, total, foreach)
        return
    grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for device, group, _ in _groups(grads):
        if _uses_foreach(group, device, foreach):
            torch._foreach_mul_(group, coef.to(device))
        else:
            for g in group:
                g.mul_(coef.to(device))


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    governor: TolariaGovernor | None = None,
) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_`, same arguments and result (the total norm of the
    gradients, as a tensor; the gradients scaled in place by ``min(max_norm / (total + 1e-6), 1)``).

    ``governor``: hand it the per-tensor norms computed here, before clipping (L2 only; see the
    module docstring), so its next ``check_health()`` / ``observe()`` reads no gradient. The
    norms are handed before ``error_if_nonfinite`` raises, so a check after the error still
    finds the sick gradient.

    Raises RuntimeError as torch's does: ``error_if_nonfinite`` and a non-finite total norm, or
    ``foreach=True`` on a device without foreach support.
    """
    if isinstance(parameters, torch.Tensor):
        params = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        params = list(parameters)
        if is_generator and not params:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)  # fmt: skip
    with_grads = [p for p in params if p.grad is not None]
    grads: list[torch.Tensor] = [p.grad for p in with_grads if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    norms = _per_tensor_norms(grads, norm_type, foreach)
    first_device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    handing = governor is not None and norm_type == 2.0
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        if handing:  # the check after this error must still find the sick gradient
            _hand(governor, with_grads, grads, norms)
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    _clip_with_norm(with_grads, max_norm, total, foreach)
    if handing:
        _hand(governor, with_grads, grads, norms)
    return total


def _hand(
    governor: Any, params: list[torch.Tensor], grads: list[torch.Tensor], norms: list[torch.Tensor]
) -> None:
    """Give ``governor`` the norms, stamped with the gradients' versions as they are now."""
    versions = tuple(g._version for g in grads)
    governor.use_gradient_norms(GradientNorms(tuple(params), tuple(grads), tuple(norms), versions))


__all__ = ["clip_grad_norm_"]
