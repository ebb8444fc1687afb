"""``last_good_state`` as the caller gets it: a plain mutable dict, and what the caller did to it.

The dict holds views over the committed buffer (no copy), so a write through one of its tensors
would change the Last Known Good itself. When the dict is handed out, a CRC-32 of every tensor's
bytes is taken (the bytes are the committed ones at that moment: nobody else had them yet); a
rollback then checks the dict before anything is written:

* a key deleted from it, or added to it, outside ``seed_slots.`` → RuntimeError naming
  "snapshot corruption or architecture drift" and the keys (the original Governor's words);
* a tensor written in place, or a value replaced by another object → RuntimeError naming the
  keys: a modified LKG is refused, never restored (nothing has been written at that point).

Keys inside ``seed_slots.`` may come and go (seeds are pruned, not restored). The checksum is
only paid by callers who read ``last_good_state``; a Governor whose dict was never handed out
skips the check.
"""

from __future__ import annotations

import zlib

import torch

from tolaria.snapshot.seeds import SEED_SLOTS_PREFIX
from tolaria.snapshot.store import tensor_bytes


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(tensor))


class LkgHandout:
    """The dict handed out for one committed LKG (``source``: the store's key → view mapping;
    ``keys``: the keys the caller sees), with the identity and checksum of every value."""

    def __init__(self, source: object, view: dict[str, torch.Tensor]) -> None:
        self.source = source
        self.view = view
        self._keys = frozenset(view)
        self._ids = {key: id(value) for key, value in view.items()}
        self._crcs = {key: _crc(value) for key, value in view.items()}

    def verify(self) -> None:
        """Raise RuntimeError when the caller changed the dict's keys outside ``seed_slots.`` or
        any tensor's bytes (see the module docstring). Writes nothing."""
        live = self.view
        deleted = sorted(k for k in self._keys - live.keys() if not k.startswith(SEED_SLOTS_PREFIX))
        added = sorted(k for k in live.keys() - self._keys if not k.startswith(SEED_SLOTS_PREFIX))
        if deleted or added:
            raise RuntimeError(
                "snapshot corruption or architecture drift: last_good_state lost keys "
                f"{deleted} and gained keys {added} outside {SEED_SLOTS_PREFIX!r}; nothing was restored"
            )
        modified = sorted(
            key
            for key in self._keys & live.keys()
            if id(live[key]) != self._ids[key]
            or not isinstance(live[key], torch.Tensor)
            or _crc(live[key]) != self._crcs[key]
        )
        if modified:
            raise RuntimeError(
                f"snapshot corruption: last_good_state values {modified} were modified after the "
                "snapshot was committed (written in place or replaced); the modified Last Known Good "
                "is refused and nothing was restored. Take a new snapshot() instead of editing it."
            )


__all__ = ["LkgHandout"]
