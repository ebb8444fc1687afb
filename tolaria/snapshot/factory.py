"""Which snapshot store a Governor gets.

``make_store(backend)`` picks the implementation: ``"reference"`` (pure PyTorch, always
available), ``"native"`` (the compiled engine in :mod:`tolaria.snapshot.native`), or ``"auto"``
(native when it imports and constructs, else reference).
"""

from __future__ import annotations

import logging

import torch

from tolaria.backends import snapshot_backend_for
from tolaria.snapshot.reference import ReferenceSnapshotStore
from tolaria.snapshot.store import SnapshotStore

logger = logging.getLogger(__name__)

SNAPSHOT_BACKENDS = ("auto", "native", "reference")


def _make_native(**options: object) -> SnapshotStore:
    """Construct the native store or raise RuntimeError carrying why it is unavailable."""
    try:
        from tolaria.snapshot.native import NativeSnapshotStore  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise RuntimeError(f"snapshot backend 'native' is unavailable: {exc}") from exc
    try:
        store = NativeSnapshotStore(**options)  # type: ignore[arg-type]
    except (ImportError, OSError, RuntimeError) as exc:
        # e.g. the module imports but tolaria._C was not built, or the CUDA runtime is missing
        raise RuntimeError(f"snapshot backend 'native' is unavailable: {exc}") from exc
    if not isinstance(store, SnapshotStore):
        raise RuntimeError(
            "snapshot backend 'native' is unavailable: NativeSnapshotStore is not a SnapshotStore"
        )
    return store


#: Options both stores understand; the rest (double_buffer, threads, ...) tune the native engine.
_SHARED_OPTIONS = frozenset({"health_backend", "pin_memory"})


def _make_reference(options: dict[str, object]) -> SnapshotStore:
    """The reference store, given only the options it understands: when ``"auto"`` falls back,
    native-only tuning options must not turn the fall-back into a TypeError."""
    ignored = sorted(set(options) - _SHARED_OPTIONS)
    if ignored:
        logger.debug("reference snapshot store ignores native-only options %s", ignored)
    return ReferenceSnapshotStore(**{k: v for k, v in options.items() if k in _SHARED_OPTIONS})  # type: ignore[arg-type]


def make_store(
    backend: str = "auto", *, device: torch.device | None = None, **options: object
) -> SnapshotStore:
    """Create a snapshot store.

    Args:
        backend: one of ``SNAPSHOT_BACKENDS``.
        device: where the captured tensors live; lets ``"auto"`` follow
            :func:`tolaria.backends.snapshot_backend_for` (e.g. reference for a CUDA model when
            the extension was built without CUDA). None: try native, else reference.
        **options: passed to the store's constructor (e.g. ``health_backend``).

    Raises:
        ValueError: ``backend`` is not one of ``SNAPSHOT_BACKENDS``.
        RuntimeError: ``backend="native"`` and the native engine cannot be used; the message
            carries the reason.
    """
    if backend not in SNAPSHOT_BACKENDS:
        raise ValueError(f"snapshot_backend must be one of {SNAPSHOT_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return ReferenceSnapshotStore(**options)  # type: ignore[arg-type]
    if backend == "native":
        return _make_native(**options)
    if device is not None:
        choice = snapshot_backend_for(torch.device(device))
        if choice.backend != "native":
            logger.debug("snapshot backend 'auto' uses %r: %s", choice.backend, choice.reason)
            return _make_reference(options)
    try:
        return _make_native(**options)
    except RuntimeError as exc:
        logger.debug("snapshot backend 'auto' falls back to 'reference': %s", exc)
        return _make_reference(options)


__all__ = ["SNAPSHOT_BACKENDS", "make_store"]
