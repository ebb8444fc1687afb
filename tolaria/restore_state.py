"""A restore is all or nothing, as the caller sees it.

From the first write into the model to the last pruned seed, :class:`RestoreState` marks the
model *restore incomplete*:

* a SIGINT (Ctrl-C) that arrives in that window on the main thread is held until the restore is
  complete, then delivered to the handler that was installed (a second SIGINT meanwhile is
  delivered at once, so a hung hook can still be interrupted). The model is then the LKG, whole,
  when the KeyboardInterrupt reaches a ``finally:`` that checkpoints it;
* anything that escapes the window (an exception from a hook, an interrupt that could not be
  held: off the main thread, the second Ctrl-C) leaves the mark set, with what interrupted it.
  While it is set the Governor refuses ``snapshot()`` (RuntimeError), every check panics with
  ``governor_restore_incomplete``, ``last_good_state`` is intact (a restore never writes the LKG)
  and the next ``execute_rollback()`` restores everything again and clears the mark.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from tolaria.vitals import REASON_RESTORE_INCOMPLETE
from tolaria.watch import Panic, Watch


class RestoreState:
    """Whether the model is a half-finished restore: ``incomplete`` says what interrupted the
    last restore, None when the model is whole (module docstring)."""

    def __init__(self) -> None:
        self.incomplete: str | None = None

    def refusal(self, what: str) -> str:
        """The message of ``what`` (an operation) refused while the mark is set."""
        return (
            f"{what} refused: a rollback was interrupted ({self.incomplete}), so the model is half "
            "restored (a mix of the Last Known Good and the state before it). Call execute_rollback() "
            "to finish the restore; the Last Known Good is intact"
        )

    def refuse(self, what: str, vote: Callable[[bool], bool] | None = None) -> None:
        """RuntimeError (:meth:`refusal`) while the mark is set; first ``vote(False)``, so the
        peers of a process group, which vote on their own captures, do not wait for this one."""
        if self.incomplete is None:
            return
        if vote is not None:
            vote(False)
        raise RuntimeError(self.refusal(what))

    def panic(self, watch: Watch) -> Panic | None:
        """While the mark is set: the ``governor_restore_incomplete`` panic, kept in ``watch``
        for the rollback that completes the restore; None otherwise."""
        if self.incomplete is None:
            return None
        return watch.keep(
            Panic(reason=REASON_RESTORE_INCOMPLETE, loss=math.nan, threshold=math.nan, consecutive=1)
        )

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The window in which the model is written: marked incomplete unless it ends normally,
        SIGINT held (main thread) until it ends."""
        self.incomplete = "the restore started and did not finish"
        with sigint_held():  # a held Ctrl-C is delivered on the way out, after the mark is cleared
            try:
                yield
            except BaseException as error:
                self.incomplete = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                raise
            self.incomplete = None


@contextmanager
def sigint_held() -> Iterator[None]:
    """Hold a SIGINT until the block ends, then deliver it to the handler that was installed; a
    second SIGINT meanwhile is delivered at once. Holds nothing off the main thread (only it can
    install handlers) or where no Python handler can be installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    held: list[FrameType | None] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:  # the second one: the user insists
            _deliver(previous, signum, frame)
            return
        held.append(frame)

    try:
        signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError, TypeError):  # e.g. an interpreter embedded without signal support
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            _deliver(previous, signal.SIGINT, held[0])


def _deliver(handler: Any, signum: int, frame: FrameType | None) -> None:
    """Hand a held SIGINT to ``handler`` as the interpreter would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, now that the default is back
    # SIG_IGN, or None (a handler not installed from Python): dropped, as it would have been


__all__ = ["RestoreState", "sigint_held"]
