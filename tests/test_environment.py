"""create_model(), parse_device(), validate_device(): the checked front door."""

from __future__ import annotations

import pytest
import torch

from tolaria.environment import create_model, parse_device, validate_device
from tolaria.morphogenesis import MorphogeneticModel

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")


def pretend_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cpu", "cpu"), (" CPU ", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda:3"), ("meta", "meta")],
)
def test_parse_device_understands_device_strings(text: str, expected: str) -> None:
    assert parse_device(text) == torch.device(expected)


def test_parse_device_passes_torch_devices_through() -> None:
    assert parse_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("available", [True, False])
def test_auto_picks_cuda_only_when_available(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    pretend_cuda(monkeypatch, 1 if available else 0)
    assert parse_device("auto") == torch.device("cuda" if available else "cpu")


@pytest.mark.parametrize("text", ["gpu", "", "cuda:-1", "cuda:x", "cuda:1:2", "xpu"])
def test_bad_device_strings_raise_value_error_listing_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"device=.*'auto', 'cpu', 'cuda', 'cuda:N'"):
        parse_device(text)


def test_non_string_device_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        parse_device(0)  # type: ignore[arg-type]


@needs_no_cuda
# Explicit ids: conftest skips any test carrying a keyword "cuda", and a bare parameter id is one.
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:7"], ids=["bare", "index0", "index7"])
def test_cuda_without_cuda_says_so(text: str) -> None:
    with pytest.raises(RuntimeError, match="CUDA.*not available"):
        validate_device(text)


def test_missing_cuda_index_names_how_many_devices_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cuda(monkeypatch, 2)
    with pytest.raises(
        RuntimeError, match=r"'cuda:7' does not exist.*2 CUDA device\(s\) \(cuda:0\.\.cuda:1\)"
    ):
        validate_device("cuda:7")
    assert validate_device("cuda:1") == torch.device("cuda:1")
    assert validate_device("cuda") == torch.device("cuda")


def test_validate_device_accepts_cpu() -> None:
    assert validate_device("cpu") == torch.device("cpu")


def test_create_model_builds_a_model_on_the_device() -> None:
    model = create_model("cifar10", "cpu", slots=["r0c0", "r0c2"], permissive_gates=False)
    assert isinstance(model, MorphogeneticModel)
    assert model.slot_ids == ("r0c0", "r0c2")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.get_slot("r0c0").permissive_gates


def test_create_model_slots_are_keyword_only_and_required() -> None:
    with pytest.raises(TypeError):
        create_model("cifar10", "cpu", ["r0c0"])  # type: ignore[misc]
    with pytest.raises(TypeError):
        create_model("cifar10", "cpu")  # type: ignore[call-arg]


@needs_no_cuda
def test_create_model_defaults_to_cuda_and_refuses_without_it() -> None:
    with pytest.raises(RuntimeError, match="CUDA.*not available"):
        create_model(slots=["r0c0"])


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ([], "at least one slot"),
        (["r0c0", "r0c0", "r0c1", "r0c1"], r"slots contains duplicates: \['r0c0', 'r0c1'\]"),
        (["r0c9"], r"unknown slot\(s\) \['r0c9'\].*\['r0c0', 'r0c1', 'r0c2'\]"),
    ],
)
def test_create_model_refuses_bad_slots(slots: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("cifar10", "cpu", slots=slots)


def test_create_model_lists_tasks_for_an_unknown_one() -> None:
    with pytest.raises(ValueError, match="unknown task 'mnist'.*cifar10.*tinystories"):
        create_model("mnist", "cpu", slots=["r0c0"])


def test_create_model_builds_the_language_model() -> None:
    model = create_model("tinystories", "cpu", slots=["r0c1"])
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 50257)


# -- the original's error contract ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["gpu", "", "cuda:x", "tpu"], ids=["gpu", "empty", "bad-index", "tpu"])
def test_an_unparsable_device_is_invalid(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^Invalid device '{text}': .*not a valid device"):
        parse_device(text)
    with pytest.raises(ValueError, match=rf"^Invalid device '{text}': "):
        validate_device(text)


@pytest.mark.parametrize("kind", ["meta", "xla", "xpu", "hpu", "privateuseone"])
@pytest.mark.parametrize("as_device", [False, True], ids=["str", "torch.device"])
def test_validate_device_refuses_device_types_a_model_cannot_train_on(kind: str, as_device: bool) -> None:
    device: str | torch.device = torch.device(kind) if as_device else kind
    with pytest.raises(ValueError, match=rf"^Unsupported device type '{kind}' \(from '{kind}'\)"):
        validate_device(device)


def test_parse_device_names_the_unsupported_type_and_its_source() -> None:
    with pytest.raises(ValueError, match=r"^Unsupported device type 'xla' \(from ' XLA:1 '\)"):
        parse_device(" XLA:1 ")


def test_create_model_follows_the_same_device_rules() -> None:
    with pytest.raises(ValueError, match=r"^Unsupported device type 'meta' \(from 'meta'\)"):
        create_model("cifar10", "meta", slots=["r0c0"])
    with pytest.raises(ValueError, match=r"^Invalid device 'gpu': "):
        create_model("cifar10", "gpu", slots=["r0c0"])


@pytest.mark.parametrize("count", [0, 2], ids=["no-gpu", "two-gpus"])
def test_bare_cuda_is_refused_when_an_explicit_index_is_required(
    monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    pretend_cuda(monkeypatch, count)
    with pytest.raises(ValueError, match=r"names no CUDA index.*'cuda:N'"):
        validate_device("cuda", require_explicit_index=True)
    with pytest.raises(ValueError, match=r"names no CUDA index"):
        validate_device(torch.device("cuda"), require_explicit_index=True)


def test_an_explicit_cuda_index_passes_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cuda(monkeypatch, 2)
    assert validate_device("cuda:1", require_explicit_index=True) == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="does not exist"):
        validate_device("cuda:2", require_explicit_index=True)


def test_auto_keeps_working_and_gets_an_explicit_index_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cuda(monkeypatch, 0)
    assert validate_device("auto") == torch.device("cpu")
    assert validate_device("auto", require_explicit_index=True) == torch.device("cpu")
    pretend_cuda(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert validate_device("auto") == torch.device("cuda")
    assert validate_device(" AUTO ", require_explicit_index=True) == torch.device("cuda:1")


def test_require_explicit_index_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        validate_device("cpu", True)  # type: ignore[misc]


@pytest.mark.parametrize("available", [True, False])
def test_mps_has_only_index_zero(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    with pytest.raises(ValueError, match=r"^device 'mps:1' does not exist: there is one MPS device"):
        validate_device("mps:1")
    if available:
        assert validate_device("mps") == torch.device("mps")
        assert validate_device("mps:0") == torch.device("mps:0")
    else:
        with pytest.raises(RuntimeError, match="MPS is not available"):
            validate_device("mps:0")
