"""The Last Known Good on disk: safetensors for the tensors, a JSON manifest for the rest.

A saved LKG is a folder holding ``tensors.safetensors`` (model and optimizer-state tensors) and
``manifest.json`` (keys, shapes, dtypes, a SHA-256 per tensor, the step, the tolaria version, the
module extra state and the optimizer's non-tensor state as JSON). Nothing is pickled, and nothing
loads unverified: :func:`load_last_good` recomputes every checksum before it writes a byte into
the model. A save goes into a temporary folder beside the target and is renamed into place, so a
crash mid-write never leaves a folder that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tolaria._version import __version__
from tolaria.snapshot.entries import OPTIMIZER_KEY_PREFIX, CaptureMeta, check_optimizer
from tolaria.snapshot.store import tensor_bytes

FORMAT = "tolaria-lkg"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"


class LkgFileError(ValueError):
    """A saved Last Known Good is missing, corrupt, or does not fit the model it is loaded into."""


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def _json_value(where: str, value: object) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{where} cannot be saved without pickle (not plain JSON): {error}") from error
    return value


def _optimizer_manifest(meta: CaptureMeta) -> list[dict[str, Any]] | None:
    if meta.optimizer is None:
        return None
    params = []
    for index, (_, spec) in enumerate(meta.optimizer.per_param):
        state: dict[str, Any] = {}
        for name, entry in spec.items():
            if entry[0] == "tensor":
                # Where the live tensor lived: Adam keeps ``step`` on the CPU beside CUDA moments.
                state[name] = {"tensor": entry[1], "on_cpu": torch.device(entry[2]).type == "cpu"}
            else:
                state[name] = {"value": _json_value(f"optimizer state {index}/{name}", entry[1])}
        params.append({"index": index, "state": state})
    return params


def save_lkg(
    path: str | Path,
    saved: Mapping[str, torch.Tensor],
    meta: CaptureMeta,
    *,
    step: int | None,
    overwrite: bool,
) -> Path:
    """Write the committed LKG ``saved`` (store key → CPU tensor, optimizer entries included)
    with its ``meta`` to the folder ``path``; returns the path.

    Raises FileExistsError when ``path`` exists and ``overwrite`` is False (nothing written), and
    TypeError when extra state or optimizer state is not plain JSON (nothing written)."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} exists; pass overwrite=True to replace it")
    extras = {key: _json_value(f"extra state {key!r}", value) for key, value in meta.extras.items()}
    optimizer = _optimizer_manifest(meta)
    # Views of one host buffer share storage, which safetensors refuses: save contiguous copies.
    tensors = {key: value.detach().clone().contiguous() for key, value in saved.items()}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tolaria": __version__,
        "step": step,
        "model_keys": list(meta.model_keys),
        "tensors": {
            key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": _digest(t)}
            for key, t in tensors.items()
        },
        "extras": extras,
        "optimizer": optimizer,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        save_file(tensors, str(staging / TENSORS_FILE))
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_lkg(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the tensors of a saved LKG, every checksum verified.

    Raises LkgFileError naming the path (missing or unreadable files, not a tolaria LKG) or the
    first tensor whose bytes do not match its checksum."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LkgFileError(f"{str(folder)!r} has no readable {MANIFEST_FILE}: {error}") from error
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != FORMAT_VERSION
    ):
        raise LkgFileError(
            f"{str(folder)!r} is not a tolaria Last Known Good (format {FORMAT} v{FORMAT_VERSION})"
        )
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise LkgFileError(f"{str(folder / TENSORS_FILE)!r} cannot be read: {error}") from error
    expected: dict[str, dict[str, Any]] = manifest["tensors"]
    if set(expected) != set(tensors):
        raise LkgFileError(f"{str(folder)!r}: the tensors do not match the manifest's keys")
    for key, info in expected.items():
        if _digest(tensors[key]) != info["sha256"]:
            raise LkgFileError(f"{str(folder)!r}: tensor {key!r} fails its checksum (the file is corrupt)")
    return manifest, tensors


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def load_last_good(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int | None:
    """Restore a saved LKG into ``model`` (and ``optimizer``) bit-exactly; returns its step.

    Everything is verified and checked against the live model before anything is written:
    LkgFileError for a corrupt file, a key the model lacks or has in addition, or a shape/dtype
    that differs; TypeError for a non-optimizer. Parameters keep their identity."""
    check_optimizer(optimizer)
    manifest, tensors = read_lkg(path)
    live = model.state_dict(keep_vars=True)
    model_keys = [k for k in manifest["model_keys"] if k in tensors]
    live_tensors = {k for k, v in live.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(live_tensors - set(model_keys)), sorted(set(model_keys) - live_tensors)
    if missing or unexpected:
        raise LkgFileError(
            f"the saved LKG does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    bad = [k for k in model_keys if live[k].shape != tensors[k].shape or live[k].dtype != tensors[k].dtype]
    if bad:
        raise LkgFileError(f"the saved LKG does not fit the model: shape or dtype differs for {bad}")
    plan = manifest["optimizer"]
    params = _optimizer_params(optimizer) if optimizer is not None else []
    if optimizer is not None and plan is not None and len(plan) != len(params):
        raise LkgFileError(
            f"the saved optimizer state has {len(plan)} parameters, the optimizer {len(params)}"
        )
    with torch.no_grad():
        for key in model_keys:
            live[key].data.copy_(tensors[key])
    for key, value in manifest["extras"].items():
        if key in live and key.endswith("_extra_state"):
            model.get_submodule(key[: -len("_extra_state")].rstrip(".")).set_extra_state(value)
    if optimizer is not None:
        optimizer.state.clear()
        for entry in plan or []:
            param = params[entry["index"]]
            state: dict[str, Any] = {}
            for name, item in entry["state"].items():
                if "tensor" in item:
                    key = item["tensor"]
                    assert key.startswith(OPTIMIZER_KEY_PREFIX)
                    device = torch.device("cpu") if item.get("on_cpu", True) else param.device
                    state[name] = tensors[key].to(device, copy=True)
                else:
                    state[name] = item["value"]
            if state:
                optimizer.state[param] = state
    step = manifest.get("step")
    return step if isinstance(step, int) else None


__all__ = ["FORMAT", "LkgFileError", "load_last_good", "read_lkg", "save_lkg"]
