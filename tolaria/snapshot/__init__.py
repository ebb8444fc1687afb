"""Last Known Good: capture, verify, commit, restore.

:mod:`~tolaria.snapshot.store` is the store interface and the double-buffer base both stores
share; :mod:`~tolaria.snapshot.reference` the pure-PyTorch store; :mod:`~tolaria.snapshot.native`
the compiled engine; :mod:`~tolaria.snapshot.factory` picks one (``make_store``);
:mod:`~tolaria.snapshot.entries` and :mod:`~tolaria.snapshot.seeds` say what a Governor
snapshot holds; :mod:`~tolaria.snapshot.ties` finds tied weights. This face only hands names on.
"""

from tolaria.snapshot.factory import SNAPSHOT_BACKENDS, make_store
from tolaria.snapshot.reference import ReferenceSnapshotStore
from tolaria.snapshot.store import (
    CaptureTicket,
    Resolution,
    RestoreResult,
    SnapshotMismatchError,
    SnapshotStore,
)

__all__ = [
    "SNAPSHOT_BACKENDS",
    "CaptureTicket",
    "ReferenceSnapshotStore",
    "Resolution",
    "RestoreResult",
    "SnapshotMismatchError",
    "SnapshotStore",
    "make_store",
]
