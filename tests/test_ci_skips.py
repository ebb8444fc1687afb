"""On CI a skipped CPU test fails (tests/conftest.py): a pytest run of a scratch suite, once as
CI runs it and once as a developer does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = '''
import pytest

def test_runs():
    pass

def test_skips_at_run_time():
    pytest.skip("a dependency is missing")

@pytest.mark.cuda
def test_needs_a_gpu():
    pass

@pytest.mark.xfail(reason="a known bug")
def test_known_bug():
    assert False
'''

SKIPPED_MODULE = '''
import pytest

pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
'''


def run_suite(tmp_path: Path, *, ci: str | None, module: str = SUITE) -> subprocess.CompletedProcess[str]:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_scratch.py").write_text(module)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_on_ci_a_skipped_cpu_test_fails_and_a_cuda_test_may_skip(tmp_path: Path) -> None:
    done = run_suite(tmp_path, ci="true")
    assert done.returncode == 1, done.stdout
    assert "FAILED test_scratch.py::test_skips_at_run_time - skipped on CI" in done.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in done.stdout  # the cuda test skips


@pytest.mark.slow
def test_on_ci_a_module_skipped_while_collected_fails(tmp_path: Path) -> None:
    done = run_suite(tmp_path, ci="1", module=SKIPPED_MODULE)
    assert done.returncode != 0, done.stdout
    assert "was skipped on CI while collected" in done.stdout


@pytest.mark.slow
def test_off_ci_skips_are_skips(tmp_path: Path) -> None:
    done = run_suite(tmp_path, ci=None)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in done.stdout
