"""Test-wide set-up.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it must be set before tolaria's kernels
are imported: without a GPU the Triton kernels run on CPU tensors through the interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tolaria import telemetry  # noqa: E402  (after TRITON_INTERPRET, which the import may read)


@pytest.fixture
def events() -> Iterator[list[telemetry.TelemetryEvent]]:
    """Every telemetry event emitted during the test, in order (through a private hub)."""
    seen: list[telemetry.TelemetryEvent] = []
    old = telemetry.set_hub(telemetry.TelemetryHub([telemetry.CallbackSink(seen.append)]))
    yield seen
    telemetry.set_hub(old)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; runs through bench/gpu_check.sh")
    for item in items:
        # The marker itself, not the keyword set: a parametrize id "cuda" must not skip a CPU test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
