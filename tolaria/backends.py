"""Which compiled or pure-PyTorch backend serves a device, and why.

One answer for everybody: the snapshot and health dispatchers resolve ``"auto"`` through
these functions, and ``tolaria doctor`` prints the same answers with their reasons.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from tolaria import _ext
from tolaria._ext import triton_interpreting
from tolaria.health.dispatch import triton_health, triton_health_error


@dataclass(frozen=True)
class BackendChoice:
    """The backend that ``"auto"`` picks for a device, and the reason in words."""

    backend: str
    reason: str


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def snapshot_backend_for(device: torch.device) -> BackendChoice:
    """The snapshot store that ``snapshot_backend="auto"`` uses for tensors on ``device``."""
    if _ext.extension() is None:
        return BackendChoice("reference", _ext.unavailable_reason() or "extension unavailable")
    if device.type == "cpu":
        return BackendChoice("native", "compiled extension loaded; CPU arena with threaded memcpy")
    if device.type == "cuda":
        info = _ext.build_info() or {}
        if not info.get("cuda"):
            return BackendChoice(
                "reference", "extension was built without CUDA (TOLARIA_CUDA=OFF or no nvcc)"
            )
        if not _ext.cuda_runtime_usable():
            return BackendChoice("reference", "extension has CUDA but no usable driver/device")
        return BackendChoice("native", "compiled CUDA engine: pinned arena, side-stream capture")
    return BackendChoice("reference", f"no native engine for device type {device.type!r}")


def health_backend_for(device: torch.device) -> BackendChoice:
    """The health backend that ``backend="auto"`` uses for tensors on ``device``."""
    if device.type == "cuda":
        if triton_health() is not None:
            return BackendChoice("triton", "CUDA tensors and Triton importable: one fused launch per dtype")
        if not triton_installed():
            return BackendChoice("reference", "Triton is not installed (pip install 'tolaria[triton]')")
        return BackendChoice("reference", f"Triton does not import here: {triton_health_error()}")
    if device.type == "cpu" and _ext.extension() is not None:
        return BackendChoice("native", "compiled extension loaded: one pass over every CPU tensor in place")
    if device.type == "cpu":
        why = _ext.unavailable_reason() or "extension unavailable"
        return BackendChoice("reference", f"the batched pure-PyTorch check ({why})")
    return BackendChoice(
        "reference",
        f"{device.type} tensors use the batched pure-PyTorch check (Triton serves CUDA tensors, the"
        " compiled pass CPU tensors)",
    )


__all__ = [
    "BackendChoice",
    "health_backend_for",
    "snapshot_backend_for",
    "triton_health",
    "triton_health_error",
    "triton_installed",
    "triton_interpreting",
]
