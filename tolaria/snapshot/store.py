"""The snapshot store interface: capture → verify → commit, and restore from the committed LKG.

A store keeps two things: the *committed* Last Known Good (LKG), which only ever holds values a
health check found finite, and at most one *staged* capture. The life of a capture:

1. :meth:`SnapshotStore.capture` copies ``(key, tensor)`` pairs into a staging buffer. On CPU it
   returns when the copy is done; on CUDA it may return while the device→host copy is still
   running (``CaptureTicket.in_flight``).
2. :meth:`SnapshotStore.resolve` waits for that copy, checks exactly the captured values for
   NaN/Inf with :mod:`tolaria.health`, and then commits the staging buffer as the new LKG or
   discards it. A capture is never half-committed: the LKG changes in one step or not at all.
3. :meth:`SnapshotStore.restore` writes the committed LKG back into live tensors, bit-exact and
   in place (``tensor.data.copy_``), so ``nn.Parameter`` objects keep their identity and
   optimizers keep pointing at them.

The Governor owns the policy (when to capture, what to do with a rejected capture); the store
owns the bytes. The reference store (:mod:`tolaria.snapshot.reference`) is the pure-PyTorch
implementation and the oracle for the native engine (:mod:`tolaria.snapshot.native`).
"""

from __future__ import annotations

import abc
import copy
import weakref
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tolaria.health import HealthReport

if TYPE_CHECKING:
    from tolaria.telemetry import TelemetryHub

NamedTensors = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


class SnapshotMismatchError(RuntimeError):
    """A restore target does not match its saved value (shape or dtype). Raised before anything
    is written, so the live model and the LKG are both untouched."""


@dataclass(frozen=True)
class CaptureTicket:
    """What :meth:`SnapshotStore.capture` staged.

    ``nbytes`` counts tensors that share memory (tied weights) once. ``in_flight`` is True when
    the copy may still be running (call :meth:`SnapshotStore.resolve` before trusting it).
    ``rebuilt`` is True when the staging layout had to be (re)allocated for this tensor set.
    """

    keys: tuple[str, ...]
    nbytes: int
    in_flight: bool
    rebuilt: bool


@dataclass(frozen=True)
class Resolution:
    """The outcome of :meth:`SnapshotStore.resolve` for one capture.

    ``report`` is the health report of the captured values (per storage group when healthy, per
    key when not); ``first_bad`` is the first sick key in capture order, or None. ``vetoed`` is
    True when this capture was healthy but :meth:`SnapshotStore.resolve_agreed` was told not to
    commit it (another rank's capture was sick).
    """

    committed: bool
    keys: tuple[str, ...]
    nbytes: int
    report: HealthReport | None
    first_bad: str | None
    vetoed: bool = False


@dataclass(frozen=True)
class RestoreResult:
    """What :meth:`SnapshotStore.restore` wrote. ``missing_keys``: targets with no saved value
    (left untouched); ``unexpected_keys``: saved values with no target. Both in a stable order."""

    restored_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def normalize_named_tensors(
    named: NamedTensors, *, argument: str = "named_tensors"
) -> list[tuple[str, torch.Tensor]]:
    """Turn a mapping or an iterable of pairs into a list of ``(key, tensor)``.

    Raises TypeError for a non-string key or a non-tensor value, and ValueError for a duplicate
    key or a sparse/non-strided tensor; every message names ``argument`` and the offending key.
    """
    items = list(named.items()) if isinstance(named, Mapping) else list(named)
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"{argument} must hold (key, tensor) pairs, got {type(item).__name__}")
        key, tensor = item
        if not isinstance(key, str):
            raise TypeError(f"{argument}: keys must be str, got {type(key).__name__}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{argument}[{key!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ValueError(
                f"{argument}[{key!r}]: only strided (dense) tensors can be snapshotted, got {tensor.layout}"
            )
        if key in seen:
            raise ValueError(f"{argument}: duplicate key {key!r}")
        seen.add(key)
    return items


def check_restore_targets(saved: Mapping[str, torch.Tensor], targets: list[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`SnapshotMismatchError` listing every target whose shape or dtype differs from
    its saved value (a bit-exact restore needs both to match). Writes nothing."""
    problems = []
    for key, live in targets:
        kept = saved.get(key)
        if kept is None:
            continue
        if tuple(live.shape) != tuple(kept.shape) or live.dtype != kept.dtype:
            problems.append(
                f"{key}: live {tuple(live.shape)} {live.dtype} vs saved {tuple(kept.shape)} {kept.dtype}"
            )
    if problems:
        raise SnapshotMismatchError("cannot restore, saved values do not fit: " + "; ".join(problems))


class SnapshotStore(abc.ABC):
    """Keeps the Last Known Good state: a committed, verified copy of a set of named tensors.

    Threading: a store is used from one thread (the training loop). Implementations:
    :class:`tolaria.snapshot.reference.ReferenceSnapshotStore` (pure PyTorch) and the native
    engine. ``backend`` names the implementation (``"reference"``, ``"native"``).
    """

    backend: ClassVar[str] = "abstract"
    # Where the store's own telemetry (SNAPSHOT_DEGRADED) goes: None means
    # ``telemetry.get_hub()`` at emit time. The Governor sets its own hub lookup here, so that
    # patching ``tolaria.governor.get_hub`` catches every event of a governed run.
    hub_source: Callable[[], TelemetryHub] | None = None

    @abc.abstractmethod
    def capture(self, named_tensors: NamedTensors, *, meta: object = None) -> CaptureTicket:
        """Stage a copy of ``named_tensors`` (values are read, never written).

        A capture still pending from before is resolved first (its :class:`Resolution` is then
        available as :attr:`last_resolution`). On CPU the copy is complete on return. On CUDA
        the copy is ordered after the work already queued on the current stream and may still
        be running on return; it must finish before anything writes these tensors again, which
        :meth:`make_stream_wait` arranges without a host sync. ``meta`` is an opaque object
        committed or discarded together with the tensors (see :attr:`lkg_meta`).

        Raises TypeError/ValueError for malformed input (see :func:`normalize_named_tensors`);
        on any error the committed LKG is untouched.
        """

    @abc.abstractmethod
    def resolve(self) -> Resolution | None:
        """Finish the pending capture: wait for its copy (blocking), check exactly the captured
        values for NaN/Inf, then commit them as the LKG or discard them. Returns None when no
        capture is pending. Never raises for a sick capture: that is ``committed=False``."""

    @abc.abstractmethod
    def restore(self, targets: NamedTensors) -> RestoreResult:
        """Write the committed LKG into the live ``targets`` (matched by key), in place and
        bit-exact; tensors that shared memory at capture time all receive the shared value.

        A capture still staged is waited for and *discarded*, not committed: restoring means the
        present state is suspect, so the previous LKG is what comes back. On CUDA the device is
        synchronized before the first write and after the last, so the weights are in place when
        this returns. Blocking.

        Raises RuntimeError when there is no committed LKG, :class:`SnapshotMismatchError` when a
        target's shape or dtype differs from its saved value; in both cases nothing is written and
        the LKG stays committed. Never modifies the LKG.
        """

    @property
    @abc.abstractmethod
    def last_good_state(self) -> dict[str, torch.Tensor] | None:
        """The committed LKG as ``key → CPU tensor`` (no grad; pinned when captured from CUDA),
        or None when nothing was ever committed. Resolves a pending capture first.

        The tensors are views over the committed buffer, not copies: read-only by contract, and
        valid at least until the next commit. A new dict object is returned for each commit;
        reading twice between commits returns the same object.
        """

    @property
    @abc.abstractmethod
    def lkg_meta(self) -> object:
        """The ``meta`` passed to the capture that became the LKG (None if none). Resolves first."""

    @property
    @abc.abstractmethod
    def has_lkg(self) -> bool:
        """Whether a committed LKG exists. Does not resolve a pending capture."""

    @property
    @abc.abstractmethod
    def keys(self) -> tuple[str, ...]:
        """Keys of the committed LKG in capture order (empty without one). Does not resolve."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> bool:
        """Whether a capture is staged and not yet resolved."""

    @property
    @abc.abstractmethod
    def last_resolution(self) -> Resolution | None:
        """The most recent :class:`Resolution`, however it was triggered."""

    @abc.abstractmethod
    def make_stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current CUDA stream) wait on the GPU, without blocking the
        host, until the pending capture's copy has finished reading the live tensors. A no-op on
        CPU or when nothing is in flight. The Governor calls it from an optimizer step pre-hook
        so the next update cannot overwrite parameters under an in-flight copy."""

    def close(self) -> None:
        """Release buffers (optional); the store must not be used afterwards."""
        return None

    # -- two-phase resolve: verify, agree, then commit or discard -------------------------------
    def resolve_agreed(self, agree: Callable[[bool], bool]) -> Resolution | None:
        """Like :meth:`resolve`, but the pending capture is committed only if ``agree`` allows it.

        ``agree(healthy)`` receives this store's own verdict on its capture and returns whether it
        may be committed, e.g. whether every rank of a process group found its capture healthy.
        It is called exactly once whenever a capture was pending, also when verification raises
        (with False, before the error propagates), so a collective inside it is entered by every
        rank; it is not called when nothing is pending (the result is then None). A healthy
        capture that ``agree`` rejects is discarded and the previous LKG stays committed
        (``committed=False, vetoed=True``).

        Both stores implement it (:class:`tolaria.snapshot.buffered.BufferedStore`); this default
        vetoes and raises NotImplementedError for a store that cannot take a commit back.
        """
        if not self.in_flight:
            return None
        agree(False)
        raise NotImplementedError(f"{type(self).__name__} must implement resolve_agreed()")


def require_default_stream(device: torch.device, caller: str) -> None:
    """Raise RuntimeError (mentioning "non-default CUDA stream") when CUDA is present and the
    current stream of ``device`` (of the current CUDA device for a CPU model) is not its default
    stream: a capture there could not be ordered after the training step's writes."""
    if not torch.cuda.is_available():
        return
    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        raise RuntimeError(
            f"{caller} was called inside a non-default CUDA stream; call it on the default stream "
            "so the capture is ordered after the step's writes"
        )


# -- what a capture holds besides plain parameters -------------------------------------------
# Helpers for store users (the Governor): split a model's state dict, and turn optimizer state
# into (key, tensor) pairs plus a small description, so that any store (reference or native)
# captures, verifies and commits the optimizer together with the weights, atomically.

#: Keys of optimizer-state tensors in a store; ``@`` never starts a state-dict key.
OPTIMIZER_KEY_PREFIX = "@optimizer/"
_EXTRA_STATE = "_extra_state"


def state_dict_entries(
    model: nn.Module, excluded: Callable[[str], bool]
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """Split ``model.state_dict(keep_vars=True)`` into tensors, non-tensor entries (module extra
    state, kept by key) and the keys for which ``excluded(key)`` is true. Tensors are the live
    ones (not copies); parameters keep their identity."""
    tensors: list[tuple[str, torch.Tensor]] = []
    extras: dict[str, object] = {}
    dropped: list[str] = []
    for key, value in model.state_dict(keep_vars=True).items():
        if excluded(key):
            dropped.append(key)
        elif isinstance(value, torch.Tensor):
            tensors.append((key, value))
        else:
            extras[key] = value
    return tensors, extras, tuple(dropped)


def restore_extra_state(model: nn.Module, saved: Mapping[str, object], live_keys: Container[str]) -> None:
    """Give each module whose ``_extra_state`` key is in both ``saved`` and ``live_keys`` a deep
    copy of its saved extra state (a copy, so the LKG survives for the next rollback)."""
    for key, value in saved.items():
        if key not in live_keys or not key.endswith(_EXTRA_STATE):
            continue
        module = model.get_submodule(key[: -len(_EXTRA_STATE)].rstrip("."))
        module.set_extra_state(copy.deepcopy(value))


@dataclass(frozen=True)
class OptimizerSnapshot:
    """The shape of an optimizer's state at capture time: for each parameter (a weak reference,
    so pruned parameters are not kept alive), each state entry is either ``("tensor", key,
    device)`` — the value lives in the store under ``key`` — or ``("value", deep copy)``."""

    optimizer: weakref.ref[torch.optim.Optimizer]
    per_param: tuple[tuple[weakref.ref[torch.Tensor], dict[str, tuple[Any, ...]]], ...]


def optimizer_entries(
    optimizer: torch.optim.Optimizer | None,
) -> tuple[list[tuple[str, torch.Tensor]], OptimizerSnapshot | None]:
    """The optimizer's per-parameter state as store entries plus its :class:`OptimizerSnapshot`.
    Parameter-group hyperparameters (the learning rate, owned by schedulers) are not captured."""
    if optimizer is None:
        return [], None
    tensors: list[tuple[str, torch.Tensor]] = []
    per_param = []
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            spec: dict[str, tuple[Any, ...]] = {}
            for name, value in (optimizer.state.get(param) or {}).items():
                if isinstance(value, torch.Tensor):
                    key = f"{OPTIMIZER_KEY_PREFIX}{index}/{name}"
                    tensors.append((key, value))
                    spec[name] = ("tensor", key, value.device)
                else:
                    spec[name] = ("value", copy.deepcopy(value))
            per_param.append((weakref.ref(param), spec))
            index += 1
    return tensors, OptimizerSnapshot(weakref.ref(optimizer), tuple(per_param))


def _reusable(current: object, kept: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    if not isinstance(current, torch.Tensor):
        return None
    fits = current.shape == kept.shape and current.dtype == kept.dtype and current.device == device
    return current if fits else None


def optimizer_restore_plan(
    optimizer: torch.optim.Optimizer | None, snap: OptimizerSnapshot | None, saved: Mapping[str, torch.Tensor]
) -> tuple[list[tuple[str, torch.Tensor]], Callable[[], str]]:
    """Plan how to put ``snap`` back into ``optimizer``.

    Returns restore targets for the store (live state tensors reused in place when their shape,
    dtype and device fit, fresh ones otherwise) and a ``finish()`` to call once the store has
    written them: it installs the captured per-parameter state and returns ``"restored"``. If
    ``snap`` was not taken of this very optimizer, there are no targets and ``finish()`` clears
    the optimizer's per-parameter state entirely (``"cleared"``): stale moments with a stale step
    count make the next updates far too large. Without an optimizer: ``"untouched"``.

    Parameters are matched by identity (a rollback keeps Parameter objects), so the mapping of
    state to parameters survives; a parameter without captured state ends with no state.
    """
    if optimizer is None:
        return [], lambda: "untouched"
    if snap is None or snap.optimizer() is not optimizer:

        def clear() -> str:
            optimizer.state.clear()
            return "cleared"

        return [], clear
    captured = {id(ref()): (ref, spec) for ref, spec in snap.per_param if ref() is not None}
    targets: list[tuple[str, torch.Tensor]] = []
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        group_params: list[torch.Tensor] = group["params"]
        for param in group_params:
            param_ref, spec = captured.get(id(param), (None, {}))
            if param_ref is None or param_ref() is not param:
                new_state[param] = {}
                continue
            live = optimizer.state.get(param) or {}
            state: dict[str, Any] = {}
            for name, entry in spec.items():
                if entry[0] != "tensor":
                    state[name] = copy.deepcopy(entry[1])
                    continue
                key, device = entry[1], entry[2]
                kept = saved[key]
                # Reuse a fitting live tensor, so whatever else holds it sees the restored values.
                target = _reusable(live.get(name), kept, device)
                if target is None:
                    target = torch.empty(kept.shape, dtype=kept.dtype, device=device)
                targets.append((key, target))
                state[name] = target
            new_state[param] = state

    def install() -> str:
        for owner, owner_state in new_state.items():
            if owner_state:
                optimizer.state[owner] = owner_state
            else:
                optimizer.state.pop(owner, None)
        return "restored"

    return targets, install


__all__ = [
    "OPTIMIZER_KEY_PREFIX",
    "require_default_stream",
    "CaptureTicket",
    "OptimizerSnapshot",
    "NamedTensors",
    "Resolution",
    "RestoreResult",
    "SnapshotMismatchError",
    "SnapshotStore",
    "check_restore_targets",
    "normalize_named_tensors",
    "optimizer_entries",
    "optimizer_restore_plan",
    "restore_extra_state",
    "state_dict_entries",
]
