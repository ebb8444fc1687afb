"""Fused NaN/Inf counting and L2 norms over many tensors: the Triton kernels and their launchers.

Two deterministic passes (no atomics anywhere):

1. ``_health_partials_kernel``, one launch per dtype group. Program ``p`` reads chunk ``p`` of
   the group; the group's chunk table gives the chunk's first element as a device address and
   its length. The hot loop does nothing but accumulate squares (fp32; fp64 for fp64 input).
   Squares are never negative, so the chunk's sum is NaN or +Inf exactly when the chunk holds a
   NaN or an Inf, or when finite squares overflow. Only then (rare) does the program read its
   chunk again (its tail block is still in registers) and count NaN, +Inf and -Inf exactly; a
   finite tensor whose squares overflow comes out with zero counts and an infinite norm, like
   the reference. One partial per chunk (sum of squares widened to fp64, three int32 counts)
   lands at ``chunk_base + p`` of buffers shared by all groups.
2. ``_health_finish_kernel``, one launch for all groups. Each program takes FINISH_ROWS
   tensors (in input order); each tensor's partials are one contiguous range, summed in a
   fixed order into column ``t`` of the result ``[4, T]`` fp64: sum of squares, NaN, +Inf,
   -Inf counts (exact in fp64 below 2**53). The host reads that one small buffer.

Tensors are addressed through int64 device addresses loaded from the chunk table and cast to
typed pointers, so one launch covers any number of tensors. Under ``TRITON_INTERPRET=1`` the
"device" addresses of CPU tensors are host addresses, which the interpreter dereferences just
the same: the identical code runs on CPU in the tests.

Import this module only after TRITON_INTERPRET has its final value: ``@triton.jit`` reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tolaria._ext import triton_interpreting

# Read the way Triton reads the flag (1/true/yes/on), so the dispatcher knows whether the kernels below
# were built for the interpreter (CPU tensors allowed) or for the GPU.
INTERPRETED: bool = triton_interpreting()

# Every chunk address is a multiple of this (unaligned tensors are staged by the plan; chunks
# start at multiples of BLOCK elements); the hint lets the compiler emit 16-byte vector loads
# through a pointer it cannot see.
ADDRESS_ALIGNMENT = 16

_ELEMENT_TYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(_ELEMENT_TYPES)

# The finishing pass sums FINISH_BLOCK partials per step for FINISH_ROWS tensors per program;
# both are fixed, so the summation order (and every bit of the result) is too. Few rows and a
# wide block: a long tensor's range (GPT-2's embedding has ~1200 chunks) takes few dependent
# steps, and the program stays at 64 registers.
FINISH_ROWS = 2
FINISH_BLOCK = 256

# Plain ints, not constexprs: specializing on their values would compile a variant per plan.
_RUNTIME_INTS = ["num_chunks", "chunk_base", "total_chunks"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _health_partials_kernel(
    chunk_table,
    partial_sumsq,
    partial_counts,
    num_chunks,
    chunk_base,
    total_chunks,
    ELEMENT: tl.constexpr,
    ACCUMULATOR: tl.constexpr,
    ALIGNMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # Two independent loads (address, length): one memory latency before the data streams.
    base = tl.load(chunk_table + pid).to(tl.pointer_type(ELEMENT))
    length = tl.load(chunk_table + num_chunks + pid).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    full = length // BLOCK * BLOCK

    # The hot loop: one load and one fused multiply-add per element, nothing else.
    # Full blocks load without a mask (a mask against an arbitrary length defeats vector
    # loads); `base` is ALIGNMENT-byte aligned and `offset` a multiple of BLOCK (the plan's
    # promise), hence 16-byte vector loads.
    sumsq = tl.zeros([BLOCK], dtype=ACCUMULATOR)
    for offset in range(0, full, BLOCK):
        pointers = tl.max_contiguous(tl.multiple_of(base + offset + lanes, [ALIGNMENT]), [BLOCK])
        x = tl.load(pointers).to(ACCUMULATOR)
        sumsq += x * x
    index = full + lanes
    x = tl.load(base + index, mask=index < length, other=0.0).to(ACCUMULATOR)
    sumsq += x * x
    total = tl.sum(sumsq, axis=0)

    # The sick path: only a chunk whose sum is NaN or +Inf reads its full blocks again, with
    # the same vector loads, and counts; the tail block is still in registers. The three
    # per-lane counts share one int32 in 10-bit fields (NaN, +Inf << 10, -Inf << 20): a lane
    # sees one element per block of the chunk, at most MAX_CHUNK_BLOCKS + 1 < 1024.
    inf = float("inf")
    flags = (x != x).to(tl.int32) + ((x == inf).to(tl.int32) << 10) + ((x == -inf).to(tl.int32) << 20)
    count_end = tl.where((total != total) | (total == inf), full, 0)
    for offset in range(0, count_end, BLOCK):
        pointers = tl.max_contiguous(tl.multiple_of(base + offset + lanes, [ALIGNMENT]), [BLOCK])
        y = tl.load(pointers).to(ACCUMULATOR)  # exact
        flags += (y != y).to(tl.int32) + ((y == inf).to(tl.int32) << 10) + ((y == -inf).to(tl.int32) << 20)

    slot = chunk_base + pid
    tl.store(partial_sumsq + slot, total.to(tl.float64))
    tl.store(partial_counts + slot, tl.sum(flags & 1023, axis=0))
    tl.store(partial_counts + total_chunks + slot, tl.sum((flags >> 10) & 1023, axis=0))
    tl.store(partial_counts + 2 * total_chunks + slot, tl.sum(flags >> 20, axis=0))


@triton.jit(do_not_specialize=["num_tensors", "total_chunks"])
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
    """Elements per program iteration: 16 per thread of NUM_WARPS warps (8 for fp64).

    Sixteen fp32 elements are four 16-byte loads in flight per thread, with ~40 registers:
    enough resident threads per SM to cover HBM latency several times over.
    """
    return 1024 if dtype == torch.float64 else 2048


# Chunks of 16 blocks (128 KiB of fp32, 64 KiB of fp16/bf16) give ~8000 programs per GiB: short
# programs keep the last wave's tail small on a model of a few hundred MB, and the tables and
# the finishing pass stay small.
CHUNK_BLOCKS = 16
MAX_CHUNK_BLOCKS = 1022  # keeps the sick path's 10-bit per-lane count fields below 1024
NUM_WARPS = 4


def partials_constants(dtype: torch.dtype, block: int) -> dict[str, object]:
    """The compile-time arguments of the partials kernel for one dtype group (one variant each)."""
    return {
        "ELEMENT": _ELEMENT_TYPES[dtype],
        "ACCUMULATOR": tl.float64 if dtype == torch.float64 else tl.float32,
        "ALIGNMENT": ADDRESS_ALIGNMENT,
        "BLOCK": block,
    }


FINISH_CONSTANTS: dict[str, object] = {"ROWS": FINISH_ROWS, "BLOCK": FINISH_BLOCK}


def launch_partials(
    *,
    chunk_table: torch.Tensor,
    partial_sumsq: torch.Tensor,
    partial_counts: torch.Tensor,
    chunk_base: int,
    num_chunks: int,
    total_chunks: int,
    dtype: torch.dtype,
    block: int,
) -> None:
    """Enqueue the partials pass for one dtype group.

    ``chunk_table`` is int64 ``[2, num_chunks]``: each chunk's first element as a device
    address (ADDRESS_ALIGNMENT-aligned), then its length in elements (at most 1022 blocks).
    """
    _health_partials_kernel[(num_chunks,)](
        chunk_table,
        partial_sumsq,
        partial_counts,
        num_chunks,
        chunk_base,
        total_chunks,
        **partials_constants(dtype, block),
        num_warps=NUM_WARPS,
    )


def finish_trips(chunks_per_tensor: torch.Tensor) -> torch.Tensor:
    """Per finishing program, the longest partial range of its FINISH_ROWS tensors, in blocks.

    ``chunks_per_tensor`` is int64 ``[T]`` in input order; returns int64 ``[ceil(T / ROWS)]``.
    """
    padded = torch.nn.functional.pad(chunks_per_tensor, (0, -chunks_per_tensor.numel() % FINISH_ROWS))
    return (padded.view(-1, FINISH_ROWS).amax(dim=1) + FINISH_BLOCK - 1) // FINISH_BLOCK


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
        **FINISH_CONSTANTS,
        num_warps=NUM_WARPS,
    )
