"""Cached launch plans for the fused health kernel: tables, staging, result buffers, CUDA graph.

A plan belongs to one tensor set. Building it sorts the tensors into kernel dtype groups, lays
out the chunks, uploads the int64 tables in one asynchronous copy and allocates every buffer a
check writes. A check with a cached plan creates no device tensors: it refreshes the staging
copies, enqueues the launches (or replays them) and copies the ``[4, T]`` result into a pinned
slot behind an event. Plans are cached least-recently-used, eight at most; not thread-safe
(the Governor is not).

Finding the plan of a call costs one ``data_ptr()`` per tensor (the cache key) and one pointer
comparison per tensor in C (``tolaria._C.untrusted``; ``id()`` in Python without the
extension). Trust is per tensor: a tensor is trusted once it was the same live object at its
index in two checks in a row, on the same live storage. Weak references to the tensor and to its
storage end the trust when one dies, and an index whose trust ended is compared from then on
(gradients freed every step come back as new objects; the parameters beside them stay trusted).
Two live storages never share an address, so a tensor whose ``.data`` moved away and back to the
same address is on a new storage and is compared again. Every untrusted tensor has its byte
size, dtype and contiguity compared, plus shape and strides wherever contiguity alone does not
prove that the kernel reads the right elements (staged tensors, and dense tensors read in place
that are not contiguous, such as ``w.t()``). Not detected: an in-place metadata change of a
trusted tensor on the same storage at the same address (``resize_``, ``as_strided_``,
``.data = p.data[:k]`` or ``.view(other_dtype)``); comparing metadata per call would double the
host cost of a check.

How tensors reach the kernel:

- dense tensors (contiguous, or a permutation of a contiguous block such as ``w.t()`` or
  channels-last) whose address is 16-byte aligned are read in place: counts and sums of squares
  do not depend on element order, and such a tensor covers exactly ``numel`` elements starting
  at ``data_ptr()`` (strides are never negative in torch);
- other float tensors (strided slices, expanded views, unaligned views, fp8) are copied into a
  contiguous staging buffer of a kernel dtype before each check, so they are never skipped;
- integer and bool tensors skip the kernel; their norm comes from the reference.

CUDA graph: the first reuse of a plan launches eagerly as usual, then captures the same
launches as a graph, replays it and compares the replay's result with the eager one bit for
bit ON THE DEVICE; the verdict lands in pinned memory behind an event. A later check adopts the
graph once that event has completed (``query()``, never a wait) and the verdict says equal;
until then, and forever after a mismatch or any capture error, checks launch eagerly. No step
of this blocks the host. ``TOLARIA_HEALTH_CUDA_GRAPH=0`` (read when a plan is built) keeps
eager launches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch

from tolaria import _ext
from tolaria.addresses import addresses
from tolaria.health import triton_kernels as kernels
from tolaria.health.device import DeviceRuntime
from tolaria.health.reference import integer_norm
from tolaria.health.report import PendingHealth, ResultSlot

_CACHE_SIZE = 8  # parameters, gradients, snapshot staging, with room for a few more
_plans: OrderedDict[tuple[int, ...], TritonPlan] = OrderedDict()
_log = logging.getLogger(__name__)

_nbytes = attrgetter("nbytes")
_dtype = attrgetter("dtype")
_is_contiguous = torch.Tensor.is_contiguous


# A plan's trust state per tensor (one byte each; the compiled scan reads the same values).
NOT_TRUSTED, TRUSTED, TRUST_ENDED = 0, 1, 2
_compiled_untrusted = _ext.compiled("untrusted")  # None: compared in Python


def untrusted_in_python(
    tensors: Sequence[Any], trusted_ids: list[int], state: bytearray, seen_ids: list[int]
) -> tuple[list[int], list[int]]:
    """The twin of ``tolaria._C.untrusted``: ``(compare, repeated)``. ``compare`` holds every
    index whose tensor is not the trusted object there; of those never trusted, ``repeated``
    holds the ones whose tensor is the object seen there last time, and the others' ``seen_ids``
    entries become their ids."""
    if not len(tensors) == len(trusted_ids) == len(state) == len(seen_ids):
        raise ValueError("objects, trusted_ids, state and seen_ids must have the same length")
    compare: list[int] = []
    repeated: list[int] = []
    for index, tensor in enumerate(tensors):
        at = state[index]
        if at == TRUSTED and id(tensor) == trusted_ids[index]:
            continue
        compare.append(index)
        if at != NOT_TRUSTED:
            continue
        if id(tensor) == seen_ids[index]:
            repeated.append(index)
        else:
            seen_ids[index] = id(tensor)
    return compare, repeated


def _untrusted(
    tensors: Sequence[torch.Tensor], trusted_ids: list[int], state: bytearray, seen_ids: list[int]
) -> tuple[list[int], list[int]]:
    """:func:`untrusted_in_python`, in one C loop when the extension is loaded."""
    if _compiled_untrusted is not None and isinstance(tensors, (list, tuple)):
        compare, repeated = _compiled_untrusted(tensors, trusted_ids, state, seen_ids)
        return compare, repeated
    return untrusted_in_python(tensors, trusted_ids, state, seen_ids)


def graphs_enabled() -> bool:
    """``TOLARIA_HEALTH_CUDA_GRAPH=0`` replays nothing: every check launches its kernels."""
    return os.environ.get("TOLARIA_HEALTH_CUDA_GRAPH", "1") != "0"


def find_plan(tensors: Sequence[torch.Tensor]) -> TritonPlan | None:
    """The cached plan that reads exactly ``tensors``, or None; TypeError for a non-tensor."""
    plan = _plans.get(addresses(tensors))
    if plan is None or not plan.accepts(tensors):
        return None
    _plans.move_to_end(plan.addresses)
    return plan


def build_plan(
    tensors: Sequence[torch.Tensor],
    *,
    block: int | None = None,
    chunk_blocks: int | None = None,
    runtime: DeviceRuntime | None = None,
) -> TritonPlan:
    """Build a plan; cache it unless the geometry or the runtime was overridden (tests)."""
    plan = TritonPlan(tensors, block=block, chunk_blocks=chunk_blocks, runtime=runtime)
    if block is None and chunk_blocks is None and runtime is None:
        _plans[plan.addresses] = plan
        _plans.move_to_end(plan.addresses)
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def clear_plans() -> None:
    """Drop every cached plan and the device memory it holds."""
    _plans.clear()


_CUDA = DeviceRuntime()  # the real one; tests pass a fake as ``runtime``
_cpu_runtime: DeviceRuntime | None = None  # CPU plans take the device path with this (bench)


def cpu_runtime() -> DeviceRuntime | None:
    """The runtime that CPU tensors' plans use, or None (they run the kernels in the interpreter)."""
    return _cpu_runtime


@contextlib.contextmanager
def use_cpu_runtime(runtime: DeviceRuntime) -> Iterator[None]:
    """Within this block, plans for CPU tensors take the device path with ``runtime`` (the
    bench's fake device measures a check's host cost this way); the plan cache is emptied on the
    way in and out, so no plan outlives the runtime it was built with."""
    global _cpu_runtime
    clear_plans()
    _cpu_runtime = runtime
    try:
        yield
    finally:
        _cpu_runtime = None
        clear_plans()


def _is_dense(tensor: torch.Tensor) -> bool:
    """True when the elements fill ``numel`` consecutive slots in some order, without overlap."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class _Group:
    dtype: torch.dtype
    block: int
    chunk_base: int
    num_chunks: int
    chunk_table: torch.Tensor  # int64 [2, num_chunks] on the device: addresses, lengths


class TritonPlan:
    """Device tables and buffers for one tensor set; see the module docstring."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        block: int | None = None,
        chunk_blocks: int | None = None,
        runtime: DeviceRuntime | None = None,
    ) -> None:
        chunk_blocks = kernels.CHUNK_BLOCKS if chunk_blocks is None else chunk_blocks
        if not 1 <= chunk_blocks <= kernels.MAX_CHUNK_BLOCKS:
            raise ValueError(f"chunk_blocks must be in [1, {kernels.MAX_CHUNK_BLOCKS}], got {chunk_blocks}")
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        self.device = tensors[0].device
        self.num_tensors = len(tensors)
        self.addresses = addresses(tensors)
        self.metadata = self._metadata(tensors)
        self.integers: list[int] = []
        self.staged: list[tuple[int, torch.Tensor]] = []  # (input index, staging buffer)
        members: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
        permuted: list[int] = []  # dense but not contiguous, read in place
        for index, tensor in enumerate(tensors):
            if not tensor.is_floating_point():
                self.integers.append(index)
                continue
            source = tensor.detach()
            kernel_dtype = tensor.dtype if tensor.dtype in kernels.KERNEL_DTYPES else torch.float32
            in_place = (
                kernel_dtype == tensor.dtype
                and _is_dense(tensor)
                and tensor.data_ptr() % kernels.ADDRESS_ALIGNMENT == 0
            )
            if not in_place and tensor.numel():
                source = torch.empty(tensor.shape, dtype=kernel_dtype, device=self.device)
                self.staged.append((index, source))
            elif in_place and not tensor.is_contiguous():
                permuted.append(index)
            members.setdefault(kernel_dtype, []).append((index, source))
        # Whose shape and strides a new call must match: a staged copy has this plan's shape,
        # and a permuted dense tensor is read in place only while its layout is unchanged.
        self._layout_checked = sorted([index for index, _ in self.staged] + permuted)
        self.checked_layout = self._layout(tensors, self._layout_checked)
        self._build_tables(members, block, chunk_blocks)
        # Zeroed, so a runtime that skips the kernels (the bench's fake device) reads a healthy set.
        self.out = torch.zeros((4, self.num_tensors), dtype=torch.float64, device=self.device)

        # The device path (CUDA, or a fake in tests and the bench); None: CPU tensors under the
        # interpreter.
        default = _CUDA if self.device.type == "cuda" else _cpu_runtime
        self._runtime = runtime if runtime is not None else default
        self.slots: list[ResultSlot] = []
        self.graph: Any = None  # the adopted CUDA graph, replayed by every check
        self._trial: tuple[Any, torch.Tensor, Any] | None = None  # (graph, verdict, event) pending
        # Captured at the first reuse, not at build: a set seen once (gradients that land at new
        # addresses every step) should not pay for a capture.
        self._graph_wanted = self._runtime is not None and graphs_enabled()
        if self._runtime is None and kernels.INTERPRETED:  # interpreted kernels cannot be captured
            self._graph_wanted = False
        self._launches = 0
        self._stream_raw: int | None = None
        self._stream: Any = None
        self._last_event: Any = None
        # Trust, per tensor: see accepts().
        self._seen_ids: list[int] = list(map(id, tensors))
        self._trusted_ids: list[int] = [0] * self.num_tensors
        self._trust_state = bytearray(self.num_tensors)
        self._trust_refs: dict[int, tuple[weakref.ref[Any], ...]] = {}
        # The metadata a call compares when only some tensors are untrusted, for the last such set.
        self._partial: tuple[list[int], tuple[tuple[Any, ...], ...], list[int], tuple] | None = None

    def _build_tables(
        self, members: dict[torch.dtype, list[tuple[int, torch.Tensor]]], block: int | None, chunk_blocks: int
    ) -> None:
        """Chunk tables of every group, each tensor's chunk range, finishing trips: one upload."""
        int64 = torch.int64
        pieces: list[torch.Tensor] = []
        spans: list[tuple[torch.dtype, int, int, int, int]] = []  # dtype, block, base, chunks, at
        chunk_begin = torch.zeros(self.num_tensors, dtype=int64)
        chunk_end = torch.zeros(self.num_tensors, dtype=int64)
        total = offset = 0
        for dtype, group in members.items():
            group_block = block or kernels.block_size(dtype)
            chunk_size = group_block * chunk_blocks
            indices = torch.tensor([index for index, _ in group], dtype=int64)
            numels = torch.tensor([source.numel() for _, source in group], dtype=int64)
            bases = torch.tensor([source.data_ptr() for _, source in group], dtype=int64)
            counts = (numels + chunk_size - 1) // chunk_size
            firsts = torch.cumsum(counts, 0) - counts
            chunk_begin[indices] = total + firsts
            chunk_end[indices] = total + firsts + counts
            num_chunks = int(counts.sum())
            if num_chunks:
                owner = torch.repeat_interleave(torch.arange(len(group)), counts)
                starts = (torch.arange(num_chunks) - firsts[owner]) * chunk_size
                lengths = torch.clamp(numels[owner] - starts, max=chunk_size)
                pieces += [bases[owner] + starts * dtype.itemsize, lengths]
                spans.append((dtype, group_block, total, num_chunks, offset))
                offset += 2 * num_chunks
            total += num_chunks
        trips = kernels.finish_trips(chunk_end - chunk_begin)
        table = torch.cat([*pieces, chunk_begin, chunk_end, trips])
        if self.device.type == "cuda":  # pinned and asynchronous: a new plan never blocks the host
            table = table.pin_memory().to(self.device, non_blocking=True)
        self.table = table  # every table below is a view into this one buffer
        self.groups = [
            _Group(dtype, group_block, base, count, table[at : at + 2 * count])
            for dtype, group_block, base, count, at in spans
        ]
        self.tensor_chunks = table[offset : offset + 2 * self.num_tensors]
        self.finish_trips = table[offset + 2 * self.num_tensors :]
        self.total_chunks = total
        self.partial_sumsq = torch.empty(max(total, 1), dtype=torch.float64, device=self.device)
        self.partial_counts = torch.empty(3 * max(total, 1), dtype=torch.int32, device=self.device)

    # -- which calls this plan serves -------------------------------------------------------
    @staticmethod
    def _metadata(tensors: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], ...]:
        # A contiguous tensor at a plan's address with the same byte size and dtype covers exactly
        # the elements the plan reads there.
        return (
            tuple(map(_nbytes, tensors)),
            tuple(map(_dtype, tensors)),
            tuple(map(_is_contiguous, tensors)),
        )

    @staticmethod
    def _layout(tensors: Sequence[torch.Tensor], indices: Sequence[int]) -> tuple:
        return tuple((tensors[i].shape, tensors[i].stride()) for i in indices)

    def accepts(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` (already at this plan's addresses) have its sizes, dtypes, layouts.

        Trust is per tensor: a tensor that is the same object at its index as in the previous call
        (or the plan's build) and whose metadata matches now is trusted until it or its storage
        dies (weak references, taken on the object just compared), then never again in this
        plan. Only the others are compared: a training loop that frees its gradients hands them
        back as new objects every step (on CUDA at the same addresses), and its parameters are
        still trusted."""
        compare, repeated = _untrusted(tensors, self._trusted_ids, self._trust_state, self._seen_ids)
        if not compare:
            return True
        if len(compare) == self.num_tensors:
            subset: Sequence[torch.Tensor] = tensors
            expected, layout_checked = self.metadata, self._layout_checked
            checked_layout = self.checked_layout
        else:
            expected, layout_checked, checked_layout = self._expected_for(compare)
            subset = list(map(tensors.__getitem__, compare))
        if self._metadata(subset) != expected:
            return False
        if layout_checked and self._layout(tensors, layout_checked) != checked_layout:
            return False
        if repeated:
            self._trust(tensors, repeated)
        return True

    def _expected_for(self, compare: list[int]) -> tuple[tuple[tuple[Any, ...], ...], list[int], tuple]:
        """This plan's metadata at the indices ``compare``, and its layouts where one is checked
        (kept for the next call, which usually compares the same indices)."""
        partial = self._partial
        if partial is None or partial[0] != compare:
            expected = tuple(tuple(map(column.__getitem__, compare)) for column in self.metadata)
            wanted = set(compare)
            layout_of = dict(zip(self._layout_checked, self.checked_layout, strict=True))
            layout_checked = [i for i in self._layout_checked if i in wanted]
            partial = (compare, expected, layout_checked, tuple(layout_of[i] for i in layout_checked))
            self._partial = partial
        return partial[1], partial[2], partial[3]

    def _trust(self, tensors: Sequence[torch.Tensor], indices: list[int]) -> None:
        """Skip comparing the tensors at ``indices`` while they and their storages are alive."""
        state = self._trust_state
        for index in indices:
            tensor = tensors[index]

            def forget(_: object, index: int = index, state: bytearray = state) -> None:
                state[index] = TRUST_ENDED

            try:  # torch keeps a storage's Python object as long as the storage itself
                refs = (weakref.ref(tensor, forget), weakref.ref(tensor.untyped_storage(), forget))
            except Exception:  # no weak references or no storage: keep comparing it
                state[index] = TRUST_ENDED
                continue
            self._trust_refs[index] = refs
            self._trusted_ids[index] = id(tensor)
            state[index] = TRUSTED

    def trusted(self) -> list[int]:
        """The indices of the tensors trusted now (tests and diagnostics)."""
        return [index for index, at in enumerate(self._trust_state) if at == TRUSTED]

    # -- one check ------------------------------------------------------------------------------
    def check(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> PendingHealth:
        """Enqueue one check on the current stream; returns its handle without waiting.

        CPU tensors (interpreter) are finished when this returns, so their handle is ready.
        """
        runtime = self._runtime
        if runtime is None:
            self._launch(tensors)
            return PendingHealth(names, ResultSlot(self.out.clone(), None), "triton")
        index = self.device.index
        if runtime.current_device() != index:  # Triton launches on the current device
            with runtime.device(index):
                return self._check_device(names, tensors, runtime)
        return self._check_device(names, tensors, runtime)

    def _check_device(
        self, names: Sequence[str], tensors: Sequence[torch.Tensor], runtime: DeviceRuntime
    ) -> PendingHealth:
        raw = runtime.raw_stream(self.device.index)
        if raw != self._stream_raw:  # another stream: order it after the last check's buffers
            stream = runtime.current_stream(self.device)
            if self._last_event is not None:
                stream.wait_event(self._last_event)
                if self.device.type == "cuda":  # and keep them from reuse until its work is done
                    for buffer in (self.table, self.partial_sumsq, self.partial_counts, self.out):
                        buffer.record_stream(stream)
                    for _, staging in self.staged:
                        staging.record_stream(stream)
            self._stream, self._stream_raw = stream, raw
        self._launch(tensors)
        slot = self._free_slot(runtime)
        slot.host.copy_(self.out, non_blocking=True)
        slot.event.record(self._stream)
        self._last_event = slot.event
        return PendingHealth(names, slot, "triton")

    def _free_slot(self, runtime: DeviceRuntime) -> ResultSlot:
        for slot in self.slots:
            if slot.is_free():
                return slot
        # Every slot is held by an unread handle: grow the ring rather than overwrite one.
        slot = ResultSlot(runtime.host_buffer((4, self.num_tensors), torch.float64), runtime.event())
        self.slots.append(slot)
        return slot

    def _launch(self, tensors: Sequence[torch.Tensor]) -> None:
        if self._trial is not None:
            self._settle_trial()
        if self.graph is not None:
            self.graph.replay()
        else:
            if self._runtime is not None:
                self._runtime.run_kernels(lambda: self._enqueue(tensors))
            else:
                self._enqueue(tensors)
            if self._graph_wanted and self._launches:
                self._start_trial(tensors)
            self._launches += 1
        if self.integers:
            with torch.no_grad():
                for index in self.integers:
                    self.out[0, index] = integer_norm(tensors[index]).square()

    def _enqueue(self, tensors: Sequence[torch.Tensor]) -> None:
        for index, staging in self.staged:
            staging.copy_(tensors[index].detach())
        for group in self.groups:
            kernels.launch_partials(
                chunk_table=group.chunk_table,
                partial_sumsq=self.partial_sumsq,
                partial_counts=self.partial_counts,
                chunk_base=group.chunk_base,
                num_chunks=group.num_chunks,
                total_chunks=self.total_chunks,
                dtype=group.dtype,
                block=group.block,
            )
        kernels.launch_finish(
            partial_sumsq=self.partial_sumsq,
            partial_counts=self.partial_counts,
            tensor_chunks=self.tensor_chunks,
            trips=self.finish_trips,
            out=self.out,
            num_tensors=self.num_tensors,
            total_chunks=self.total_chunks,
        )

    # -- the CUDA graph -----------------------------------------------------------------------
    def _start_trial(self, tensors: Sequence[torch.Tensor]) -> None:
        """Capture the launches just made eagerly, replay them, compare on the device.

        Enqueued after this check's eager launches, so ``out`` holds the answer for the same
        data; whatever happens, the check delivers that eager answer. One try per plan.
        """
        self._graph_wanted = False
        runtime = self._runtime
        assert runtime is not None
        expected = self.out.clone()
        try:
            graph = runtime.capture(self.device, lambda: self._enqueue(tensors))
            graph.replay()
            # Compared as bits: a sick model's NaN sums must not count as a mismatch.
            same = torch.eq(self.out.view(torch.int64), expected.view(torch.int64)).all()
            verdict = runtime.host_buffer((), torch.bool)
            verdict.copy_(same, non_blocking=True)
            landed = runtime.event()
            landed.record(self._stream)
            self._trial = (graph, verdict, landed)
        except Exception:  # an optimization only: any failure keeps the eager launches
            _log.debug("health check: CUDA graph capture failed; eager launches kept", exc_info=True)
        finally:
            self.out.copy_(expected)

    def _settle_trial(self) -> None:
        """Adopt the trial graph once its verdict has landed and says equal; never waits."""
        assert self._trial is not None
        graph, verdict, landed = self._trial
        if landed.query():
            self._trial = None
            if bool(verdict.item()):
                self.graph = graph
