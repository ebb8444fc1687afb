"""``tolaria doctor``: what this installation can do, and which backend serves what, and why."""

from __future__ import annotations

import importlib.metadata

import torch

from tolaria import _ext, addresses
from tolaria._version import __version__
from tolaria.backends import health_backend_for, snapshot_backend_for, triton_installed, triton_interpreting


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def collect_rows() -> list[tuple[str, str, str]]:
    """Rows of (item, value, detail) describing this installation."""
    rows: list[tuple[str, str, str]] = [
        ("tolaria", __version__, ""),
        ("torch", torch.__version__, f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"),
        ("devices", ", ".join(_device_label(d) for d in _devices()), ""),
    ]
    info = _ext.build_info()
    rows.append(("extension built", _yes_no(info is not None), _ext.unavailable_reason() or "tolaria._C"))
    if info is not None:
        cuda_detail = (
            f"CUDA {info['cuda_version']}, archs {info['cuda_architectures']}, {info['cxx_compiler']}"
            if info["cuda"]
            else f"C++ only, {info['cxx_compiler']}"
        )
        rows.append(("extension with CUDA", _yes_no(bool(info["cuda"])), cuda_detail))
        usable = _ext.cuda_runtime_usable()
        # The detail says what was found, or what is missing: never a "no" next to "visible".
        runtime_detail = "driver and a device visible" if usable else "no CUDA driver or no device visible"
        rows.append(("CUDA runtime usable", _yes_no(usable), runtime_detail))
        bound = addresses.reader_bound()
        why_not = addresses.reader_unbound_reason() or ""
        reader_detail = "torch's data-pointer reader, called from C" if bound else why_not
        rows.append(("address reads in C", _yes_no(bound), reader_detail))
    if triton_installed():
        triton_version = importlib.metadata.version("triton")
        rows.append(("triton installed", "yes", triton_version))
    else:
        rows.append(("triton installed", "no", "pip install 'tolaria[triton]'"))
    rows.append(
        ("triton interpreter", _yes_no(triton_interpreting()), "TRITON_INTERPRET=1 runs kernels on CPU")
    )
    for device in _devices():
        snap = snapshot_backend_for(device)
        rows.append((f"snapshot backend ({device})", snap.backend, snap.reason))
        health = health_backend_for(device)
        rows.append((f"health backend ({device})", health.backend, health.reason))
    return rows


def run_doctor() -> int:
    """Print the doctor table; returns the exit status (always 0: it reports, it does not judge)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="tolaria doctor")
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_column("detail", overflow="fold")
    for item, value, detail in collect_rows():
        # Plain text, not rich markup: "pip install 'tolaria[triton]'" must keep its "[triton]".
        table.add_row(Text(item), Text(value), Text(detail))
    Console().print(table)
    return 0
