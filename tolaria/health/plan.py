"""Cached launch plans for the fused health kernel: tables, staging, result buffers, CUDA graph.

A plan belongs to one tensor set, keyed by every tensor's ``(data_ptr, nbytes, dtype)`` (plus
shape and strides of staged tensors). Building it sorts the tensors into kernel dtype groups,
lays out the chunks, uploads the int64 tables in one asynchronous copy and allocates every
buffer a check writes. A check with a cached plan creates no tensors: it refreshes the staging
copies, enqueues the launches and copies the ``[4, T]`` result into a pinned slot behind an
event. On CUDA the first reuse of a plan captures those launches as one CUDA graph (replayed
from then on, to cut the host cost of a check to one replay) after checking that a replay
reproduces the eager result bit for bit; ``TOLARIA_HEALTH_CUDA_GRAPH=0`` keeps eager launches.
Plans are cached least-recently-used, eight at most; not thread-safe (the Governor is not).

How tensors reach the kernel:

- dense tensors (contiguous, or a permutation of a contiguous block such as ``w.t()`` or
  channels-last) whose address is 16-byte aligned are read in place: counts and sums of squares
  do not depend on element order, and such a tensor covers exactly ``numel`` elements starting
  at ``data_ptr()`` (strides are never negative in torch);
- other float tensors (strided slices, expanded views, unaligned views, fp8) are copied into a
  contiguous staging buffer of a kernel dtype before each check, so they are never skipped;
- integer and bool tensors skip the kernel; their norm comes from the reference.

Not detected: a tensor that was dense replaced by a strided one at the same address with the
same byte count and dtype (``as_strided`` games); checking every stride would double the host
cost of a check.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch

from tolaria.health import triton_kernels as kernels
from tolaria.health.reference import integer_norm
from tolaria.health.report import HealthHandle, PendingHealth, ReadyHealth, ResultSlot, report_from_sums

PlanKey = tuple[tuple[int, ...], tuple[int, ...], tuple[torch.dtype, ...]]

_CACHE_SIZE = 8  # parameters, gradients, snapshot staging, with room for a few more
_plans: OrderedDict[PlanKey, TritonPlan] = OrderedDict()


_data_ptr = torch.Tensor.data_ptr
_nbytes = attrgetter("nbytes")
_dtype = attrgetter("dtype")


def plan_key(tensors: Sequence[torch.Tensor]) -> PlanKey:
    """Everything a plan's tables depend on; a new address, size or dtype means a new plan.

    ``map`` over C-level accessors: this runs on every check, so it is most of the host cost.
    """
    return (tuple(map(_data_ptr, tensors)), tuple(map(_nbytes, tensors)), tuple(map(_dtype, tensors)))


def graphs_enabled() -> bool:
    """``TOLARIA_HEALTH_CUDA_GRAPH=0`` replays nothing: every check launches its kernels."""
    return os.environ.get("TOLARIA_HEALTH_CUDA_GRAPH", "1") != "0"


def cached_plan(key: PlanKey, tensors: Sequence[torch.Tensor]) -> TritonPlan | None:
    """The cached plan for ``tensors`` under ``key``, or None."""
    plan = _plans.get(key)
    if plan is None or not plan.layout_matches(tensors):
        return None
    _plans.move_to_end(key)
    return plan


def build_plan(
    key: PlanKey,
    tensors: Sequence[torch.Tensor],
    *,
    block: int | None = None,
    chunk_blocks: int | None = None,
) -> TritonPlan:
    """Build a plan; cache it unless the geometry was overridden (tests use tiny blocks)."""
    plan = TritonPlan(tensors, key, block=block, chunk_blocks=chunk_blocks)
    if block is None and chunk_blocks is None:
        _plans[key] = plan
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def clear_plans() -> None:
    """Drop every cached plan and the device memory it holds."""
    _plans.clear()


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
    chunk_size: int
    chunk_base: int
    num_chunks: int
    tables: tuple[torch.Tensor, ...] = ()  # pointer, numel, chunk tensor, chunk start (device)


class TritonPlan:
    """Device tables and buffers for one tensor set; see the module docstring."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        key: PlanKey,
        *,
        block: int | None = None,
        chunk_blocks: int | None = None,
    ) -> None:
        chunk_blocks = kernels.CHUNK_BLOCKS if chunk_blocks is None else chunk_blocks
        if not 1 <= chunk_blocks <= kernels.MAX_CHUNK_BLOCKS:
            raise ValueError(f"chunk_blocks must be in [1, {kernels.MAX_CHUNK_BLOCKS}], got {chunk_blocks}")
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        self.key = key
        self.device = tensors[0].device
        self.num_tensors = len(tensors)
        self.integers: list[int] = []
        self.staged: list[tuple[int, torch.Tensor]] = []  # (input index, staging view)
        self.staged_layout: tuple = ()
        members: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
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
            members.setdefault(kernel_dtype, []).append((index, source))
        self.staged_layout = self._layout(tensors)

        # Host-side tables, uploaded in one copy: per group [pointers | numels | chunk tensors |
        # chunk starts], then the [2, T] chunk range of every tensor in input order.
        host: list[int] = []
        spans: list[tuple[_Group, list[tuple[int, int]]]] = []
        chunk_begin = [0] * self.num_tensors
        chunk_end = [0] * self.num_tensors
        total_chunks = 0
        for dtype, group_members in members.items():
            group_block = block or kernels.block_size(dtype)
            chunk_size = group_block * chunk_blocks
            pointers: list[int] = []
            numels: list[int] = []
            chunk_tensor: list[int] = []
            chunk_start: list[int] = []
            for local, (index, source) in enumerate(group_members):
                pointers.append(source.data_ptr())
                numels.append(source.numel())
                chunk_begin[index] = total_chunks + len(chunk_start)
                for first in range(0, source.numel(), chunk_size):
                    chunk_tensor.append(local)
                    chunk_start.append(first)
                chunk_end[index] = total_chunks + len(chunk_start)
            group = _Group(dtype, group_block, chunk_size, total_chunks, len(chunk_start))
            total_chunks += len(chunk_start)
            ranges = []
            for values in (pointers, numels, chunk_tensor, chunk_start):
                ranges.append((len(host), len(host) + len(values)))
                host.extend(values)
            spans.append((group, ranges))
        tensor_chunks_at = len(host)
        host.extend(chunk_begin + chunk_end)
        trips_at = len(host)
        host.extend(kernels.finish_trips(chunk_begin, chunk_end))
        table = torch.tensor(host, dtype=torch.int64)
        if self.device.type == "cuda":  # pinned and asynchronous: a new plan never blocks the host
            table = table.pin_memory().to(self.device, non_blocking=True)
        self.table = table  # the groups' tables are views into this one buffer
        self.groups: list[_Group] = []
        for group, ranges in spans:
            if group.num_chunks:
                group.tables = tuple(table[a:b] for a, b in ranges)
                self.groups.append(group)
        self.tensor_chunks = table[tensor_chunks_at:trips_at]
        self.finish_trips = table[trips_at:]
        self.total_chunks = total_chunks
        self.partial_sumsq = torch.empty(max(total_chunks, 1), dtype=torch.float64, device=self.device)
        self.partial_counts = torch.empty(3 * max(total_chunks, 1), dtype=torch.int32, device=self.device)
        self.out = torch.empty((4, self.num_tensors), dtype=torch.float64, device=self.device)
        self.slots: list[ResultSlot] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self._last_stream: torch.cuda.Stream | None = None
        self._last_event: torch.cuda.Event | None = None
        # Captured at the first reuse, not at build: a set seen once (gradients that land at new
        # addresses every step) should not pay for a capture and its one verifying sync.
        self._graph_pending = self.device.type == "cuda" and not kernels.INTERPRETED and graphs_enabled()
        self._checks = 0

    def _layout(self, tensors: Sequence[torch.Tensor]) -> tuple:
        return tuple((tensors[i].shape, tensors[i].stride()) for i, _ in self.staged)

    def layout_matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """The key fixes addresses and sizes; staged views must also keep their strides."""
        return not self.staged or self._layout(tensors) == self.staged_layout

    def _enqueue(self, tensors: Sequence[torch.Tensor]) -> None:
        for index, staging in self.staged:
            staging.copy_(tensors[index].detach())
        for group in self.groups:
            pointers, numels, chunk_tensor, chunk_start = group.tables
            kernels.launch_partials(
                ptr_table=pointers,
                numel_table=numels,
                chunk_tensor=chunk_tensor,
                chunk_start=chunk_start,
                partial_sumsq=self.partial_sumsq,
                partial_counts=self.partial_counts,
                chunk_base=group.chunk_base,
                num_chunks=group.num_chunks,
                total_chunks=self.total_chunks,
                chunk_size=group.chunk_size,
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

    def _capture_graph(self, tensors: Sequence[torch.Tensor]) -> None:
        """Record the launches as one CUDA graph, used only if its replay matches bit for bit.

        Called right after an eager check, so the kernels are compiled and ``out`` holds the
        answer for the same data; any failure leaves the plan on eager launches.
        """
        self._graph_pending = False
        expected = self.out.clone()
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._enqueue(tensors)
                finally:
                    graph.capture_end()
            current.wait_stream(side)
            graph.replay()
            # Compared as bits: a sick model's NaN sums must not count as a mismatch.
            if torch.equal(self.out.view(torch.int64), expected.view(torch.int64)):
                self.graph = graph
        except Exception:  # an optimization only: any failure keeps the eager launches
            current.wait_stream(side)
            self.out.copy_(expected)

    def _launch(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._enqueue(tensors)
            self._checks += 1
            if self._graph_pending and self._checks >= 2:
                self._capture_graph(tensors)
        with torch.no_grad():
            for index in self.integers:
                self.out[0, index] = integer_norm(tensors[index]).square()

    def check(self, names: Sequence[str], tensors: Sequence[torch.Tensor], *, blocking: bool) -> HealthHandle:
        """Enqueue one check on the current stream; CPU tensors (interpreter) finish before return."""
        if self.device.type != "cuda":
            self._launch(tensors)
            return ReadyHealth(report_from_sums(names, self.out.tolist(), "triton"))
        if self.device.index != torch.cuda.current_device():  # Triton launches on the current one
            with torch.cuda.device(self.device):
                return self._check_cuda(names, tensors, blocking=blocking)
        return self._check_cuda(names, tensors, blocking=blocking)

    def _check_cuda(
        self, names: Sequence[str], tensors: Sequence[torch.Tensor], *, blocking: bool
    ) -> HealthHandle:
        stream = torch.cuda.current_stream(self.device)
        if self._last_event is not None and stream != self._last_stream:
            stream.wait_event(self._last_event)  # `out` and the partials are shared by calls
        self._launch(tensors)
        slot = self._free_slot()
        slot.host.copy_(self.out, non_blocking=True)
        slot.event.record(stream)
        self._last_stream, self._last_event = stream, slot.event
        handle = PendingHealth(names, slot, "triton")
        if blocking:
            handle.result()
        return handle

    def _free_slot(self) -> ResultSlot:
        for slot in self.slots:
            if slot.is_free():
                return slot
        # Every slot is held by an unread handle: grow the ring rather than overwrite one.
        slot = ResultSlot(self.num_tensors)
        self.slots.append(slot)
        return slot
