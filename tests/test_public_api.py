"""The drop-in surface: code written for esper-lite's Tolaria imports and calls the same names."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import tolaria
from tolaria import constants


def test_original_names_are_exported() -> None:
    for name in ("TolariaGovernor", "GovernorReport", "create_model"):
        assert hasattr(tolaria, name)
    for name in tolaria.__all__:
        assert hasattr(tolaria, name), name


def test_constants_keep_original_values() -> None:
    assert constants.DEFAULT_GOVERNOR_SENSITIVITY == 6.0
    assert constants.DEFAULT_GOVERNOR_LOSS_MULTIPLIER == 3.0
    assert constants.DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD == 12.0
    assert constants.DEFAULT_GOVERNOR_DEATH_PENALTY == 10.0
    assert constants.DEFAULT_GOVERNOR_HISTORY_WINDOW == 20
    assert constants.DEFAULT_MIN_PANICS_BEFORE_ROLLBACK == 3
    assert constants.MIN_GOVERNOR_HISTORY_SAMPLES == 10
    assert constants.DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE == 5


def test_governor_report_keeps_original_fields_first() -> None:
    names = [f.name for f in dataclasses.fields(tolaria.GovernorReport)]
    original = ["reason", "loss_at_panic", "loss_threshold", "consecutive_panics", "rollback_occurred"]
    assert names[:5] == original


def test_rollback_signature() -> None:
    sig = inspect.signature(tolaria.TolariaGovernor.execute_rollback)
    assert sig.parameters["env_id"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["env_id"].default == 0
    assert sig.parameters["optimizer"].default is None


def test_trainer_hook_names_are_exported() -> None:
    for name in ("TrainerHook", "PendingStep", "StepOutcome", "REASON_SCALER_OVERFLOW", "unwrap_optimizer"):
        assert name in tolaria.__all__, name
    assert tolaria.REASON_SCALER_OVERFLOW == "governor_scaler_overflow"


def test_guarded_step_keeps_its_signature_and_adds_keyword_options() -> None:
    parameters = inspect.signature(tolaria.GuardedStep).parameters
    assert list(parameters)[:2] == ["governor", "optimizer"]
    options = ("snapshot_every", "track_grad_norm", "deferred", "backward", "scaler", "scaler_overflow_limit")
    for name in options:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_importing_tolaria_imports_no_training_framework() -> None:
    frameworks = ("lightning", "pytorch_lightning", "transformers", "accelerate")
    script = (
        "import sys, tolaria, tolaria.integrations\n"
        f"loaded = [name for name in {frameworks!r} if name in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
