"""The package, its compiled extension and ``tolaria doctor``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import tolaria
from tolaria import _ext

REPO = Path(__file__).resolve().parents[1]


def _nvcc_present() -> bool:
    return bool(
        os.environ.get("CUDACXX") or shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()
    )


def _run_python(
    code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120
    )


def test_version_is_exposed() -> None:
    from tolaria._version import __version__

    assert tolaria.__version__ == __version__
    assert __version__.count(".") == 2


def test_extension_loads() -> None:
    assert _ext.extension() is not None, _ext.unavailable_reason()
    assert _ext.unavailable_reason() is None


def test_build_info_fields_and_cuda_compiled_where_nvcc_exists() -> None:
    info = _ext.build_info()
    assert info is not None
    assert set(info) >= {"version", "cuda", "cuda_version", "cuda_architectures", "cxx_compiler"}
    assert info["version"] == tolaria.__version__
    wanted_cuda = _nvcc_present() and os.environ.get("TOLARIA_CUDA", "AUTO").upper() != "OFF"
    assert info["cuda"] is wanted_cuda
    if info["cuda"]:
        archs = info["cuda_architectures"]
        assert "native" not in archs
        if not os.environ.get("CUDAARCHS"):
            assert {"80-real", "90-real", "90-virtual"} <= set(archs.split(","))


def test_cuda_runtime_available_is_quiet_and_honest(capfd: pytest.CaptureFixture[str]) -> None:
    module = _ext.extension()
    assert module is not None
    available = module.cuda_runtime_available()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert available is (torch.cuda.is_available() and bool(_ext.build_info()["cuda"]))


def test_require_native_turns_missing_extension_into_import_error() -> None:
    hide_extension = "import sys; sys.modules['tolaria._C'] = None; import tolaria"
    strict = _run_python(hide_extension, env={"TOLARIA_REQUIRE_NATIVE": "1"})
    assert strict.returncode != 0
    assert "ImportError" in strict.stderr and "TOLARIA_REQUIRE_NATIVE" in strict.stderr
    assert "tolaria._C" in strict.stderr  # the reason travels with the error

    lenient = _run_python(
        hide_extension + "; from tolaria import _ext, backends; import torch;"
        "print(_ext.unavailable_reason()); print(backends.snapshot_backend_for(torch.device('cpu')).backend)",
        env={"TOLARIA_REQUIRE_NATIVE": "0"},
    )
    assert lenient.returncode == 0, lenient.stderr
    reason, backend = lenient.stdout.strip().splitlines()
    assert "tolaria._C" in reason
    assert backend == "reference"


def test_doctor_runs_and_names_each_backend() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tolaria", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for item in (
        "tolaria",
        "torch",
        "extension built",
        "address reads in C",
        "triton installed",
        "snapshot backend (cpu)",
        "health backend (cpu)",
    ):
        assert item in out
    assert tolaria.__version__ in out
    from tolaria.backends import health_backend_for, snapshot_backend_for

    cpu = torch.device("cpu")
    assert snapshot_backend_for(cpu).backend in out
    assert health_backend_for(cpu).backend in out


def test_doctor_says_what_is_missing_and_prints_extras_whole(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tolaria import doctor

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(doctor, "triton_installed", lambda: False)
    monkeypatch.setattr(doctor._ext, "cuda_runtime_usable", lambda: False)
    info = {"cuda": True, "cuda_version": "13.0", "cuda_architectures": "90-real", "cxx_compiler": "GNU 12"}
    monkeypatch.setattr(doctor._ext, "build_info", lambda: info)
    assert doctor.run_doctor() == 0
    lines = capsys.readouterr().out.splitlines()
    (runtime,) = [line for line in lines if "CUDA runtime usable" in line]
    assert "no CUDA driver or no device visible" in runtime
    (triton,) = [line for line in lines if "triton installed" in line]
    # rich reads "[triton]" as markup unless told not to: the hint must keep it.
    assert "pip install 'tolaria[triton]'" in triton


def _fake_python(tmp_path: Path, *, has_torch: bool) -> Path:
    """A stand-in for python that says whether torch imports and logs each pip call it gets."""
    fake = tmp_path / "python"
    torch_check = "echo 9.9.9; exit 0" if has_torch else "exit 1"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then {torch_check}; fi\necho "PIP $*"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("has_torch", [False, True])
def test_setup_says_what_it_does_before_each_long_step(tmp_path: Path, has_torch: bool) -> None:
    fake = _fake_python(tmp_path, has_torch=has_torch)
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "test"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": str(fake)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    pips = [index for index, line in enumerate(lines) if line.startswith("PIP ")]
    if has_torch:
        assert "setup: keeping the installed torch 9.9.9" in lines
        (editable,) = pips
    else:
        torch_pip, editable = pips
        assert "torch==2.13.0" in lines[torch_pip]
        assert lines[torch_pip - 1] == "setup: installing torch 2.13.0 (CPU build)..."
    assert "-e .[test]" in lines[editable]
    announce = lines[editable - 1]
    assert announce.startswith("setup: installing tolaria[test]") and "compiled extension" in announce
    assert lines[-1].startswith("setup: done")


def test_cli_rejects_unknown_command() -> None:
    done = subprocess.run([sys.executable, "-m", "tolaria", "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def _cmake_configure(tmp_path: Path, *defines: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import pybind11

    return subprocess.run(
        [
            "cmake",
            "-S",
            str(REPO),
            "-B",
            str(tmp_path / "build"),
            "-G",
            "Ninja",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DSKBUILD_PROJECT_VERSION=0.0.0",
            f"-DPython_EXECUTABLE={sys.executable}",
            *defines,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


@pytest.mark.slow
def test_cuda_on_without_compiler_is_a_clear_configure_error(tmp_path: Path) -> None:
    done = _cmake_configure(tmp_path, "-DTOLARIA_CUDA=ON", env={"CUDACXX": str(tmp_path / "no-nvcc")})
    assert done.returncode != 0
    assert "TOLARIA_CUDA=ON but no CUDA compiler was found" in done.stdout + done.stderr


@pytest.mark.slow
def test_bad_cuda_switch_value_is_rejected(tmp_path: Path) -> None:
    done = _cmake_configure(tmp_path, "-DTOLARIA_CUDA=maybe", env={})
    assert done.returncode != 0
    assert "TOLARIA_CUDA must be AUTO, ON or OFF" in done.stdout + done.stderr


@pytest.mark.slow
def test_cpu_only_build_yields_a_working_package(tmp_path: Path) -> None:
    """Build a wheel with TOLARIA_CUDA=OFF into a temporary directory and use it."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "-w",
            str(wheels),
            "-C",
            f"build-dir={tmp_path / 'build'}",
            str(REPO),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TOLARIA_CUDA": "OFF"},
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("tolaria-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # -S keeps the editable install's import hooks out; torch comes from site-packages by path.
    probe = (
        "import tolaria, tolaria._ext as e; import tolaria.backends as b; import torch;"
        "info = e.build_info(); print(tolaria.__file__); print(info['cuda']);"
        "print(e.extension().cuda_runtime_available());"
        "print(b.snapshot_backend_for(torch.device('cuda')).backend)"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={
            **os.environ,
            "PYTHONPATH": f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}",
            "TOLARIA_REQUIRE_NATIVE": "1",
        },
    )
    assert done.returncode == 0, done.stderr
    location, cuda, runtime, cuda_backend = done.stdout.strip().splitlines()
    assert location.startswith(str(site))
    assert cuda == "False"
    assert runtime == "False"
    assert cuda_backend == "reference"
