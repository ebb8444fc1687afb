"""The CPU health check through the compiled extension: one pass over every tensor, in place.

``torch._foreach_norm`` on CPU is a loop of separate reductions, about 2.5 µs of dispatch per
tensor before a byte is read (2 ms for a 292-tensor model's weights and gradients, four times
its memory time). ``tolaria._C.sum_squares_host`` (csrc/host_health.cpp) takes every tensor's
address, element count and dtype in one call and sums the squares of all of them in one pass
with the GIL released, on two threads or more once the bytes make that pay.

What it reads in place: contiguous fp32, fp16, bf16 and fp64 tensors (the order of elements
does not change a sum of squares). Everything else in the same call (integer buffers, strided
views, fp8) is checked by :func:`tolaria.health.reference.reference_check`, and the two halves
are merged in input order. A NaN or an Inf makes its tensor's sum non-finite; only such a
tensor is then counted element by element (NaN, +Inf, -Inf apart), as in the reference. A
finite tensor whose fp32 squares overflow comes out, as there, with an infinite norm and zero
non-finite elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import compress
from operator import attrgetter, is_not

import torch

from tolaria import _ext
from tolaria.addresses import addresses
from tolaria.health.kinds import readable_all
from tolaria.health.reference import count_nonfinite, reference_check, validate_tensors
from tolaria.health.report import HealthReport, build_report

#: The element types the compiled pass reads, by the codes csrc/host_health.h defines.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_dtype = attrgetter("dtype")
_numel, _is_contiguous = torch.Tensor.numel, torch.Tensor.is_contiguous
_code = DTYPE_CODES.get


def available() -> bool:
    """Whether the compiled extension is here to run the pass."""
    return _ext.extension() is not None


def native_check(names: Sequence[str], tensors: Sequence[torch.Tensor], *, threads: int = 0) -> HealthReport:
    """Check CPU ``tensors`` (see the module docstring); a :class:`HealthReport` in input order
    with ``backend="native"``. ``threads``: 0 lets the pass choose.

    Raises ValueError for differing lengths, tensors on several devices or off the CPU, or a
    tensor without data (meta, lazy); TypeError for a non-tensor; RuntimeError when the
    extension is unavailable (naming why). This is the one validation of a ``"native"`` call
    (:func:`tolaria.health.check_tensors` does not repeat it).
    """
    if len(names) != len(tensors):
        raise ValueError(f"names and tensors differ in length: {len(names)} != {len(tensors)}")
    extension = _ext.extension()
    if extension is None:
        why = _ext.unavailable_reason()
        raise RuntimeError(f"health backend 'native' needs tolaria's compiled extension: {why}")
    device = validate_tensors(names, tensors) if tensors else None
    tensors = readable_all(names, tensors)
    if device is not None and device.type != "cpu":
        raise ValueError(
            f"health backend 'native' reads CPU tensors, got tensors on {device}; "
            "use backend='auto' (Triton on CUDA) or 'reference'"
        )
    codes = list(map(_code, map(_dtype, tensors)))
    inline = list(map(is_not, codes, [None] * len(codes)))
    if all(inline):
        inline = list(map(_is_contiguous, tensors))
    else:
        inline = [known and tensor.is_contiguous() for known, tensor in zip(inline, tensors, strict=True)]
    read = list(compress(tensors, inline))
    with torch.no_grad():
        sums = extension.sum_squares_host(
            addresses(read), list(map(_numel, read)), list(compress(codes, inline)), threads
        )
    count = len(tensors)
    nan, posinf, neginf = [0] * count, [0] * count, [0] * count
    if len(read) == count:
        squares, norms = sums, list(map(math.sqrt, sums))
    else:  # the rest (integers, strided views, fp8) through the reference, merged in order
        rest = [index for index, known in enumerate(inline) if not known]
        other = reference_check([names[i] for i in rest], [tensors[i] for i in rest])
        squares, norms = [0.0] * count, [0.0] * count
        for index, value in zip(compress(range(count), inline), sums, strict=True):
            squares[index], norms[index] = value, math.sqrt(value)
        for position, index in enumerate(rest):
            norms[index] = other.norms[position]
            squares[index] = norms[index] * norms[index]
            nan[index], posinf[index] = other.nan[position], other.posinf[position]
            neginf[index] = other.neginf[position]
    if not all(map(math.isfinite, sums)):  # rare: a tensor is sick or overflows its squares
        for index, tensor in compress(enumerate(tensors), inline):
            if not math.isfinite(squares[index]):
                nan[index], posinf[index], neginf[index] = count_nonfinite(tensor)
    return build_report(names, norms, nan, posinf, neginf, "native", squares=squares)


__all__ = ["DTYPE_CODES", "available", "native_check"]
