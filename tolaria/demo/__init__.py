"""``tolaria demo``: watch a real training run get sick and recover.

:func:`run_demo` trains a morphogenetic model under :class:`tolaria.guard.GuardedStep`, injects
scheduled faults (:mod:`tolaria.demo.faults`), and returns a :class:`DemoResult`;
:mod:`tolaria.demo.report` shows it (progress bar, summary table, loss plot).
"""

from __future__ import annotations

from tolaria.demo.faults import FAULT_KINDS, FaultSpecError, ScheduledFault, parse_fault_spec
from tolaria.demo.results import DemoResult, FaultRecord
from tolaria.demo.runner import DEFAULT_STEPS, DemoConfig, run_demo

__all__ = [
    "DEFAULT_STEPS",
    "FAULT_KINDS",
    "DemoConfig",
    "DemoResult",
    "FaultRecord",
    "FaultSpecError",
    "ScheduledFault",
    "parse_fault_spec",
    "run_demo",
]
