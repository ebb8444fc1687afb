"""How a ratio line reads: what a figure means, and when this run cannot tell it from noise.

Every timed row carries a median and the p10–p90 spread of its repetitions. When the p10–p90
ranges of two rows overlap, the run does not tell them apart, and the line says so instead of
quoting a difference as a finding: "GuardedStep adds −34.9 % to the step" would claim that a
guarded step ran faster than the unguarded one, which is drift, not a speed-up.
"""

from __future__ import annotations

from tolaria.bench.common import Measurement

MINUS = "\u2212"

#: How a variant is named in a sentence (variants keep their short names in tables and files).
LABELS = {
    "pageable-clone": "the pageable clone",
    "load-state-dict": "load_state_dict",
    "legacy-load-state-dict": "the original's load_state_dict",
    "unguarded": "the unguarded step",
    "legacy": "the original Governor's approach",
    "isfinite-loop": "the isfinite loop",
    "governor-snapshot": "governor.snapshot()",
    "governor-snapshot-host": "governor.snapshot()",
    "governor-rollback": "governor.execute_rollback()",
    "governor-check-health": "governor.check_health()",
    "guarded-blocking": "GuardedStep (blocking)",
    "guarded-deferred": "GuardedStep (deferred)",
    "native": "the native store",
    "native-host": "the native store's capture()",
    "reference": "the reference store",
    "tolaria": "tolaria",
}


def label(variant: str) -> str:
    return LABELS.get(variant, variant)


def percent(fraction: float, *, signed: bool = False, digits: int = 1) -> str:
    """``0.012`` → ``"1.2 %"`` (``"+1.2 %"`` when signed; a real minus sign for negatives)."""
    text = f"{fraction * 100:+.{digits}f} %" if signed else f"{fraction * 100:.{digits}f} %"
    return text.replace("-", MINUS)


def share_percent(share: float) -> str:
    """A share of the limit: ``0.94`` → ``"94 %"``, ``0.012`` → ``"1.2 %"``, ``0.00035`` → ``"0.035 %"``."""
    if share >= 0.1:
        return f"{share * 100:.0f} %"
    return f"{share * 100:.1f} %" if share >= 0.01 else f"{share * 100:.2g} %"


def times(ratio: float) -> str:
    """A speed ratio: one decimal from 2× up, two below (``1.04×`` is not ``1.0×``)."""
    return f"{ratio:.1f}×" if ratio >= 2 else f"{ratio:.2f}×"


def inside_noise(a: Measurement, b: Measurement) -> bool:
    """True when the p10–p90 ranges of ``a`` and ``b`` overlap: this run cannot order them."""
    return a.p10_s <= b.p90_s and b.p10_s <= a.p90_s


def overhead_line(scenario: str, base: Measurement, candidate: Measurement, what: str = "the step") -> str:
    """What ``candidate`` adds to ``base``'s time, or that the run cannot tell. With paired
    rounds (:attr:`Measurement.paired`) the median of the per-round overheads is quoted, and the
    run cannot tell when their p10–p90 range holds zero."""
    name, base_name = label(candidate.variant), label(base.variant)
    if candidate.paired is not None:
        overhead, low, high = candidate.paired
        shown = percent(overhead, signed=True)
        spread = (f"p10–p90 of {candidate.reps} rounds paired with {base_name}: "
                  f"{percent(low, signed=True)} to {percent(high, signed=True)}")  # fmt: skip
        if low <= 0 <= high:
            return f"{scenario}: {name} is inside this run's noise ({shown} at the median; {spread})"
        if overhead < 0:
            faster = percent(-overhead)
            return f"{scenario}: {name} measured {faster} faster than {base_name} ({spread}): drift"
        return f"{scenario}: {name} adds {shown} to {what} ({spread})"
    overhead = candidate.median_s / base.median_s - 1
    if inside_noise(base, candidate):
        return (
            f"{scenario}: {name} is inside this run's noise ({percent(overhead, signed=True)} at the median; "
            f"its p10–p90 range overlaps {base_name}'s)"
        )
    if overhead < 0:
        return (
            f"{scenario}: {name} measured {percent(-overhead)} faster than {base_name}, outside the p10–p90 "
            "ranges: drift between the loops, not a speed-up"
        )
    return f"{scenario}: {name} adds {percent(overhead, signed=True)} to {what}"


def speed_line(scenario: str, base: Measurement, candidate: Measurement, note: str = "") -> str:
    """How many times faster (or slower) ``candidate`` is than ``base``."""
    speed = base.median_s / candidate.median_s
    name, base_name = label(candidate.variant), label(base.variant)
    noise = "; inside this run's noise, the p10–p90 ranges overlap" if inside_noise(base, candidate) else ""
    extra = f" ({note}{noise})" if note else (f" ({noise[2:]})" if noise else "")
    if speed >= 1:
        return f"{scenario}: {name} is {times(speed)} faster than {base_name}{extra}"
    return f"{scenario}: {name} takes {times(1 / speed)} the time of {base_name}{extra}"


def limit_line(scenario: str, limit: Measurement, candidate: Measurement, limit_name: str) -> str:
    """The share of the physical limit's speed that ``candidate`` reaches (where a limit exists).

    Above 100 % (outside the noise) the run's limit was no ceiling (a noisy repetition, or a
    copy that used fewer threads than the engine): the line says so rather than claim to beat
    physics."""
    share = limit.median_s / candidate.median_s
    name, shown = label(candidate.variant), share_percent(share)
    if inside_noise(limit, candidate):
        return (
            f"{scenario}: {name} reaches {shown} of the limit ({limit_name}) at the median; the p10–p90 "
            "ranges overlap, so this run cannot tell them apart"
        )
    if share > 1:
        return (
            f"{scenario}: {name} ran at {shown} of the limit's speed ({limit_name}): that limit was no "
            "ceiling in this run (noise, or a copy on fewer threads)"
        )
    return f"{scenario}: {name} reaches {shown} of the limit ({limit_name})"


def share_line(scenario: str, base: Measurement, candidate: Measurement, what: str) -> str:
    """``candidate``'s time as a share of ``base``'s (host-blocking time against a full copy)."""
    share = percent(candidate.median_s / base.median_s, digits=2)
    return f"{scenario}: {label(candidate.variant)} {what} {share} of {label(base.variant)}'s time"


__all__ = [
    "LABELS",
    "inside_noise",
    "label",
    "limit_line",
    "overhead_line",
    "percent",
    "share_line",
    "share_percent",
    "speed_line",
    "times",
]
