"""tolaria: a fail-safe watchdog for PyTorch training.

It detects catastrophic failure (non-finite loss, weights or gradients, loss divergence,
collapse to the random-guess loss, gradient explosions) and rolls the model back to its Last
Known Good state. This module is the public API and nothing else.
"""

from tolaria import _ext  # noqa: F401  (honours TOLARIA_REQUIRE_NATIVE at import time)
from tolaria._version import __version__
from tolaria.clip import clip_grad_norm_
from tolaria.config import WatchConfig
from tolaria.constants import (
    DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE,
    DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
    DEFAULT_GOVERNOR_DEATH_PENALTY,
    DEFAULT_GOVERNOR_HISTORY_WINDOW,
    DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
    DEFAULT_GOVERNOR_SENSITIVITY,
    DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
    MIN_GOVERNOR_HISTORY_SAMPLES,
)
from tolaria.distributed import DistributedGovernorError
from tolaria.environment import create_model, parse_device, validate_device
from tolaria.governor import GovernorReport, SnapshotInfo, TolariaGovernor
from tolaria.guard import GuardedStep, StepOutcome
from tolaria.health import HealthReport, check_tensors
from tolaria.hooks import REASON_SCALER_OVERFLOW, PendingStep, TrainerHook
from tolaria.lifecycle import LifecycleMutationHealthSnapshot, LifecycleMutationVerdict
from tolaria.morphogenesis.stages import LifecycleOp, SeedStage
from tolaria.optim import unwrap_optimizer
from tolaria.protocol import GovernorProtocol
from tolaria.recovery import RecoveryPolicy, SkipList, TrainingAborted, load_last_good
from tolaria.tasks import TaskSpec, available_tasks, get_task_spec
from tolaria.telemetry import (
    CallbackSink,
    ForwardingSink,
    JsonlSink,
    LoggingSink,
    TelemetryEvent,
    TelemetryEventType,
    get_hub,
)

__all__ = [
    "DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE",
    "DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD",
    "DEFAULT_GOVERNOR_DEATH_PENALTY",
    "DEFAULT_GOVERNOR_HISTORY_WINDOW",
    "DEFAULT_GOVERNOR_LOSS_MULTIPLIER",
    "DEFAULT_GOVERNOR_SENSITIVITY",
    "DEFAULT_MIN_PANICS_BEFORE_ROLLBACK",
    "MIN_GOVERNOR_HISTORY_SAMPLES",
    "REASON_SCALER_OVERFLOW",
    "CallbackSink",
    "DistributedGovernorError",
    "ForwardingSink",
    "GovernorProtocol",
    "GovernorReport",
    "GuardedStep",
    "HealthReport",
    "JsonlSink",
    "LifecycleMutationHealthSnapshot",
    "LifecycleMutationVerdict",
    "LifecycleOp",
    "LoggingSink",
    "PendingStep",
    "RecoveryPolicy",
    "SeedStage",
    "SkipList",
    "SnapshotInfo",
    "StepOutcome",
    "TaskSpec",
    "TelemetryEvent",
    "TelemetryEventType",
    "TolariaGovernor",
    "TrainerHook",
    "TrainingAborted",
    "WatchConfig",
    "__version__",
    "available_tasks",
    "check_tensors",
    "clip_grad_norm_",
    "create_model",
    "get_hub",
    "get_task_spec",
    "load_last_good",
    "parse_device",
    "unwrap_optimizer",
    "validate_device",
]
