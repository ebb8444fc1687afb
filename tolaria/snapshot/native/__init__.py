"""The native snapshot engine: :mod:`~tolaria.snapshot.native.store` (the store),
:mod:`~tolaria.snapshot.native.layout` (arena plans and host buffers) and
:mod:`~tolaria.snapshot.native.cuda` (side streams and events). It needs ``tolaria._C``; this
package face only hands names on."""

from tolaria.snapshot.native.store import NativeSnapshotStore

__all__ = ["NativeSnapshotStore"]
