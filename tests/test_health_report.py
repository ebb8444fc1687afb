"""A kernel's ``[4, T]`` result rows become the same report whichever way they are read:
``report_from_rows`` (the tensor, the path a check's handle takes) against ``report_from_sums``
(the rows as Python lists), healthy and sick, with squares that overflow to +Inf."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tolaria.health.report import report_from_rows, report_from_sums
from tolaria.watch import gradient_norm


def rows(squares: list[float], nan: list[int], posinf: list[int], neginf: list[int]) -> torch.Tensor:
    return torch.tensor([squares, nan, posinf, neginf], dtype=torch.float64)


CASES = {
    "healthy": rows([4.0, 0.0, 2.25, 1e300], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]),
    "overflowed-square": rows([math.inf, 1.0, 3.0, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]),
    "nan-first": rows([math.nan, 1.0, 3.0, 0.5], [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]),
    "posinf-middle": rows([1.0, math.inf, 3.0, 0.5], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]),
    "neginf-last": rows([1.0, 1.0, 3.0, math.inf], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]),
    "empty": torch.zeros((4, 0), dtype=torch.float64),
    "healthy-odd-values": rows([0.0, -0.0, 5e-324, 2.0, 1e-310, 7.0, 1e308], [0] * 7, [0] * 7, [0] * 7),
    "healthy-not-contiguous": rows([4.0, 2.0, 9.0], [0] * 3, [0] * 3, [0] * 3).t().contiguous().t(),
    "sick-not-contiguous": rows([4.0, 2.0, 9.0], [0] * 3, [0, 0, 1], [0] * 3).t().contiguous().t(),
    # read in memory order as if contiguous, this one's counts would all be zero: a healthy misread
    "sick-not-contiguous-misread-healthy": (
        rows([4.0, 0.0, 0.0], [0] * 3, [1, 0, 0], [0] * 3).t().contiguous().t()
    ),
}


@pytest.fixture(params=["compiled", "tensor-ops"])
def rows_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways ``report_from_rows`` reads a result: the extension's one pass, and tensor ops."""
    from tolaria.health import report

    if request.param == "tensor-ops":
        monkeypatch.setattr(report, "_compiled_healthy_rows", None)
    else:
        assert report._compiled_healthy_rows is not None, "the extension is not loaded"
    return str(request.param)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_and_lists_make_the_same_report(case: str, rows_path: str) -> None:
    result = CASES[case]
    assert result.is_contiguous() == ("not-contiguous" not in case)
    names = [f"t{i}" for i in range(result.shape[1])]
    ours = report_from_rows(names, result, "triton")
    theirs = report_from_sums(names, result.tolist(), "triton")
    assert (ours.nan, ours.posinf, ours.neginf) == (theirs.nan, theirs.posinf, theirs.neginf)
    assert ours.nonfinite == theirs.nonfinite
    assert ours.first_bad == theirs.first_bad and ours.healthy == theirs.healthy
    assert ours.names == names and ours.names is not names  # the report owns its list
    assert len(ours.norms) == len(theirs.norms)
    for mine, other in zip(ours.norms, theirs.norms, strict=True):  # bit for bit, NaN included
        assert (math.isnan(mine) and math.isnan(other)) or mine == other
    same_global = ours.global_norm == theirs.global_norm
    assert same_global or (math.isnan(ours.global_norm) and math.isnan(theirs.global_norm))
    assert all(isinstance(n, int) for n in ours.nan + ours.nonfinite)
    assert ours.squares is not None and theirs.squares is not None
    pairs = zip(ours.squares, theirs.squares, strict=True)
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in pairs)


def test_the_compiled_pass_reads_the_rows_where_they_are_and_names_its_bad_arguments() -> None:
    from tolaria import _C

    result = rows([4.0, 9.0], [0, 0], [0, 0], [0, 0])
    assert _C.healthy_rows(result.data_ptr(), 2) == ([4.0, 9.0], [2.0, 3.0])
    result[3, 1] = 1.0  # one -Inf counted, in the last slot
    assert _C.healthy_rows(result.data_ptr(), 2) is None
    assert _C.healthy_rows(0, 0) == ([], [])
    with pytest.raises(ValueError, match="null address"):
        _C.healthy_rows(0, 2)
    with pytest.raises(ValueError, match="count must be >= 0"):
        _C.healthy_rows(result.data_ptr(), -1)


def test_the_gradient_norm_sums_the_squares_when_a_report_has_them() -> None:
    squares = [4.0, 9.0, 2.0, 1e-300]
    names = ["w", "w.grad", "b.grad", "c.grad"]
    with_squares = report_from_rows(names, rows(squares, [0] * 4, [0] * 4, [0] * 4), "native")
    assert with_squares.squares == squares
    without = replace(with_squares, squares=None)  # the reference's reports carry none
    assert gradient_norm(with_squares, 1) == math.sqrt(math.fsum(squares[1:]))  # no sqrt, then square
    assert gradient_norm(without, 1) == pytest.approx(gradient_norm(with_squares, 1), rel=1e-15)
    assert math.isnan(gradient_norm(with_squares, 4))  # no gradients
    huge = report_from_sums(["g"] * 2, [[1e308, 1e308], [0, 0], [0, 0], [0, 0]], "triton")
    assert gradient_norm(huge, 0) == math.inf  # a finite sum beyond the fp64 range
