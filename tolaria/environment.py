"""Building models for a task on a checked device: ``create_model``, ``parse_device``,
``validate_device``.

``parse_device`` only understands the string; ``validate_device`` also checks that the
device exists on this machine, so a typo or a missing GPU fails before any model is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tolaria.morphogenesis import MorphogeneticModel, validate_slots
from tolaria.tasks import get_task_spec

#: Device types tolaria builds models on; "auto" resolves to cuda when available, else cpu.
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps", "meta")
_ACCEPTED = "'auto', 'cpu', 'cuda', 'cuda:N' (N >= 0), 'mps', 'meta' or a torch.device"


def parse_device(device: str | torch.device) -> torch.device:
    """Turn ``device`` into a ``torch.device`` without checking that it exists.

    ``"auto"`` becomes ``cuda`` when CUDA is available and ``cpu`` otherwise; surrounding
    whitespace and case are ignored. Raises ValueError for a string that is not a device
    of a supported type, TypeError for anything that is neither a str nor a torch.device.
    """
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        text = device.strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            parsed = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"device={device!r} is not a valid device; accepted: {_ACCEPTED}") from None
    else:
        raise TypeError(f"device must be a str or torch.device ({_ACCEPTED}), got {type(device).__name__}")
    if parsed.type not in DEVICE_TYPES:
        raise ValueError(f"device={device!r} has unsupported type {parsed.type!r}; accepted: {_ACCEPTED}")
    return parsed


def validate_device(device: str | torch.device) -> torch.device:
    """:func:`parse_device`, then check that the device exists here.

    Raises RuntimeError when CUDA (or MPS) is requested but not available, and when a CUDA
    index is out of range (naming how many devices exist).
    """
    parsed = parse_device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            valid = f"cuda:0..cuda:{count - 1}" if count > 1 else "cuda:0"
            raise RuntimeError(
                f"device={device!r} does not exist: this machine has {count} CUDA device(s) ({valid})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={device!r} was requested but MPS is not available on this machine")
    return parsed


def create_model(
    task: str = "cifar10",
    device: str | torch.device = "cuda",
    *,
    slots: Sequence[str],
    permissive_gates: bool = True,
) -> MorphogeneticModel:
    """A fresh :class:`MorphogeneticModel` for ``task`` on ``device`` with seed ``slots``.

    Everything is checked before anything is built. Raises ValueError for an unknown task
    (listing the tasks), a bad device string, and empty, duplicate or unknown slots
    (listing the task's valid slot ids); RuntimeError for a device missing on this machine.
    """
    spec = get_task_spec(task)
    resolved = validate_device(device)
    chosen = validate_slots(slots, spec.slot_ids)
    return spec.create_model(device=resolved, slots=chosen, permissive_gates=permissive_gates)


__all__ = ["DEVICE_TYPES", "create_model", "parse_device", "validate_device"]
