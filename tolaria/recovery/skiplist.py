"""The batches a resumed run skips: recorded when a rollback happens, read back on restart.

:class:`BatchLog` remembers the identity of every batch a guarded step saw since the Last Known
Good was taken (any JSON-serialisable value the loop passes: a sampler index, a shard offset).
On a rollback those batches are the poisoned window; they are appended to a skip file, written
atomically (a temporary file in the same folder, then ``os.replace``), so a crash mid-write
loses nothing. :class:`SkipList` reads that file back and drops the batches from an iterable or a
``torch.utils.data.Sampler``. A file that cannot be read or parsed is an error, never an empty
list; a file that does not exist yet means nothing was skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch.utils.data

SKIP_FILE_VERSION = 1


class SkipFileError(ValueError):
    """A skip file exists but cannot be read or is not a tolaria skip file."""


def _frozen(value: object) -> Any:
    """A hashable form of a JSON value (lists become tuples), to compare batch identities."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


def read_skip_file(path: str | Path) -> list[Any]:
    """The batch identities recorded in ``path`` ([] when the file does not exist).

    Raises SkipFileError naming the path when it cannot be read or parsed."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SkipFileError(f"skip file {str(path)!r} cannot be read: {error}") from error
    if (
        not isinstance(document, dict)
        or document.get("version") != SKIP_FILE_VERSION
        or not isinstance(document.get("skipped"), list)
    ):
        raise SkipFileError(
            f"skip file {str(path)!r} is not a tolaria skip file "
            f'(expected {{"version": {SKIP_FILE_VERSION}, "skipped": [...]}})'
        )
    return list(document["skipped"])


def append_to_skip_file(path: str | Path, batch_ids: Iterable[object]) -> None:
    """Add ``batch_ids`` to the skip file (created when missing), atomically.

    Raises TypeError for an identity that is not JSON-serialisable (nothing written) and
    SkipFileError when the existing file is corrupt (it is left as it is)."""
    path = Path(path)
    skipped = read_skip_file(path)
    seen = {_frozen(v) for v in skipped}
    for batch_id in batch_ids:
        if _frozen(batch_id) not in seen:
            seen.add(_frozen(batch_id))
            skipped.append(batch_id)
    try:
        text = json.dumps({"version": SKIP_FILE_VERSION, "skipped": skipped}, indent=1)
    except (TypeError, ValueError) as error:
        raise TypeError(f"batch_id values must be JSON-serialisable: {error}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class BatchLog:
    """The batch identities seen since the Last Known Good (the window a rollback abandons)."""

    def __init__(self) -> None:
        self._since_lkg: list[Any] = []

    def saw(self, batch_id: object) -> None:
        """Record this step's batch; raises TypeError at once for a non-JSON identity."""
        try:
            json.dumps(batch_id)
        except (TypeError, ValueError) as error:
            raise TypeError(f"batch_id must be JSON-serialisable, got {type(batch_id).__name__}") from error
        self._since_lkg.append(batch_id)

    def committed(self, keep_last: bool) -> None:
        """A snapshot became the LKG: forget the older batches (``keep_last``: the batch of the
        step that took it, whose update comes after the LKG, stays in the window)."""
        self._since_lkg = self._since_lkg[-1:] if keep_last and self._since_lkg else []

    def take_window(self) -> tuple[Any, ...]:
        """The batches of the abandoned window (and forget them: the model is at the LKG now)."""
        window, self._since_lkg = tuple(self._since_lkg), []
        return window


class SkipList:
    """The batches recorded in a skip file, as a filter for a resumed run.

    ``batch_id in skips``; ``skips.filter(iterable, key=...)`` yields the items whose identity
    (``key(item)``, default the item itself) was not skipped; ``skips.wrap(sampler)`` is a
    ``Sampler`` that yields the sampler's indices that were not skipped.
    Raises SkipFileError for an unreadable or corrupt file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.skipped = tuple(read_skip_file(self.path))
        self._set = {_frozen(v) for v in self.skipped}

    def __contains__(self, batch_id: object) -> bool:
        return _frozen(batch_id) in self._set

    def __len__(self) -> int:
        return len(self.skipped)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.skipped)

    def filter(self, items: Iterable[Any], key: Callable[[Any], object] | None = None) -> Iterator[Any]:
        for item in items:
            if (key(item) if key is not None else item) not in self:
                yield item

    def wrap(self, sampler: Iterable[int]) -> SkippingSampler:
        return SkippingSampler(sampler, self)


class SkippingSampler(torch.utils.data.Sampler[int]):
    """A sampler that drops the indices a :class:`SkipList` holds."""

    def __init__(self, sampler: Iterable[int], skips: SkipList) -> None:
        self.sampler = sampler
        self.skips = skips

    def __iter__(self) -> Iterator[int]:
        return self.skips.filter(self.sampler)

    def __len__(self) -> int:
        return sum(1 for _ in self)


__all__ = [
    "BatchLog",
    "SKIP_FILE_VERSION",
    "SkipFileError",
    "SkipList",
    "SkippingSampler",
    "append_to_skip_file",
    "read_skip_file",
]
