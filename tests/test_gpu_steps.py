"""bench/gpu_steps.sh, the step runner of bench/gpu_check.sh: limits, logs, and the BUDGET that
keeps a short GPU lease from being cut off before the summary (run through real bash)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")  # fmt: skip


def _run(script: str, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` after sourcing gpu_steps.sh, then the status array, one entry a line."""
    full = f"source bench/gpu_steps.sh\n{script}\nprintf 'STATUS %s\\n' \"${{status[@]}}\"\n"
    environment = {k: v for k, v in os.environ.items() if k not in ("BUDGET", "RESERVE", "MIN_STEP")}
    environment.update(OUT=str(out), **env)
    return subprocess.run(["bash", "-c", full], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def _statuses(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[len("STATUS ") :] for line in result.stdout.splitlines() if line.startswith("STATUS ")]


def test_a_step_runs_with_its_limit_logs_its_output_and_records_its_exit_status(tmp_path: Path) -> None:
    result = _run("step hello 30 bash -c 'echo from-the-step; exit 3'; echo \"rc=$?\"", tmp_path)
    assert "== hello (limit 30s)" in result.stdout and "rc=3" in result.stdout
    assert (tmp_path / "hello.log").read_text() == "from-the-step\n"
    assert re.fullmatch(r"hello: rc=3 in \d+s", _statuses(result)[0])


def test_a_step_past_its_limit_is_stopped_with_timeouts_status(tmp_path: Path) -> None:
    result = _run('step slow 1 sleep 30; echo "rc=$?"', tmp_path)
    assert "rc=124" in result.stdout
    assert _statuses(result)[0].startswith("slow: rc=124 in ")


def test_budget_shortens_a_step_to_what_is_left_less_the_reserve(tmp_path: Path) -> None:
    result = _run("step short 300 true", tmp_path, BUDGET="100", RESERVE="15")
    limit = int(re.search(r"== short \(limit (\d+)s\)", result.stdout).group(1))  # type: ignore[union-attr]
    assert 80 <= limit <= 85  # 100 - 15, less the seconds bash has run
    result = _run("step long 30 true", tmp_path, BUDGET="100")
    assert "== long (limit 30s)" in result.stdout  # a limit below what is left is kept


def test_a_step_that_would_get_too_little_of_the_budget_is_not_started(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = _run(f"step late 300 touch {marker}; echo \"rc=$?\"\nstep later 300 touch {marker}", tmp_path,
                  BUDGET="30", RESERVE="15", MIN_STEP="20")  # fmt: skip
    assert not marker.exists()
    assert "rc=124" in result.stdout and "== late skipped:" in result.stdout
    statuses = _statuses(result)
    assert [s.split(":")[0] for s in statuses] == ["late", "later"]
    assert all(re.fullmatch(r"\w+: skipped, \d+ s of BUDGET left", s) for s in statuses)


def test_gpu_check_uses_the_runner_and_passes_its_syntax_check() -> None:
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "source bench/gpu_steps.sh" in script and "step() {" not in script
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
