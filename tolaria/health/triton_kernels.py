"""Fused NaN/Inf counting and L2 norms over many tensors: the Triton kernels and their launchers.

Two deterministic passes (no atomics anywhere):

1. ``_health_partials_kernel``, one launch per dtype group. Program ``p`` reads chunk ``p`` of
   the group: the chunk table gives its tensor (an index into the group's pointer and numel
   tables) and its first element; the chunk ends ``chunk_size`` elements later or at the
   tensor's end. It writes one partial per chunk (sum of squares as fp64, three int32 counts)
   at ``chunk_base + p`` of buffers shared by all groups.
2. ``_health_finish_kernel``, one launch for all groups. Each program takes FINISH_ROWS
   tensors (in input order); each tensor's partials are one contiguous range, summed in a
   fixed order into column ``t`` of the result ``[4, T]`` fp64: sum of squares, NaN, +Inf,
   -Inf counts (exact in fp64 below 2**53). The host reads that one small buffer.

Per element: NaN is ``x != x``; +Inf and -Inf are compared apart; squares accumulate in fp32
(fp64 for fp64 input), and each chunk's sum is widened to fp64 before the finishing pass.

Tensors are addressed through int64 device addresses loaded from the pointer table and cast
to typed pointers, so one launch covers any number of tensors. Under ``TRITON_INTERPRET=1``
the "device" addresses of CPU tensors are host addresses, which the interpreter dereferences
just the same: the identical code runs on CPU in the tests.

Import this module only after TRITON_INTERPRET has its final value: ``@triton.jit`` reads it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Mirrors Triton's own parsing of the flag, so the dispatcher knows whether the kernels below
# were built for the interpreter (CPU tensors allowed) or for the GPU.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

# Every table address is a multiple of this (unaligned tensors are staged by the plan); the
# hint lets the compiler emit 16-byte vector loads through a pointer it cannot see.
ADDRESS_ALIGNMENT = 16

_ELEMENT_TYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(_ELEMENT_TYPES)

# The finishing pass sums FINISH_BLOCK partials per step for FINISH_ROWS tensors per program;
# both are fixed, so the summation order (and every bit of the result) is too.
FINISH_ROWS = 16
FINISH_BLOCK = 64


@triton.jit
def _health_partials_kernel(
    ptr_table,
    numel_table,
    chunk_tensor,
    chunk_start,
    partial_sumsq,
    partial_counts,
    chunk_base,
    total_chunks,
    chunk_size,
    ELEMENT: tl.constexpr,
    ACCUMULATOR: tl.constexpr,
    ALIGNMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    end = tl.minimum(start + chunk_size, tl.load(numel_table + tensor))
    base = tl.load(ptr_table + tensor).to(tl.pointer_type(ELEMENT))

    lanes = tl.arange(0, BLOCK)
    sumsq = tl.zeros([BLOCK], dtype=ACCUMULATOR)
    # NaN is the only value unequal to itself. The three per-lane counts share one int32 in
    # 10-bit fields (NaN, +Inf << 10, -Inf << 20): a lane sees at most chunk_size // BLOCK + 1
    # elements per chunk, which the launcher keeps below 1024, so the fields never carry.
    flags = tl.zeros([BLOCK], dtype=tl.int32)
    inf = float("inf")
    # Full blocks load without a mask (a mask against an arbitrary `end` defeats vector loads).
    # The compiler cannot see an address loaded from a table, so say what the plan guarantees:
    # `base` is ALIGNMENT-byte aligned and `offset` a multiple of BLOCK (chunk starts are
    # multiples of chunk_size, itself a multiple of BLOCK), hence 16-byte vector loads.
    full_end = start + (end - start) // BLOCK * BLOCK
    for offset in range(start, full_end, BLOCK):
        pointers = tl.max_contiguous(tl.multiple_of(base + offset + lanes, [ALIGNMENT]), [BLOCK])
        x = tl.load(pointers).to(ACCUMULATOR)
        sumsq += x * x
        flags += (x != x).to(tl.int32) + ((x == inf).to(tl.int32) << 10) + ((x == -inf).to(tl.int32) << 20)
    index = full_end + lanes
    x = tl.load(base + index, mask=index < end, other=0.0).to(ACCUMULATOR)
    sumsq += x * x
    flags += (x != x).to(tl.int32) + ((x == inf).to(tl.int32) << 10) + ((x == -inf).to(tl.int32) << 20)

    slot = chunk_base + pid
    tl.store(partial_sumsq + slot, tl.sum(sumsq, axis=0).to(tl.float64))
    tl.store(partial_counts + slot, tl.sum(flags & 1023, axis=0))
    tl.store(partial_counts + total_chunks + slot, tl.sum((flags >> 10) & 1023, axis=0))
    tl.store(partial_counts + 2 * total_chunks + slot, tl.sum(flags >> 20, axis=0))


@triton.jit
def _health_finish_kernel(
    partial_sumsq,
    partial_counts,
    tensor_chunks,
    finish_trips,
    out,
    num_tensors,
    total_chunks,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ROWS tensors per program, each summing its own contiguous range of partials BLOCK at a
    # time; `finish_trips` (from the plan) is the longest range of the program's rows in blocks.
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    live = rows < num_tensors
    begin = tl.load(tensor_chunks + rows, mask=live, other=0)
    end = tl.load(tensor_chunks + num_tensors + rows, mask=live, other=0)
    lanes = tl.arange(0, BLOCK)
    sumsq = tl.zeros([ROWS, BLOCK], dtype=tl.float64)
    nan = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
    posinf = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
    neginf = tl.zeros([ROWS, BLOCK], dtype=tl.int64)
    for step in range(0, tl.load(finish_trips + pid)):
        index = begin[:, None] + step * BLOCK + lanes[None, :]
        mask = index < end[:, None]
        sumsq += tl.load(partial_sumsq + index, mask=mask, other=0.0)
        nan += tl.load(partial_counts + index, mask=mask, other=0).to(tl.int64)
        posinf += tl.load(partial_counts + total_chunks + index, mask=mask, other=0).to(tl.int64)
        neginf += tl.load(partial_counts + 2 * total_chunks + index, mask=mask, other=0).to(tl.int64)
    tl.store(out + rows, tl.sum(sumsq, axis=1), mask=live)
    tl.store(out + num_tensors + rows, tl.sum(nan, axis=1).to(tl.float64), mask=live)
    tl.store(out + 2 * num_tensors + rows, tl.sum(posinf, axis=1).to(tl.float64), mask=live)
    tl.store(out + 3 * num_tensors + rows, tl.sum(neginf, axis=1).to(tl.float64), mask=live)


def block_size(dtype: torch.dtype) -> int:
    """Elements per program iteration: 16 KiB of fp64/fp32, 8 KiB of fp16/bf16 (registers)."""
    return 2048 if dtype == torch.float64 else 4096


# Chunks of 16 blocks (256 KiB of fp32) give ~4000 programs per GiB: enough to fill any GPU,
# few enough that the chunk table and the finishing pass stay small.
CHUNK_BLOCKS = 16
MAX_CHUNK_BLOCKS = 1022  # keeps the kernel's 10-bit per-lane count fields below 1024
_NUM_WARPS = 8


def launch_partials(
    *,
    ptr_table: torch.Tensor,
    numel_table: torch.Tensor,
    chunk_tensor: torch.Tensor,
    chunk_start: torch.Tensor,
    partial_sumsq: torch.Tensor,
    partial_counts: torch.Tensor,
    chunk_base: int,
    num_chunks: int,
    total_chunks: int,
    chunk_size: int,
    dtype: torch.dtype,
    block: int,
) -> None:
    """Enqueue the partials pass for one dtype group of ``num_chunks`` chunks (int64 tables)."""
    _health_partials_kernel[(num_chunks,)](
        ptr_table,
        numel_table,
        chunk_tensor,
        chunk_start,
        partial_sumsq,
        partial_counts,
        chunk_base,
        total_chunks,
        chunk_size,
        ELEMENT=_ELEMENT_TYPES[dtype],
        ACCUMULATOR=tl.float64 if dtype == torch.float64 else tl.float32,
        ALIGNMENT=ADDRESS_ALIGNMENT,
        BLOCK=block,
        num_warps=_NUM_WARPS,
    )


def finish_trips(chunk_begin: list[int], chunk_end: list[int]) -> list[int]:
    """Per finishing program, the longest partial range of its FINISH_ROWS tensors, in blocks."""
    lengths = [end - begin for begin, end in zip(chunk_begin, chunk_end, strict=True)]
    return [
        -(-max(lengths[first : first + FINISH_ROWS]) // FINISH_BLOCK)
        for first in range(0, len(lengths), FINISH_ROWS)
    ]


def launch_finish(
    *,
    partial_sumsq: torch.Tensor,
    partial_counts: torch.Tensor,
    tensor_chunks: torch.Tensor,
    trips: torch.Tensor,
    out: torch.Tensor,
    num_tensors: int,
    total_chunks: int,
) -> None:
    """Enqueue the finishing pass: ``out[4, num_tensors]`` from the per-chunk partials.

    ``tensor_chunks`` is int64 ``[2, num_tensors]`` (each tensor's first and past-the-end chunk);
    ``trips`` comes from :func:`finish_trips`.
    """
    _health_finish_kernel[(trips.numel(),)](
        partial_sumsq,
        partial_counts,
        tensor_chunks,
        trips,
        out,
        num_tensors,
        total_chunks,
        ROWS=FINISH_ROWS,
        BLOCK=FINISH_BLOCK,
        num_warps=4,
    )
