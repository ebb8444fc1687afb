"""Recovery on a real run: a learning-rate storm that the schedule keeps applying for 30 steps.

A plain rollback walks straight back into the storm and rolls back again and again; the policy
backs the learning rate off (and resets the moments) and gets through it. The budget aborts a
run that cannot be saved, leaving a verified LKG on disk; shadow mode changes nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tolaria import GuardedStep, RecoveryPolicy, SkipList, TolariaGovernor, TrainingAborted, load_last_good
from tolaria.telemetry import TelemetryEvent, TelemetryEventType

STORM = range(20, 50)  # the steps whose scheduled learning rate is 200x the base


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return x, (x @ torch.randn(8, 4, generator=generator)).argmax(1)


def _model() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    storm = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 200.0 if step in STORM else 1.0)
    return model, opt, storm


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))


def _run(policy: RecoveryPolicy | None, steps: int = 120) -> tuple[int, list[float], TolariaGovernor]:
    model, opt, storm = _model()
    x, y = _data()
    gov = TolariaGovernor(
        model, optimizer=opt, random_guess_loss=math.log(4), absolute_threshold=3.0, recovery=policy
    )
    guard = GuardedStep(gov, opt, snapshot_every=5)
    rollbacks, losses = 0, []
    for step in range(steps):
        batch = _batch(step)
        outcome = guard(lambda: nn.functional.cross_entropy(model(x[batch]), y[batch]))  # noqa: B023
        rollbacks += outcome.rolled_back
        losses.append(outcome.loss)
        storm.step()
    return rollbacks, losses, gov


def test_the_policy_escapes_a_recurring_storm_that_plain_rollbacks_loop_in(
    events: list[TelemetryEvent],
) -> None:
    plain, plain_losses, _ = _run(RecoveryPolicy(lr_backoff=1.0, max_rollbacks=50))
    escaped, losses, gov = _run(RecoveryPolicy())
    assert escaped <= 3 < 6 <= plain  # the plain rollback keeps walking back into the storm
    assert all(math.isfinite(v) for v in losses[-20:])
    assert sum(losses[-10:]) / 10 < sum(losses[10:20]) / 10  # lower than before the storm
    stats = gov.recovery_stats
    assert stats.rollbacks == escaped and stats.backoffs == escaped and stats.resets == escaped - 1
    kinds = [e.event_type for e in events]
    assert (
        TelemetryEventType.RECOVERY_LR_BACKOFF in kinds and TelemetryEventType.RECOVERY_MOMENT_RESET in kinds
    )


def test_the_budget_aborts_and_leaves_a_verified_lkg_that_loads_bit_exactly(tmp_path: Path) -> None:
    with pytest.raises(TrainingAborted) as aborted:
        _run(RecoveryPolicy(lr_backoff=1.0, max_rollbacks=2, window_steps=100, save_dir=tmp_path))
    error = aborted.value
    assert error.rollbacks == 3 and error.path is not None and error.path.parent == tmp_path
    assert error.reason.startswith("governor_") and str(error.path) in str(error)
    fresh, fresh_opt, _ = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.fill_(math.nan)
    step = load_last_good(error.path, fresh, fresh_opt)
    assert step is not None and step <= error.step
    # What was saved is the LKG some check saw healthy: finite, and it trains on.
    x, y = _data()
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    loss = nn.functional.cross_entropy(fresh(x), y).detach()
    assert math.isfinite(float(loss)) and float(loss) < 3.0


def test_shadow_mode_detects_and_counts_but_changes_no_tensor(events: list[TelemetryEvent]) -> None:
    def train(governed: bool) -> tuple[nn.Module, int]:
        model, opt, storm = _model()
        x, y = _data()
        gov = None
        if governed:
            gov = TolariaGovernor(model, optimizer=opt, random_guess_loss=math.log(4), absolute_threshold=3.0,
                                  recovery=RecoveryPolicy(mode="observe"))  # fmt: skip
        reports = 0
        for step in range(40):
            batch = _batch(step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            if gov is not None and gov.check_vital_signs(loss.detach()):
                report = gov.execute_rollback()
                assert not report.rollback_occurred and report.recovery_action == "observed"
                reports += 1
            loss.backward()
            if gov is not None and gov.check_health():
                reports += not gov.execute_rollback().rollback_occurred
            opt.step()
            storm.step()
        return model, reports

    plain, _ = train(governed=False)
    shadow, observed = train(governed=True)
    assert observed > 0
    for a, b in zip(plain.state_dict().values(), shadow.state_dict().values(), strict=True):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()  # same bits, NaNs included
    assert [e.event_type for e in events].count(TelemetryEventType.RECOVERY_OBSERVED) == observed


def test_guarded_steps_record_the_abandoned_batches_for_a_resumed_run(
    tmp_path: Path, events: list[TelemetryEvent]
) -> None:
    model, opt, storm = _model()
    x, y = _data()
    gov = TolariaGovernor(model, optimizer=opt, random_guess_loss=math.log(4), absolute_threshold=3.0,
                          recovery=RecoveryPolicy())  # fmt: skip
    skip_file = tmp_path / "skip.json"
    guard = GuardedStep(gov, opt, snapshot_every=5, skip_file=skip_file)
    abandoned: list[int] = []
    for step in range(60):
        batch = _batch(step)
        outcome = guard(lambda: nn.functional.cross_entropy(model(x[batch]), y[batch]), batch_id=step)  # noqa: B023
        if outcome.rolled_back:
            assert outcome.recovery_action.startswith("lr_backoff") and outcome.skipped_batches
            assert outcome.skipped_batches[-1] == step  # the window ends with the sick step
            abandoned += outcome.skipped_batches
        storm.step()
    assert abandoned and list(SkipList(skip_file)) == abandoned
    payloads = [e.data for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]
    assert [b for p in payloads for b in p.skipped_batches] == abandoned  # type: ignore[union-attr]
    assert gov.recovery_stats.skipped_batches == len(abandoned)
    resumed = [step for step in SkipList(skip_file).filter(range(60))]
    assert set(resumed) == set(range(60)) - set(abandoned)


def test_without_batch_ids_nothing_is_recorded_and_nothing_breaks(tmp_path: Path) -> None:
    rollbacks, _, gov = _run(RecoveryPolicy(), steps=60)
    assert rollbacks > 0 and gov.recovery_stats.skipped_batches == 0


def test_shadow_mode_through_guarded_steps_trains_exactly_as_unguarded() -> None:
    def train(policy: RecoveryPolicy | None) -> tuple[nn.Module, list[str]]:
        model, opt, storm = _model()
        x, y = _data()
        guard = None
        if policy is not None:
            gov = TolariaGovernor(model, optimizer=opt, random_guess_loss=math.log(4), absolute_threshold=3.0,
                                  recovery=policy)  # fmt: skip
            guard = GuardedStep(gov, opt, snapshot_every=5)
        actions = []
        for step in range(40):
            batch = _batch(step)

            def loss() -> torch.Tensor:
                return nn.functional.cross_entropy(model(x[batch]), y[batch])  # noqa: B023

            if guard is None:
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()
            else:
                outcome = guard(loss)
                assert not outcome.rolled_back and outcome.stepped
                actions.append(outcome.recovery_action)
            storm.step()
        return model, actions

    plain, _ = train(None)
    shadow, actions = train(RecoveryPolicy(mode="observe"))
    assert "observed" in actions
    for a, b in zip(plain.state_dict().values(), shadow.state_dict().values(), strict=True):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()


def test_track_grad_norm_must_be_a_bool() -> None:
    model, opt, _ = _model()
    gov = TolariaGovernor(model, optimizer=opt)
    with pytest.raises(TypeError, match="track_grad_norm must be True or False"):
        GuardedStep(gov, opt, track_grad_norm=1)  # type: ignore[arg-type]


# -- README: "When a fault keeps coming back" runs as written ---------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks() -> list[str]:
    import re

    text = README.read_text(encoding="utf-8")
    section = text.split("## When a fault keeps coming back: the recovery policy\n", 1)[1].split("\n## ", 1)[
        0
    ]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_recovery_snippets_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tolaria

    monkeypatch.chdir(tmp_path)
    training, resuming = _readme_blocks()
    model, optimizer, storm = _model()
    x, y = _data()
    loader = []
    for step in range(40):
        batch = _batch(step)
        loader.append((x[batch], y[batch]))

    class StormyLoader(list):  # the storm raises the learning rate while the loop runs
        def __iter__(self):  # type: ignore[no-untyped-def]
            for item in super().__iter__():
                yield item
                storm.step()

    names = {"tolaria": tolaria, "torch": torch, "model": model, "optimizer": optimizer,
             "loader": StormyLoader(loader), "loss_fn": nn.functional.cross_entropy}  # fmt: skip
    exec(compile(training, "README.md", "exec"), names)
    printed = capsys.readouterr().out
    assert "then lr_backoff" in printed and (tmp_path / "skip.json").exists()
    skipped = list(SkipList(tmp_path / "skip.json"))
    assert skipped and names["governor"].recovery_stats.skipped_batches == len(skipped)
    dataset = list(range(40))
    resumed = {"tolaria": tolaria, "torch": torch, "dataset": dataset}
    exec(compile(resuming, "README.md", "exec"), resumed)
    assert [int(i) for i in resumed["resumed"]] == [i for i in dataset if i not in skipped]
    path = names["governor"].save_last_good("lkg/manual")
    fresh, fresh_opt, _ = _model()
    assert load_last_good(path, fresh, fresh_opt) is None
    saved = names["governor"].last_good_state
    assert all(torch.equal(value, saved[key]) for key, value in fresh.state_dict().items())
