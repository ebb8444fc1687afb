"""Test-wide set-up.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it must be set before tolaria's kernels
are imported: without a GPU the Triton kernels run on CPU tensors through the interpreter.

On CI (``CI=true``, which ``.ci/run`` sets, or ``pytest --fail-on-skip``) a skipped test fails
unless it carries the ``cuda`` marker: CI has no GPU but has everything else, so a CPU test that
skips (an ``importorskip("triton")`` that found no Triton, a module that could not be collected)
is a test that silently stopped running.
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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-skip",
        action="store_true",
        help="a skipped test without the cuda marker fails (the default when CI=true)",
    )


def _skips_fail(config: pytest.Config) -> bool:
    on_ci = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
    return on_ci or bool(config.getoption("--fail-on-skip"))


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    expected = item.get_closest_marker("cuda") is not None or hasattr(report, "wasxfail")
    if report.skipped and not expected and _skips_fail(item.config):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped on CI, where every test without the cuda marker must run: {_skip_reason(report)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    # A module skipped while it is collected (a module-level importorskip) skips every test in it.
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and _skips_fail(collector.config):
        report.outcome = "failed"
        report.longrepr = f"{report.nodeid} was skipped on CI while collected: {_skip_reason(report)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; runs through bench/gpu_check.sh")
    for item in items:
        # The marker itself, not the keyword set: a parametrize id "cuda" must not skip a CPU test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
