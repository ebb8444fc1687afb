"""Recovery that escapes the fault: the policy, its ladder, the skip list, the LKG on disk.

:mod:`~tolaria.recovery.policy` (RecoveryPolicy, TrainingAborted), :mod:`~tolaria.recovery.ladder`
(what the policy does after a rollback), :mod:`~tolaria.recovery.lr` (a learning-rate factor that
composes with schedulers), :mod:`~tolaria.recovery.skiplist` (batches a resumed run skips) and
:mod:`~tolaria.recovery.lkg_file` (safetensors + a verified manifest). This face only hands names on.
"""

from tolaria.recovery.ladder import RecoveryLadder, RecoveryStats
from tolaria.recovery.lkg_file import LkgFileError, load_last_good
from tolaria.recovery.policy import RecoveryPolicy, TrainingAborted
from tolaria.recovery.skiplist import SkipFileError, SkipList

__all__ = [
    "LkgFileError",
    "RecoveryLadder",
    "RecoveryPolicy",
    "RecoveryStats",
    "SkipFileError",
    "SkipList",
    "TrainingAborted",
    "load_last_good",
]
