"""The recovery side's parts on their own: the policy's validation, the learning-rate factor with
every scheduler kind, the ladder's rungs, the skip file, and the Last Known Good on disk."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tolaria import RecoveryPolicy, SkipList, TolariaGovernor, TrainingAborted, load_last_good, telemetry
from tolaria.recovery import lkg_file
from tolaria.recovery.ladder import RecoveryLadder
from tolaria.recovery.lr import LrFactor
from tolaria.recovery.skiplist import BatchLog, SkipFileError, append_to_skip_file
from tolaria.telemetry import TelemetryEvent, TelemetryEventType


# -- the policy -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("lr_backoff", 0.0, r"lr_backoff must be a number in \(0, 1\]"),
        ("lr_backoff", 1.5, r"lr_backoff must be a number in \(0, 1\]"),
        ("lr_backoff", math.nan, r"lr_backoff must be a number in \(0, 1\]"),
        ("lr_recovery_steps", -1, "lr_recovery_steps must be an int >= 0"),
        ("reset_moments_after", 0, "reset_moments_after must be an int >= 1"),
        ("max_rollbacks", 2.5, "max_rollbacks must be an int >= 1"),
        ("window_steps", True, "window_steps must be an int >= 1"),
        ("mode", "shadow", r"mode must be one of \('act', 'observe'\)"),
        ("save_dir", 3, "save_dir must be a folder path or None"),
    ],
)
def test_a_field_out_of_range_is_named_with_its_range(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RecoveryPolicy(**{field: value})  # type: ignore[arg-type]


def test_the_policy_is_frozen_and_normalised() -> None:
    policy = RecoveryPolicy(lr_backoff=1, save_dir="out")
    assert policy.lr_backoff == 1.0 and policy.save_dir == Path("out") and not policy.observe_only
    with pytest.raises(AttributeError):
        policy.lr_backoff = 0.1  # type: ignore[misc]


# -- the learning-rate factor composes with every scheduler kind -------------------------------
SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=0.1,
        total_steps=50,
        cycle_momentum=False,  # plain SGD: the update is lr x grad
    ),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def _stepped_lr(param: nn.Parameter, opt: torch.optim.Optimizer) -> float:
    """The learning rate one SGD step really used: with grad 1 the update is -lr."""
    before = float(param.detach())
    param.grad = torch.ones_like(param)
    opt.step()
    return before - float(param.detach())


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_backoff_survives_every_scheduler_step(kind: str) -> None:
    param = nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = SCHEDULERS[kind](opt)
    factor = LrFactor(opt)
    factor.back_off(0.25)
    for _ in range(6):
        scheduled = opt.param_groups[0]["lr"]
        assert _stepped_lr(param, opt) == pytest.approx(0.25 * scheduled, rel=1e-9)
        assert opt.param_groups[0]["lr"] == scheduled  # the scheduler's own value is untouched
        if kind == "ReduceLROnPlateau":
            scheduler.step(1.0)  # type: ignore[call-arg]
        else:
            scheduler.step()
    assert factor.factor == 0.25


def test_the_factor_compounds_and_warms_back_geometrically() -> None:
    param = nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([param], lr=1.0)
    factor = LrFactor(opt)
    assert factor.back_off(0.1) == 0.1 and factor.back_off(0.1) == pytest.approx(0.01)
    factor.healthy_step(4)
    factor.healthy_step(4)
    assert factor.factor == pytest.approx(0.1)  # halfway: the square root of the backoff
    factor.healthy_step(4)
    factor.healthy_step(4)
    assert factor.factor == 1.0 and factor.effective_lrs() == [1.0]
    factor.remove()
    factor.back_off(0.1)
    assert _stepped_lr(param, opt) == pytest.approx(1.0)  # hooks removed: the factor no longer applies


# -- the ladder -------------------------------------------------------------------------------
def _ladder(
    policy: RecoveryPolicy, events: list[TelemetryEvent], **kwargs: Any
) -> tuple[RecoveryLadder, Any]:
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    return RecoveryLadder(policy, opt, hub_source=telemetry.get_hub, **kwargs), opt


def test_the_ladder_backs_off_then_resets_moments_then_aborts(events: list[TelemetryEvent]) -> None:
    ladder, opt = _ladder(RecoveryPolicy(max_rollbacks=3, window_steps=100), events)
    assert ladder.after_rollback(10, "governor_nan") == "lr_backoff" and opt.state
    assert ladder.after_rollback(20, "governor_nan") == "lr_backoff+moment_reset" and not opt.state
    assert ladder.lr_factor == 0.25
    ladder.after_rollback(30, "governor_nan")
    with pytest.raises(TrainingAborted) as aborted:
        ladder.after_rollback(40, "governor_divergence")
    assert (aborted.value.rollbacks, aborted.value.step, aborted.value.path) == (4, 40, None)
    assert aborted.value.reason == "governor_divergence"
    kinds = [e.event_type for e in events]
    assert kinds.count(TelemetryEventType.RECOVERY_LR_BACKOFF) == 3
    assert kinds.count(TelemetryEventType.RECOVERY_MOMENT_RESET) == 2
    assert kinds[-1] is TelemetryEventType.RECOVERY_ABORTED
    stats = ladder.stats.as_dict()
    assert (stats["rollbacks"], stats["backoffs"], stats["resets"]) == (4, 3, 2)


def test_rollbacks_outside_the_window_are_forgotten(events: list[TelemetryEvent]) -> None:
    ladder, opt = _ladder(RecoveryPolicy(max_rollbacks=1, window_steps=10, lr_backoff=1.0), events)
    assert ladder.after_rollback(5, "governor_nan") == ""  # no backoff (1.0), one rollback: fine
    assert ladder.after_rollback(16, "governor_nan") == ""  # the first fell out of the window
    with pytest.raises(TrainingAborted):
        ladder.after_rollback(17, "governor_nan")


def test_shadow_mode_counts_and_touches_nothing(events: list[TelemetryEvent]) -> None:
    ladder, opt = _ladder(RecoveryPolicy(mode="observe", max_rollbacks=1), events)
    state = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
    for step in range(4):
        assert ladder.after_rollback(step, "governor_nan") == "observed"
    live = opt.state[opt.param_groups[0]["params"][0]]
    assert all(torch.equal(live[k], v) for k, v in state.items()) and ladder.lr_factor == 1.0
    assert [e.event_type for e in events] == [TelemetryEventType.RECOVERY_OBSERVED] * 4
    assert "would abort" in events[-1].message and ladder.stats.observed == 4


# -- the skip file ------------------------------------------------------------------------------
def test_the_skip_file_round_trips_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "skip.json"
    assert len(SkipList(path)) == 0  # no file yet: nothing was skipped
    append_to_skip_file(path, [3, 4, {"shard": 1, "offset": 40}])
    append_to_skip_file(path, [4, 5])
    skips = SkipList(path)
    assert list(skips) == [3, 4, {"shard": 1, "offset": 40}, 5]
    assert {"offset": 40, "shard": 1} in skips and 6 not in skips
    assert list(skips.filter(range(8))) == [0, 1, 2, 6, 7]
    sampler = skips.wrap(torch.utils.data.SequentialSampler(range(8)))
    assert list(sampler) == [0, 1, 2, 6, 7] and len(sampler) == 5
    loader = torch.utils.data.DataLoader(list(range(8)), sampler=sampler, batch_size=None)
    assert [int(x) for x in loader] == [0, 1, 2, 6, 7]


@pytest.mark.parametrize("content", ["{not json", '{"version": 9, "skipped": []}', "[1, 2]"])
def test_a_corrupt_skip_file_is_an_error_not_an_empty_list(tmp_path: Path, content: str) -> None:
    path = tmp_path / "skip.json"
    path.write_text(content)
    with pytest.raises(SkipFileError, match="skip.json"):
        SkipList(path)
    with pytest.raises(SkipFileError):
        append_to_skip_file(path, [1])
    assert path.read_text() == content  # left as it was


def test_a_crash_mid_write_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "skip.json"
    append_to_skip_file(path, [1, 2])

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        append_to_skip_file(path, [3])
    assert list(SkipList(path)) == [1, 2] and [p.name for p in tmp_path.iterdir()] == ["skip.json"]


def test_the_batch_log_keeps_the_window_since_the_lkg() -> None:
    log = BatchLog()
    for batch in range(5):
        log.saw(batch)
    log.committed(keep_last=True)  # a snapshot at batch 4's step: its update comes after the LKG
    log.saw(5)
    assert log.take_window() == (4, 5) and log.take_window() == ()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        log.saw(object())


# -- the Last Known Good on disk ---------------------------------------------------------------
def _trained() -> tuple[nn.Module, torch.optim.Optimizer, TolariaGovernor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).to(torch.float64)
    model[2].to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        x = torch.randn(6, 4, dtype=torch.float64)
        model[2](model[1](model[0](x)).to(torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, TolariaGovernor(model, optimizer=opt)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_saved_lkg_loads_back_bit_exactly_into_a_fresh_model_and_optimizer(tmp_path: Path) -> None:
    model, opt, gov = _trained()
    path = gov.save_last_good(tmp_path / "lkg", step=42)
    fresh = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).to(torch.float64)
    fresh[2].to(torch.bfloat16)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    ids = [id(p) for p in fresh.parameters()]
    assert load_last_good(path, fresh, fresh_opt) == 42
    assert [id(p) for p in fresh.parameters()] == ids
    for key, value in model.state_dict().items():
        assert _bits(fresh.state_dict()[key]) == _bits(value), key
    for old, new in zip(model.parameters(), fresh.parameters(), strict=True):
        for name, value in opt.state[old].items():
            assert _bits(fresh_opt.state[new][name]) == _bits(value), name
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 42 and all(len(t["sha256"]) == 64 for t in manifest["tensors"].values())


def test_a_corrupted_byte_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    model, _, gov = _trained()
    path = gov.save_last_good(tmp_path / "lkg")
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x40  # a byte of the last tensor's data
    (path / "tensors.safetensors").write_bytes(bytes(data))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(lkg_file.LkgFileError, match=r"tensor '.*' fails its checksum"):
        load_last_good(path, model)
    assert not torch.equal(model[0].weight, before["0.weight"])  # nothing was written


def test_an_existing_path_is_refused_and_a_failed_write_leaves_nothing_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, gov = _trained()
    path = gov.save_last_good(tmp_path / "lkg")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gov.save_last_good(path)
    assert gov.save_last_good(path, overwrite=True) == path

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        gov.save_last_good(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lkg"]
    with pytest.raises(lkg_file.LkgFileError, match="no readable manifest.json"):
        load_last_good(tmp_path / "other", nn.Linear(1, 1))


def test_an_lkg_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    _, _, gov = _trained()
    path = gov.save_last_good(tmp_path / "lkg")
    with pytest.raises(lkg_file.LkgFileError, match="does not fit the model"):
        load_last_good(path, nn.Linear(4, 5))
