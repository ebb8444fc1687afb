"""What the Governor offers beyond watching: the LKG on disk, the recovery policy's step clock,
and esper-lite's seed-lifecycle pre-flight. Mixed into :class:`tolaria.governor.TolariaGovernor`;
each method hands the work to the module that does it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tolaria.health.pairs import GradientNorms
from tolaria.lifecycle import LifecycleMutationVerdict, preflight_lifecycle_mutation
from tolaria.recovery.lkg_file import save_lkg
from tolaria.snapshot.entries import CaptureMeta

if TYPE_CHECKING:
    from tolaria.recovery.ladder import RecoveryLadder
    from tolaria.snapshot.store import SnapshotStore


class GovernorExtras:
    """Mixed into the Governor, which sets the parts annotated below and resolves captures."""

    _store: SnapshotStore
    _ladder: RecoveryLadder | None
    _clock: int
    _known_gradients: GradientNorms | None

    def _resolve(self, *, drain: bool = False) -> object: ...

    # -- the LKG on disk ------------------------------------------------------------------------
    def save_last_good(self, path: str | Path, *, overwrite: bool = False, step: int | None = None) -> Path:
        """Write the committed LKG (model and, when known, optimizer state) to the folder ``path``:
        safetensors for the tensors plus a JSON manifest with a checksum per tensor
        (:mod:`tolaria.recovery.lkg_file`; load it with :func:`tolaria.load_last_good`). Resolves
        a pending capture first. Raises RuntimeError without a committed LKG, FileExistsError when
        ``path`` exists and not ``overwrite``; a failed write leaves nothing that loads."""
        self._resolve(drain=True)
        saved, meta = self._store.last_good_state, self._store.lkg_meta
        if saved is None or not isinstance(meta, CaptureMeta):
            raise RuntimeError("no Last Known Good snapshot to save (no snapshot was ever committed)")
        return save_lkg(path, saved, meta, step=step, overwrite=overwrite)

    def resolve_snapshot(self) -> None:
        """Settle an in-flight capture now (waiting for its copy and for the deferred verdicts it
        needs), as reading ``last_good_state`` would, without handing the dict out (no checksum of
        its bytes is taken). For callers that must order a step after the capture themselves."""
        self._resolve(drain=True)

    def _save_for_abort(self, path: Path) -> Path:
        return self.save_last_good(path, overwrite=True, step=self._clock)

    def recovery_healthy_step(self) -> None:
        """Tell the recovery policy a step was healthy (warms the learning rate back)."""
        if self._ladder is not None:
            self._ladder.healthy_step()

    # -- gradients measured elsewhere ------------------------------------------------------------
    def use_gradient_norms(self, norms: GradientNorms) -> None:
        """Let the next :meth:`check_health` / :meth:`observe` judge the gradients by ``norms``
        (per-tensor L2 norms someone already computed: :func:`tolaria.clip_grad_norm_` hands
        them here) instead of reading them again. Used once; a gradient replaced since (a new
        backward) is read as usual."""
        self._known_gradients = norms

    # -- lifecycle ---------------------------------------------------------------------------
    def preflight_lifecycle_mutation(self, **request: Any) -> LifecycleMutationVerdict:
        """Approve or veto a seed-lifecycle mutation before the host applies it (esper-lite's
        trainer asks before germinating, pruning, ...); see
        :func:`tolaria.lifecycle.preflight_lifecycle_mutation` for the keyword arguments and the
        rules. Raises TypeError for a missing or unknown argument."""
        return preflight_lifecycle_mutation(**request)


__all__ = ["GovernorExtras"]
