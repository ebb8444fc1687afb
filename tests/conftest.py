"""Test-wide set-up.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it must be set before tolaria's kernels
are imported: without a GPU the Triton kernels run on CPU tensors through the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; runs through bench/gpu_check.sh")
    for item in items:
        # The marker itself, not the keyword set: a parametrize id "cuda" must not skip a CPU test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
