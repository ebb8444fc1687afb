"""Health-check benchmark: tolaria against the per-tensor isfinite loop and ``_foreach_norm``.

Scenarios (fp32 parameters of one ``nn.ParameterDict``, the same tensors for every variant):

- ``gpt2-small``: the 148 parameter shapes of GPT-2 small (124M parameters, ~0.5 GB);
- ``many-small``: 500 tensors of 256 to 65536 elements (log-uniform, fixed seed);
- ``large-1gib`` (CUDA only): 64 tensors of 4M elements, 1 GiB in all.

Variants: ``isfinite-loop`` (``torch.isfinite(p).all()`` per tensor, one host read at the end:
the strongest form of the old loop), ``foreach-norm`` (``torch._foreach_norm`` and one read),
``tolaria`` (``check_tensors`` with backend "auto": the reference on CPU, Triton on CUDA,
blocking: launch, wait, report), ``governor-check-health`` (the public path:
``TolariaGovernor(module).check_health()``, which walks ``named_parameters()``, checks and judges
the report; no gradients here, so the parameters only), ``read-limit`` (one ``torch.sum`` over a
tensor of the same total bytes: the bandwidth ceiling of the same run), and on CUDA
``tolaria-async`` (device time of back-to-back non-blocking checks, the host running ahead
exactly as it does for ``read-limit``: the like-for-like bandwidth figure), ``tolaria-host`` and
``tolaria-host-eager`` (host time per non-blocking check with cached tables, with and without
the CUDA graph).

Run ``python -m tolaria.bench.health [--device cpu|cuda] [--quick]``. Without a GPU,
``python -m tolaria.bench.health --host-dispatch`` times the Python side of a non-blocking
Triton check (see :func:`host_dispatch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from tolaria import TolariaGovernor
from tolaria.bench import wording
from tolaria.bench.common import (
    Measurement,
    all_finished,
    device_label,
    measure,
    module_parser,
    print_report,
    release_cached_memory,
)
from tolaria.bench.workloads import gpt2_small_shapes, many_small_shapes, parameter_module
from tolaria.health import check_tensors

BASELINE = "isfinite-loop"
LIMIT_NAME = "one torch.sum over the same bytes"


def _isfinite_loop(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _foreach_norm(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


@contextlib.contextmanager
def _graphs(enabled: bool) -> Iterator[None]:
    from tolaria.health import plan

    previous = os.environ.get("TOLARIA_HEALTH_CUDA_GRAPH")
    os.environ["TOLARIA_HEALTH_CUDA_GRAPH"] = "1" if enabled else "0"
    plan.clear_plans()
    try:
        yield
    finally:
        plan.clear_plans()
        if previous is None:
            os.environ.pop("TOLARIA_HEALTH_CUDA_GRAPH", None)
        else:
            os.environ["TOLARIA_HEALTH_CUDA_GRAPH"] = previous


def scenario_rows(name: str, module: nn.Module, device: str, quick: bool) -> list[Measurement]:
    """Every variant over ``module``'s parameters (``name`` is the scenario, e.g. "health/x")."""
    pairs = [(key, param.detach()) for key, param in module.named_parameters()]
    tensors = [t for _, t in pairs]
    nbytes = sum(t.nbytes for t in tensors)
    reps, warmup = (5, 1) if quick else (20, 3)
    on_cuda = torch.device(device).type == "cuda"
    governor = TolariaGovernor(module)

    def governor_check() -> None:
        if governor.check_health():
            raise RuntimeError(f"governor.check_health() panicked on the healthy tensors of {name}")

    variants = [
        (BASELINE, lambda: _isfinite_loop(tensors)),
        ("foreach-norm", lambda: _foreach_norm(tensors)),
        ("tolaria", lambda: check_tensors(pairs)),
        ("governor-check-health", governor_check),
    ]
    rows = [
        measure(name, variant, fn, device=device, bytes=nbytes, warmup=warmup, reps=reps)
        for variant, fn in variants
    ]
    flat = torch.randn(nbytes // 4, device=device)
    rows.insert(
        0, measure(name, "read-limit", flat.sum, device=device, bytes=nbytes, warmup=warmup, reps=reps)
    )
    del flat
    if on_cuda:
        rows.append(
            measure(
                name,
                "tolaria-async",
                lambda: check_tensors(pairs, blocking=False),
                device=device,
                bytes=nbytes,
                warmup=max(warmup, 3),  # build, capture the graph, adopt it
                reps=reps,
            )
        )
        for variant, enabled in (("tolaria-host", True), ("tolaria-host-eager", False)):
            with _graphs(enabled):
                rows.append(
                    measure(
                        name,
                        variant,
                        lambda: check_tensors(pairs, blocking=False),
                        device=device,
                        warmup=max(warmup, 3),
                        reps=50,
                        host_only=True,
                    )
                )
    return rows


def run(device: str, quick: bool) -> list[Measurement]:
    """Every scenario on ``device`` ("cpu" or "cuda"); ``quick`` takes fewer repetitions."""
    scenarios = [("gpt2-small", gpt2_small_shapes()), ("many-small", many_small_shapes())]
    if torch.device(device).type == "cuda":
        scenarios.append(("large-1gib", [(4 << 20,)] * 64))
    rows: list[Measurement] = []
    for name, shapes in scenarios:
        module = parameter_module(shapes, device, scale=1.0)
        rows += scenario_rows(f"health/{name}", module, device, quick)
        del module
        release_cached_memory(device)
    return rows


def summary(rows: list[Measurement]) -> list[str]:
    """The ratios the goals are stated in, one line each."""
    by_key = {(row.scenario, row.variant): row for row in rows}
    lines = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        base = by_key.get((scenario, BASELINE))
        limit = by_key.get((scenario, "read-limit"))
        for variant, note in (("governor-check-health", "the user's call"),
                              ("tolaria", "check_tensors, blocking, report included")):  # fmt: skip
            row = by_key.get((scenario, variant))
            if row is not None and base is not None:
                lines.append(wording.speed_line(scenario, base, row, note))
            if row is not None and limit is not None:
                lines.append(wording.limit_line(scenario, limit, row, LIMIT_NAME))
        asynchronous = by_key.get((scenario, "tolaria-async"))
        if asynchronous is not None and limit is not None:
            share = limit.median_s / asynchronous.median_s
            lines.append(
                f"{scenario}: tolaria's device time reaches {share * 100:.0f} % of the limit ({LIMIT_NAME})"
            )
        for variant in ("tolaria-host", "tolaria-host-eager"):
            host = by_key.get((scenario, variant))
            if host is not None:
                lines.append(
                    f"{scenario}: host cost per non-blocking check ({variant}) {host.median_s * 1e6:.1f} µs"
                )
    return lines


def host_dispatch(reps: int = 300) -> list[str]:
    """Host time of ``check_tensors(pairs, backend="triton", blocking=False)`` without a GPU.

    Needs TRITON_INTERPRET=1 (CPU tensors take the Triton path). The kernel launches are
    replaced by no-ops for the measurement, because the interpreter runs a kernel on the host
    and a GPU launch does not: what is timed is the Python side of a check with a cached plan
    (finding the plan, the bookkeeping, the handle). The CUDA calls of the real path (graph
    replay, one copy, one event record) are not in it. Median microseconds per call.
    """
    import statistics
    import time

    from tolaria.health import triton_kernels

    if not triton_kernels.INTERPRETED:
        raise SystemExit("--host-dispatch needs TRITON_INTERPRET=1 set before the run")
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(74)])
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    params = list(model.named_parameters())
    sets = {
        "gpt2-small (148)": [(f"p{i}", torch.empty(shape)) for i, shape in enumerate(gpt2_small_shapes())],
        "many-small (500)": [(f"p{i}", torch.empty(shape)) for i, shape in enumerate(many_small_shapes())],
        "params+grads (296)": params + [(f"{n}.grad", p.grad) for n, p in params if p.grad is not None],
    }
    saved = triton_kernels.launch_partials, triton_kernels.launch_finish
    triton_kernels.launch_partials = triton_kernels.launch_finish = lambda **_: None  # type: ignore[assignment]
    lines = []
    try:
        for label, pairs in sets.items():
            for _ in range(5):
                check_tensors(pairs, backend="triton", blocking=False)
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                check_tensors(pairs, backend="triton", blocking=False)
                samples.append(time.perf_counter() - start)
            lines.append(f"{label}: {statistics.median(samples) * 1e6:.1f} µs per non-blocking check")
    finally:
        triton_kernels.launch_partials, triton_kernels.launch_finish = saved
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--host-dispatch", action="store_true", help="Python host cost only (no GPU)")
    args = parser.parse_args(argv)
    if args.host_dispatch:
        for line in host_dispatch():
            print(f"- {line}")
        return
    logging.getLogger("tolaria").setLevel(logging.ERROR)
    rows = run(args.device, args.quick)
    title = f"health check on {device_label(args.device)} (torch {torch.__version__})"
    print_report(title, rows, summary(rows), lambda scenario: BASELINE)
    if not all_finished(rows):
        raise SystemExit("a measurement did not finish")


if __name__ == "__main__":
    main()
