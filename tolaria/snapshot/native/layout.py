"""Where the native snapshot engine keeps each tensor: a plan made once per tensor-set structure.

An :class:`ArenaPlan` maps keys to *slots* (tensors that are the same view of the same memory —
tied weights — share one slot) and slots to byte ranges of a host arena laid out by
``tolaria._C.plan_layout``: offsets aligned to 256 bytes, slots grouped by dtype so that each
dtype's slots form one contiguous region per chunk, chunks of at most ``chunk_bytes`` (pinning
one huge block can fail or stall where several smaller ones succeed).

Every slot is filled in one of three ways, decided once per plan:

* ``direct`` — contiguous tensors on the plan's device, copied straight from their memory
  (memcpy on CPU; device→host on the side stream on CUDA). On CUDA only ``nn.Parameter``
  objects qualify: parameters are written by the optimizer alone, which waits for the capture.
* ``ordered`` — CUDA only: buffers (anything that is not a Parameter, e.g. BatchNorm running
  statistics that forward writes) and non-contiguous tensors. They are first copied, in the
  caller's stream order, into a private contiguous device scratch; the side stream then copies
  that scratch to the host. Nothing else ever writes the scratch. Complex tensors go this way
  too (a lazy conjugate bit is invisible in raw bytes; ``copy_`` resolves it).
* ``foreign`` — tensors on another device than the plan's (or non-contiguous or complex CPU
  tensors): copied by ``Tensor.copy_`` at capture time, synchronously. Rare, correct, not fast.

:class:`HostBuffer` is one arena for a plan (the LKG or the staging copy) with typed views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter, is_, itemgetter
from types import ModuleType
from typing import Any

import torch

from tolaria.addresses import addresses
from tolaria.health.native import DTYPE_CODES
from tolaria.snapshot.ties import storage_groups

# Column by column: keys, dtypes, shapes, devices, contiguity, types, lazy negation (a view
# whose bytes are the negated values, torch._neg_view). Any change to these forces
# a new plan; data addresses may change freely (they are read on every capture).
Signature = tuple[tuple[Any, ...], ...]

_PARAMETER_TYPES: dict[type, bool] = {}
_dtype = attrgetter("dtype")
_shape = attrgetter("shape")
# The same torch.Size, without the Python-level attribute lookup that Parameter subclasses pay.
_size = torch._C.TensorBase.size
_device = attrgetter("device")
_is_contiguous = torch.Tensor.is_contiguous
_is_neg = torch.Tensor.is_neg
_nbytes = attrgetter("nbytes")


def signature_of(keys: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Signature:
    """The structure of a tensor set. Runs on every capture: ``map`` over C-level accessors
    costs a fraction of a Python loop (about 1 ms for 5,000 tensors)."""
    return (
        keys,
        tuple(map(_dtype, tensors)),
        tuple(map(_shape, tensors)),
        tuple(map(_device, tensors)),
        tuple(map(_is_contiguous, tensors)),
        tuple(map(type, tensors)),
        tuple(map(_is_neg, tensors)),
    )


def byte_signature(tensors: tuple[torch.Tensor, ...]) -> Signature:
    """With the copied tensors' addresses, what decides whether copying a known tensor's bytes
    is safe: dtype, contiguity and byte size. Much cheaper than :func:`signature_of` (no
    ``torch.Size`` per tensor); a tensor moved to another device has another address."""
    return (
        tuple(map(_dtype, tensors)),
        tuple(map(_is_contiguous, tensors)),
        tuple(map(_nbytes, tensors)),
    )


def _is_parameter_type(cls: type) -> bool:
    # isinstance(t, nn.Parameter) goes through a metaclass hook that costs ~0.3 µs a call;
    # caching per type keeps a 5,000-tensor capture cheap.
    known = _PARAMETER_TYPES.get(cls)
    if known is None:
        known = _PARAMETER_TYPES[cls] = issubclass(cls, torch.nn.Parameter)
    return known


def _primary_device(items: Sequence[tuple[str, torch.Tensor]]) -> torch.device:
    """The first CUDA device among the tensors, else the CPU."""
    for _, tensor in items:
        if tensor.is_cuda:
            return tensor.device
    return torch.device("cpu")


def _checkable(view: torch.Tensor) -> torch.Tensor | None:
    """The view in a form the health check reads (complex as real pairs), or None for integers."""
    if view.is_complex():
        return torch.view_as_real(view)
    return view if view.is_floating_point() else None


_Picker = Callable[[Sequence[torch.Tensor]], Any]


def _picker(indices: list[int]) -> _Picker | None:
    """One C-level call that picks ``indices`` out of a tuple, in order (itemgetter of a single
    index returns the item itself, hence the tuple wrapper); None when there are none."""
    if len(indices) == 1:
        only = indices[0]
        return lambda tensors: (tensors[only],)
    return itemgetter(*indices) if indices else None


def _addresses(pick: _Picker | None, tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return () if pick is None else addresses(pick(tensors))


class ArenaPlan:
    """Slots, their arena layout and how each is captured, for one tensor-set structure.

    Args:
        items: the ``(key, tensor)`` pairs (already validated).
        signature: their :func:`signature_of`, kept to recognise the same structure later.
        native: the ``tolaria._C`` module.
        alignment, chunk_bytes: passed to ``_C.plan_layout``.
    """

    def __init__(
        self,
        items: Sequence[tuple[str, torch.Tensor]],
        signature: Signature,
        native: ModuleType,
        *,
        alignment: int,
        chunk_bytes: int,
    ) -> None:
        self.signature = signature
        self.keys = tuple(key for key, _ in items)
        # The tensor objects last captured with this plan, their byte signature and the direct
        # slots' addresses: the same objects with the same bytes at the same addresses skip the
        # full structural signature (see recognises()). ``_read_for``: the tensor tuple whose
        # direct addresses were just read, and those addresses (read once per capture).
        self._seen: tuple[torch.Tensor, ...] | None = None
        self._seen_bytes: Signature | None = None
        self._seen_addresses: tuple[int, ...] | None = None
        self._read_for: tuple[tuple[torch.Tensor, ...], tuple[int, ...]] | None = None
        self.key_index = {key: index for index, key in enumerate(self.keys)}
        self.device = _primary_device(items)
        on_cuda = self.device.type == "cuda"

        key_group, group_first = storage_groups([tensor for _, tensor in items])
        # (key index, index of the key it shares memory with)
        self.tied: list[tuple[int, int]] = [
            (index, group_first[group])
            for index, group in enumerate(key_group)
            if group >= 0 and group_first[group] != index
        ]

        # Arena order: by dtype (in order of first appearance), then key order, so each dtype is
        # one run of slots and the staging buffer can be health-checked one region per dtype.
        dtype_rank: dict[torch.dtype, int] = {}
        for first in group_first:
            dtype_rank.setdefault(items[first][1].dtype, len(dtype_rank))
        order = sorted(range(len(group_first)), key=lambda g: (dtype_rank[items[group_first[g]][1].dtype], g))
        slot_of_group = {group: slot for slot, group in enumerate(order)}
        self.key_slot = [slot_of_group[g] if g >= 0 else -1 for g in key_group]
        self.slot_key = [group_first[g] for g in order]
        reps = [items[k][1] for k in self.slot_key]
        self.slot_dtype = [t.dtype for t in reps]
        self.slot_shape = [tuple(t.shape) for t in reps]
        self.slot_nbytes = [t.numel() * t.element_size() for t in reps]
        self.nbytes = sum(self.slot_nbytes)
        self.layout = native.plan_layout(self.slot_nbytes, alignment, chunk_bytes) if reps else None

        self.direct: list[int] = []
        self.ordered: list[int] = []
        self.foreign: list[int] = []
        _, _, _, devices, contiguous, types, negated = signature
        for slot, key_index in enumerate(self.slot_key):
            if devices[key_index] != self.device:
                self.foreign.append(slot)
            elif not contiguous[key_index] or self.slot_dtype[slot].is_complex or negated[key_index]:
                # Lazy conjugate (complex) and negative bits are not in the raw bytes: these go
                # through Tensor.copy_, which applies them.
                (self.ordered if on_cuda else self.foreign).append(slot)
            elif on_cuda and not _is_parameter_type(types[key_index]):
                self.ordered.append(slot)
            else:
                self.direct.append(slot)
        self.all_direct = len(self.direct) == len(reps)
        # CPU: the fused capture's dtype code per direct slot (-1: raw bytes, copied, not summed),
        # the name each sum is reported under, and the float slots it cannot read (fp8), which are
        # checked after the copy instead.
        self.direct_codes = [DTYPE_CODES.get(self.slot_dtype[s], -1) for s in self.direct]
        self.direct_names = [self.keys[self.slot_key[s]] for s in self.direct]
        float_slots = [s for s in self.direct if self.slot_dtype[s].is_floating_point]
        self.unsummed = [s for s in float_slots if self.slot_dtype[s] not in DTYPE_CODES]
        self.direct_keys = [self.slot_key[s] for s in self.direct]
        self._pick_direct = _picker(self.direct_keys)
        # A restore into the captured tensors themselves writes by address every slot whose
        # tensor is contiguous on the plan's device (buffers too: nothing is in flight then) and
        # has no lazy conjugate or negative bit; the rest go through Tensor.copy_.
        self.restore_direct = [
            slot
            for slot, key_index in enumerate(self.slot_key)
            if devices[key_index] == self.device
            and contiguous[key_index]
            and not self.slot_dtype[slot].is_complex
            and not negated[key_index]
        ]
        restored = set(self.restore_direct)
        self.restore_copied = [slot for slot in range(len(reps)) if slot not in restored]
        self._pick_restore = _picker([self.slot_key[s] for s in self.restore_direct])
        # CUDA: which direct device tensors the capture's health check reads.
        self.direct_checks = [
            (self.slot_key[s], self.slot_dtype[s].is_complex)
            for s in self.direct
            if self.slot_dtype[s].is_floating_point or self.slot_dtype[s].is_complex
        ]
        self._scratch: DeviceScratch | None = None

    def direct_addresses(self, tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """The data addresses of the ``direct`` slots' tensors, in slot order (those that
        :meth:`recognises` or :meth:`remember` just read for this very tuple)."""
        read = self._read_for
        if read is not None and read[0] is tensors:
            return read[1]
        return _addresses(self._pick_direct, tensors)

    def restore_routes(
        self, keys: tuple[str, ...], tensors: tuple[torch.Tensor, ...]
    ) -> tuple[int, ...] | None:
        """The addresses of the ``restore_direct`` slots' tensors when ``tensors`` may be restored
        by the plan's routes without a per-key walk, else None (the caller takes the full path).

        That needs everything the full path checks: the very objects last captured
        (:meth:`recognises`), unchanged shapes (the full path refuses a changed one before
        writing anything), the known ties, and no new ones (two slots written to one address).
        """
        if not (self.recognises(keys, tensors) and self.ties_hold(tensors)):
            return None
        # Shapes and devices in full: recognises() compares the captured slots' addresses only,
        # and a restore writes by address into slots that the capture copied otherwise.
        shapes, devices = self.signature[2], self.signature[3]
        if tuple(map(_size, tensors)) != shapes or tuple(map(_device, tensors)) != devices:
            return None
        addresses = _addresses(self._pick_restore, tensors)
        return addresses if len(set(addresses)) == len(addresses) else None

    def recognises(self, keys: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> bool:
        """Whether ``tensors`` are the very objects last captured with this plan, under the same
        keys, with unchanged dtype, contiguity and byte size, the direct slots at the same
        addresses (a tensor moved to new memory or another device is not recognised).

        This is what keeps a 5,000-tensor capture from rebuilding ``torch.Size`` objects: the
        copy reads ``nbytes`` contiguous bytes at each tensor's current address, so these
        properties are what its safety rests on. Not noticed (documented, like the health cache):
        a same-size reinterpretation swapped in with ``p.data = p.data.view(...)``; the bytes are
        still captured and restored exactly, only the LKG views keep the planned shape.
        """
        seen = self._seen
        if not (
            seen is not None
            and len(tensors) == len(seen)
            and keys == self.keys
            and all(map(is_, tensors, seen))
            and byte_signature(tensors) == self._seen_bytes
        ):
            return False
        addresses = _addresses(self._pick_direct, tensors)
        self._read_for = (tensors, addresses)
        return addresses == self._seen_addresses

    def remember(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Record ``tensors`` (just checked against the full signature) for :meth:`recognises`."""
        self._seen, self._seen_bytes = tensors, byte_signature(tensors)
        self._seen_addresses = _addresses(self._pick_direct, tensors)
        self._read_for = (tensors, self._seen_addresses)

    def ties_hold(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether keys that shared memory at planning time still do (else a new plan is needed)."""
        for index, first in self.tied:
            a, b = tensors[index], tensors[first]
            if a.data_ptr() != b.data_ptr() or a.stride() != b.stride():
                return False
        return True

    def scratch(self) -> DeviceScratch:
        """The device scratch of the ``ordered`` slots, allocated on first use."""
        if self._scratch is None:
            self._scratch = DeviceScratch(self)
        return self._scratch


class DeviceScratch:
    """Private contiguous device memory that ``ordered`` slots are copied into in stream order.

    Reused by every capture of its plan; safe because a capture is always resolved (its
    device→host copy finished) before the next one writes the scratch again.
    """

    def __init__(self, plan: ArenaPlan) -> None:
        offsets, total = [], 0
        for slot in plan.ordered:
            offsets.append(total)
            total += (plan.slot_nbytes[slot] + 255) // 256 * 256
        self.memory = torch.empty(total, dtype=torch.uint8, device=plan.device)
        self.views = [
            self.memory[o : o + plan.slot_nbytes[s]].view(plan.slot_dtype[s]).view(plan.slot_shape[s])
            for o, s in zip(offsets, plan.ordered, strict=True)
        ]
        self.addresses = [v.data_ptr() for v in self.views]
        self.checks = [
            (plan.keys[plan.slot_key[s]], torch.view_as_real(v) if v.is_complex() else v)
            for s, v in zip(plan.ordered, self.views, strict=True)
            if v.is_floating_point() or v.is_complex()
        ]


class HostBuffer:
    """One host arena holding a full copy of a plan's slots, with typed views over it.

    ``pin`` asks for pinned memory; when the runtime refuses, the arena is pageable and
    ``fallback_reason`` says why.
    """

    def __init__(self, plan: ArenaPlan, native: ModuleType, *, pin: bool) -> None:
        self.plan = plan
        self.meta: object = None
        self.slot_views: list[torch.Tensor] = []
        self.regions: list[tuple[str, torch.Tensor]] = []
        self._key_views: dict[str, torch.Tensor] | None = None
        layout = plan.layout
        if layout is None:  # only empty tensors: nothing to allocate
            self.arena = self.copier = None
            self.pinned, self.fallback_reason = False, None
            return
        device_index = plan.device.index if plan.device.index is not None else 0
        self.arena = native.HostArena(layout.chunk_sizes, pin, device_index)
        self.copier = native.CopyPlan(self.arena, layout)
        self.pinned = bool(self.arena.pinned)
        self.fallback_reason = self.arena.fallback_reason
        # Views hold the chunk objects (buffer protocol), so a last_good_state dict handed out
        # earlier stays valid even after this buffer is dropped.
        chunks = [torch.frombuffer(chunk, dtype=torch.uint8) for chunk in self.arena.chunks]
        for slot, (chunk, offset, size) in enumerate(
            zip(layout.chunk_index, layout.offsets, layout.sizes, strict=True)
        ):
            raw = chunks[chunk][offset : offset + size]
            self.slot_views.append(raw.view(plan.slot_dtype[slot]).view(plan.slot_shape[slot]))
        self.regions = self._dtype_regions(chunks)

    def _dtype_regions(self, chunks: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """One view per (float dtype, chunk) covering that dtype's slots and the zeroed padding
        between them (finite, so it cannot make a healthy capture look sick)."""
        layout, plan = self.plan.layout, self.plan
        assert layout is not None
        spans: dict[tuple[torch.dtype, int], tuple[int, int]] = {}
        for slot, (chunk, offset, size) in enumerate(
            zip(layout.chunk_index, layout.offsets, layout.sizes, strict=True)
        ):
            key = (plan.slot_dtype[slot], chunk)
            start, _ = spans.get(key, (offset, 0))
            spans[key] = (start, offset + size)
        chunked = len(chunks) > 1
        regions = []
        for (dtype, chunk), (start, end) in spans.items():
            view = _checkable(chunks[chunk][start:end].view(dtype))
            if view is not None:
                regions.append((f"<{dtype} chunk {chunk}>" if chunked else f"<{dtype}>", view))
        return regions

    def key_views(self) -> dict[str, torch.Tensor]:
        """``key → view`` over this buffer (tied keys share a view); built once per buffer."""
        if self._key_views is None:
            plan, views = self.plan, {}
            for index, key in enumerate(plan.keys):
                slot = plan.key_slot[index]
                if slot >= 0:
                    views[key] = self.slot_views[slot]
                else:
                    dtype, shape = plan.signature[1][index], plan.signature[2][index]
                    views[key] = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
            self._key_views = views
        return self._key_views

    def slot_checks(self, slots: Sequence[int]) -> list[tuple[str, torch.Tensor]]:
        """Float views of ``slots``, named by their first key, for a host-side health check."""
        pairs = []
        for slot in slots:
            checkable = _checkable(self.slot_views[slot])
            if checkable is not None:
                pairs.append((self.plan.keys[self.plan.slot_key[slot]], checkable))
        return pairs

    def checkable_key_views(self) -> list[tuple[str, torch.Tensor]]:
        """Per-key float views, in key order: names the first sick key when a region is sick."""
        pairs = []
        for key, view in self.key_views().items():
            checkable = _checkable(view)
            if checkable is not None:
                pairs.append((key, checkable))
        return pairs


__all__ = ["ArenaPlan", "DeviceScratch", "HostBuffer", "Signature", "signature_of"]
