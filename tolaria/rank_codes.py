"""What a rank writes into its slot of the Governor's one all-reduce: a reason code, and which
tensor was sick first.

Codes (:data:`REASON_PRIORITY`) run from the least to the most severe, so ``MAX`` over the slots
is the group's reason. A health panic's slot also carries the position of its first sick tensor
in the names every rank checks and a checksum of that name (:func:`encode_slot`), so a rank that
saw nothing names the same tensor, e.g. the full name of a parameter whose local shard went NaN
on one rank under FSDP2; a rank whose list holds another name there (a pipeline stage) names
none (:func:`decode_slot`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from tolaria.vitals import (
    REASON_DIVERGENCE,
    REASON_GRAD_EXPLOSION,
    REASON_LOBOTOMY,
    REASON_NAN,
    REASON_NONFINITE_GRADS,
    REASON_NONFINITE_PARAMS,
    REASON_RESTORE_INCOMPLETE,
)

#: Panic reasons from the least to the most severe; a reason's code is its index + 1, and the
#: group reports the most severe reason any rank saw. Non-finite evidence outranks statistics;
#: corrupt weights (already broken) outrank corrupt gradients (about to break them), which
#: outrank a non-finite loss (often just one bad batch); a lobotomy is certain, a divergence or a
#: gradient explosion is a statistical judgement. A half-finished restore outranks them all: the
#: weights are known to be a mix of two states.
REASON_PRIORITY: tuple[str, ...] = (
    REASON_DIVERGENCE,
    REASON_GRAD_EXPLOSION,
    REASON_LOBOTOMY,
    REASON_NAN,
    REASON_NONFINITE_GRADS,
    REASON_NONFINITE_PARAMS,
    REASON_RESTORE_INCOMPLETE,
)
CODE_HEALTHY = 0
#: A rank raised during its local check; outranks every panic.
CODE_RANK_ERROR = len(REASON_PRIORITY) + 1

# An exchanged slot: the code in the low bits, then 1 + the position of the first sick tensor
# among the names every rank checks (0: none), then a 31-bit CRC of that name.
CODE_BITS = 4
_INDEX_BITS = 27
CODE_MASK = (1 << CODE_BITS) - 1
_INDEX_MASK = (1 << _INDEX_BITS) - 1
assert CODE_RANK_ERROR <= CODE_MASK


def _name_crc(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def encode_slot(code: int, first_bad: str | None, names: Sequence[str]) -> int:
    """The value a rank writes into its slot: ``code`` plus, when ``first_bad`` is one of
    ``names``, its position and name checksum."""
    if first_bad is None:
        return code
    try:
        position = list(names).index(first_bad)
    except ValueError:
        return code
    if position >= _INDEX_MASK:
        return code
    return code | (position + 1) << CODE_BITS | _name_crc(first_bad) << (CODE_BITS + _INDEX_BITS)


def decode_slot(value: int, names: Sequence[str]) -> tuple[int, str | None]:
    """``(code, first sick tensor)`` of an exchanged slot; the name only when this rank's
    ``names`` hold the same name (checksum) at the same position."""
    code = value & CODE_MASK
    position = (value >> CODE_BITS & _INDEX_MASK) - 1
    if position < 0 or position >= len(names):
        return code, None
    name = names[position]
    return code, name if _name_crc(name) == value >> (CODE_BITS + _INDEX_BITS) else None


def reason_code(reason: str) -> int:
    """The code of a panic reason (see :data:`REASON_PRIORITY`); ValueError for an unknown one."""
    try:
        return REASON_PRIORITY.index(reason) + 1
    except ValueError:
        raise ValueError(f"unknown panic reason {reason!r}; known: {REASON_PRIORITY}") from None


def reason_of(code: int) -> str | None:
    """Inverse of :func:`reason_code`; None for :data:`CODE_HEALTHY`."""
    return None if code == CODE_HEALTHY else REASON_PRIORITY[code - 1]


__all__ = [
    "CODE_BITS",
    "CODE_HEALTHY",
    "CODE_MASK",
    "CODE_RANK_ERROR",
    "REASON_PRIORITY",
    "decode_slot",
    "encode_slot",
    "reason_code",
    "reason_of",
]
