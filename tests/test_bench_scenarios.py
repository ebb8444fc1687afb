"""The bench's scenarios on tiny models: the rows they produce, and the goals they feed.

No timing is asserted (see docs/architecture.md, "Testing and measuring"): only which rows
exist, what they are named, and the byte counts, which are computed, not measured.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tolaria.bench import fake_device, goals, health, host_cost, runner, snapshot, training, workloads
from tolaria.bench.common import Measurement


@pytest.fixture(autouse=True)
def _quiet_rollbacks() -> None:
    # The scenarios roll back on purpose, once per repetition.
    logging.getLogger("tolaria").setLevel(logging.ERROR)


def _parameter_count(setup: training.TrainingSetup) -> int:
    with torch.device("meta"):
        return len(list(setup.model().parameters()))


def test_the_goals_name_scenarios_the_bench_runs_with_the_tensor_counts_they_state() -> None:
    cpu = {f"training-step/{s.name}": _parameter_count(s) for s in training.setups_for("cpu", quick=True)}
    assert cpu == {"training-step/transformer-292-tensors": 292, "training-step/mlp-4-tensors": 4}
    cuda_host = {f"guard-host/{s.name}": _parameter_count(s) for s in host_cost.setups()}
    assert cuda_host == {
        "guard-host/linear-2-tensors": 2,
        "guard-host/transformer-292-tensors": 292,
        "guard-host/linear-stack-292-tensors": 292,
        "guard-host/many-small-5000-tensors": 5000,
    }
    assert len(workloads.many_small_model("cpu").state_dict()) == 5000
    split = {f"guard-host/{name}": count for name, count in (host_cost.FIXED, host_cost.STACK)}
    assert split.items() <= cuda_host.items()  # the counts the summary's slope divides by
    known = {*cpu, *cuda_host, "snapshot/many-small", "snapshot/gpt2-small"}
    assert {goal.scenario for goal in goals.GOALS} <= known


def test_snapshot_rows_put_the_public_calls_beside_the_stores() -> None:
    work = snapshot.workload("many-small", workloads.many_small_model("cpu", layers=3))
    rows = snapshot.workload_rows(work, "cpu", quick=True)
    assert [(r.scenario, r.variant) for r in rows] == [
        *(("snapshot/many-small", v) for v in
          ("pageable-clone", "limit", "governor-snapshot", "pinned-per-key", "reference", "native")),
        *(("restore/many-small", v) for v in
          ("load-state-dict", "limit", "governor-rollback", "pinned-per-key", "reference", "native")),
    ]  # fmt: skip
    assert all(r.bytes == work.nbytes and r.median_s > 0 for r in rows)
    lines = snapshot.summary(rows)
    assert any(line.startswith("snapshot/many-small: governor.snapshot() ") for line in lines)
    assert any(line.startswith("restore/many-small: governor.execute_rollback() ") for line in lines)
    assert sum("of the limit (one copy of the same bytes)" in line for line in lines) == 4
    assert "cached once" not in (snapshot.__doc__ or "")


def test_health_rows_include_the_governors_check() -> None:
    module = workloads.parameter_module([(64,), (8, 8)], "cpu", scale=1.0)
    rows = health.scenario_rows("health/tiny", module, "cpu", quick=True)
    variants = [r.variant for r in rows]
    assert variants == ["read-limit", "isfinite-loop", "foreach-norm", "tolaria", "governor-check-health"]
    assert any("governor.check_health()" in line for line in health.summary(rows))


def test_host_cost_rows_time_both_modes_and_the_snapshot_steps() -> None:
    setup = host_cost.many_small_setup(layers=2)  # on CPU: through the fake device
    rows = host_cost.setup_rows(setup, "cpu", quick=True)
    modes = ("guarded-blocking", "guarded-deferred")
    timed = [name for mode in modes for name in (mode, f"{mode}-snapshot-steps")]
    assert [r.variant for r in rows] == [*timed, "guarded-deferred-gradients-kept", "floor"]
    steps = 2 * training.SNAPSHOT_EVERY
    assert [r.reps for r in rows] == [steps, 2, steps, 2, steps, 3 * steps]  # the floor: all three runs
    assert all(r.scenario == "guard-host/many-small-5000-tensors" for r in rows)
    assert runner.baseline_of(rows[0].scenario) == ""
    floor = rows[-1]
    assert 0 < floor.p10_s <= floor.median_s <= floor.p90_s
    lines = host_cost.summary(rows)
    floor_said = "× the floor of reading each tensor's .grad and address once"
    assert len(lines) == 3 and all(floor_said in line for line in lines)


def test_the_summary_tells_the_fixed_cost_from_the_cost_per_tensor() -> None:
    def row(name: str, variant: str, seconds: float) -> Measurement:
        return Measurement(f"guard-host/{name}", variant, "cpu", seconds, seconds, seconds, 10)

    fixed, stack = host_cost.FIXED[0], host_cost.STACK[0]
    rows = [row(fixed, "guarded-deferred", 100e-6), row(stack, "guarded-deferred", 390e-6),
            row(fixed, "guarded-blocking", 80e-6)]  # fmt: skip
    split = [line for line in host_cost.summary(rows) if line.startswith("guard-host: ")]
    assert split == [
        f"guard-host: guarded-deferred costs 100.0 µs per step whatever the model ({fixed}), and 1.00 µs "
        f"more per further tensor (the slope to {stack})"
    ]  # (390 - 100) µs over 290 more tensors; blocking has no stack row, so no line


def test_the_floor_reads_every_address_once_and_waits_for_gradients() -> None:
    params = tuple(torch.nn.Parameter(torch.zeros(3)) for _ in range(4))
    assert host_cost.read_floor(params) is None  # no gradients yet: nothing to time
    for p in params:
        p.grad = torch.ones(3)
    floor = host_cost.read_floor(params)
    assert floor is not None and floor > 0
    optimizer = torch.optim.SGD(params, lr=0.1)
    probed = host_cost.ProbedOptimizer(optimizer, params, "kept")
    grads = [p.grad for p in params]
    probed.zero_grad()
    assert len(probed.floors) == 1
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads, strict=True))  # zeroed in place
    # CUDA's case: new objects over the same memory, which backward then adds into in place
    host_cost.ProbedOptimizer(optimizer, params, "new-objects").zero_grad()
    pairs = zip(params, grads, strict=True)
    assert all(p.grad is not g and p.grad.data_ptr() == g.data_ptr() for p, g in pairs)
    addresses = [p.grad.data_ptr() for p in params]
    sum((p * 2).sum() for p in params).backward()
    assert [p.grad.data_ptr() for p in params] == addresses
    assert all(torch.equal(p.grad, torch.full((3,), 2.0)) for p in params)
    host_cost.ProbedOptimizer(optimizer, params, "freed").zero_grad()
    assert all(p.grad is None for p in params)
    accepted = r"gradients must be one of \('freed', 'new-objects', 'kept'\), got 'none'"
    with pytest.raises(ValueError, match=accepted):
        host_cost.ProbedOptimizer(optimizer, params, "none")


def test_the_fake_device_runs_the_device_path_of_a_check_without_its_kernels() -> None:
    from tolaria.health import check_tensors, plan

    generator = torch.Generator().manual_seed(0)
    pairs = [(f"t{i}", torch.randn(n, generator=generator)) for i in range(3) for n in (5 + 40 * i,)]
    pairs[1][1][3] = float("nan")  # the kernels are left out: the fake cannot see it (host cost only)
    with fake_device.fake_device_checks() as device:
        assert plan.cpu_runtime() is device
        reports = [check_tensors(pairs, backend="triton", blocking=False).result() for _ in range(4)]
        (built,) = plan._plans.values()
        assert built.graph is not None  # eager, eager + trial capture, then the adopted graph
        assert device.launches_skipped == 2
    assert all(r.healthy and r.norms == [0.0, 0.0, 0.0] and r.backend == "triton" for r in reports)
    assert plan.cpu_runtime() is None and not plan._plans  # nothing outlives the block


def test_on_cpu_the_host_cost_rows_come_through_the_fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_cost, "setups", lambda: [host_cost.many_small_setup(layers=2)])
    seen: list[object] = []
    original = host_cost.TolariaGovernor

    def governor(model: torch.nn.Module, **options: object) -> host_cost.TolariaGovernor:
        from tolaria.health import plan

        seen.append((options.get("health_backend"), plan.cpu_runtime() is not None))
        return original(model, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(host_cost, "TolariaGovernor", governor)
    rows = host_cost.run("cpu", quick=True)
    assert {r.variant for r in rows} >= {"guarded-blocking", "guarded-deferred", host_cost.KEPT}
    assert seen == [("triton", True)] * 3  # both modes and the kept gradients, each inside the fake device
    lines = host_cost.summary(rows)
    assert len(lines) == 3 and all("µs of host time per step" in line for line in lines)
    assert {r.variant for r in rows} >= {"floor"}
    assert all(r.device.endswith(", fake device (kernels excluded)") for r in rows)


def test_the_byte_counts_are_computed_from_tensor_sizes() -> None:
    setup = training.mlp_setup("mlp-4-tensors", features=784, hidden=256, classes=10)
    weights = (784 * 256 + 256 + 256 * 10 + 10) * 4
    counts = {c.variant: c.bytes for c in training.bytes_read(setup)}
    assert counts == {
        "clip_grad_norm_": weights,
        "tolaria-check": 2 * weights,
        "clip_grad_norm_ + tolaria-check": 3 * weights,
    }
    line = training.summary([], training.bytes_read(setup))[0]
    assert "computed from tensor sizes (not measured)" in line and "clip_grad_norm_ 0.8 MB" in line


def test_a_training_loop_refuses_an_unknown_variant() -> None:
    setup = training.mlp_setup("x", features=4, hidden=4, classes=2, batch=2)
    with pytest.raises(ValueError, match="variant must be one of"):
        training._Loop("tolaria", setup, "cpu", [])


def test_the_rollback_scenario_restores_real_adamw_state(monkeypatch: pytest.MonkeyPatch) -> None:
    setup = training.mlp_setup("x", features=4, hidden=4, classes=2, batch=2)
    monkeypatch.setattr(training, "setups_for", lambda device, quick: [setup])
    captured: list[int] = []
    original = training.TolariaGovernor

    def governor(model: torch.nn.Module, **options: object) -> training.TolariaGovernor:
        optimizer = options["optimizer"]
        assert isinstance(optimizer, torch.optim.Optimizer)
        captured.append(len(optimizer.state))  # what the Governor's first snapshot captures
        return original(model, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "TolariaGovernor", governor)
    rows = training.rollback_rows("cpu", quick=True)
    assert [r.variant for r in rows] == ["legacy-load-state-dict", "governor-rollback"]
    assert captured == [4]  # every parameter has its moments
