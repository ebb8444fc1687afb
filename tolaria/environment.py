"""Building models for a task on a checked device: ``create_model``, ``parse_device``,
``validate_device``.

``parse_device`` only understands the string; ``validate_device`` also checks that the
device can hold a model and exists on this machine, so a typo, an unsupported backend or a
missing GPU fails before any model is built. The error wording is the original esper-lite's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tolaria.morphogenesis import MorphogeneticModel, validate_slots
from tolaria.tasks import get_task_spec

#: Device types ``parse_device`` understands; "auto" resolves to cuda when available, else cpu.
#: ``meta`` is among them (shape-only construction) but cannot hold a model's data.
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps", "meta")
#: Device types ``validate_device`` and ``create_model`` accept: the ones tolaria can train on.
MODEL_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")
_ACCEPTED = "'auto', 'cpu', 'cuda', 'cuda:N' (N >= 0), 'mps', 'meta' or a torch.device"
_ACCEPTED_FOR_MODELS = "'auto', 'cpu', 'cuda', 'cuda:N' (N >= 0), 'mps' or a torch.device"


def parse_device(device: str | torch.device) -> torch.device:
    """Turn ``device`` into a ``torch.device`` without checking that it exists.

    ``"auto"`` becomes ``cuda`` when CUDA is available and ``cpu`` otherwise; surrounding
    whitespace and case are ignored.

    Raises:
        ValueError: ``Invalid device '<device>': ...`` for a string torch cannot parse, and
            ``Unsupported device type '<type>' (from '<device>')`` for a device type outside
            :data:`DEVICE_TYPES` (xpu, xla, hpu, ...); both list the accepted forms.
        TypeError: ``device`` is neither a str nor a torch.device.
    """
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        text = device.strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            parsed = torch.device(text)
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"Invalid device '{device}': it is not a valid device string ({error}); "
                f"pass device= one of {_ACCEPTED}"
            ) from None
    else:
        raise TypeError(f"device must be a str or torch.device ({_ACCEPTED}), got {type(device).__name__}")
    if parsed.type not in DEVICE_TYPES:
        raise _unsupported(parsed, device, _ACCEPTED)
    return parsed


def validate_device(device: str | torch.device, *, require_explicit_index: bool = False) -> torch.device:
    """:func:`parse_device`, then check that a model can live on the device here.

    With ``require_explicit_index=True`` a CUDA device must name its index (``cuda:0``, not
    ``cuda``); ``"auto"`` then resolves to the current CUDA device's explicit index.

    Raises:
        ValueError: what :func:`parse_device` raises; ``Unsupported device type '<type>'
            (from '<device>')`` for a type outside :data:`MODEL_DEVICE_TYPES` (``meta`` too:
            it holds no data); a bare ``cuda`` when ``require_explicit_index`` is set; an MPS
            index other than 0 (there is one MPS device).
        TypeError: ``device`` is neither a str nor a torch.device.
        RuntimeError: CUDA (or MPS) is requested but not available, or a CUDA index is out of
            range (naming how many devices exist).
    """
    parsed = parse_device(device)
    if parsed.type not in MODEL_DEVICE_TYPES:
        raise _unsupported(parsed, device, _ACCEPTED_FOR_MODELS)
    is_auto = isinstance(device, str) and device.strip().lower() == "auto"
    if parsed.type == "cuda" and parsed.index is None and require_explicit_index and not is_auto:
        raise ValueError(
            f"device '{device}' names no CUDA index and require_explicit_index=True; "
            "pass 'cuda:N' (e.g. 'cuda:0')"
        )
    if parsed.type == "mps" and parsed.index not in (None, 0):
        raise ValueError(f"device '{device}' does not exist: there is one MPS device; use 'mps' or 'mps:0'")
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
        if parsed.index is None and require_explicit_index:
            # Only "auto" gets here: the machine picked CUDA, so it picks the index too.
            parsed = torch.device("cuda", torch.cuda.current_device())
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={device!r} was requested but MPS is not available on this machine")
    return parsed


def _unsupported(parsed: torch.device, device: str | torch.device, accepted: str) -> ValueError:
    """The ValueError for a device of a type tolaria does not take (``accepted`` lists what it does)."""
    return ValueError(
        f"Unsupported device type '{parsed.type}' (from '{device}'); pass device= one of {accepted}"
    )


def create_model(
    task: str = "cifar10",
    device: str | torch.device = "cuda",
    *,
    slots: Sequence[str],
    permissive_gates: bool = True,
) -> MorphogeneticModel:
    """A fresh :class:`MorphogeneticModel` for ``task`` on ``device`` with seed ``slots``.

    Everything is checked before anything is built. Raises ValueError for an unknown task
    (listing the tasks), a bad or unsupported device (see :func:`validate_device`), and empty,
    duplicate or unknown slots (listing the task's valid slot ids); RuntimeError for a device
    missing on this machine.
    """
    spec = get_task_spec(task)
    resolved = validate_device(device)
    chosen = validate_slots(slots, spec.slot_ids)
    return spec.create_model(device=resolved, slots=chosen, permissive_gates=permissive_gates)


__all__ = ["DEVICE_TYPES", "MODEL_DEVICE_TYPES", "create_model", "parse_device", "validate_device"]
