"""Hosts (CNN, transformer) and MorphogeneticModel: shapes, slots, parameters, errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from tolaria.morphogenesis import (
    GPT2_SMALL,
    CNNHost,
    MorphogeneticModel,
    SeedStage,
    TransformerConfig,
    TransformerHost,
    validate_slots,
)
from tolaria.morphogenesis.hosts import TransformerBlock


def tiny_lm(**overrides: Any) -> TransformerHost:
    shape = TransformerConfig(vocab_size=101, context_length=16, d_model=24, n_layers=3, n_heads=3)
    return TransformerHost.from_config(dataclasses.replace(shape, **overrides))


# --------------------------------------------------------------------- hosts
def test_cnn_host_defaults_to_cifar_shape_with_three_injection_points() -> None:
    host = CNNHost()
    assert host.slot_ids == ("r0c0", "r0c1", "r0c2")
    assert host(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert [p.dim for p in host.injection_points] == [32, 64, 128]


def test_cnn_host_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        CNNHost()(torch.randn(2, 1, 32, 32))


def test_transformer_host_is_configurable_with_one_point_per_layer() -> None:
    host = tiny_lm(n_layers=5, mlp_ratio=2)
    assert host.slot_ids == tuple(f"r0c{i}" for i in range(5))
    assert host(torch.randint(101, (2, 16))).shape == (2, 16, 101)
    first_block = host.blocks[0]
    assert isinstance(first_block, TransformerBlock)
    assert first_block.mlp[0].weight.shape == (2 * 24, 24)


def test_transformer_host_is_causal() -> None:
    torch.manual_seed(0)
    host = tiny_lm().eval()
    tokens = torch.randint(101, (1, 10))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 101
    before, after = host(tokens), host(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    # ... and the positions that see the change do: a constant-output host would pass above.
    for position in (7, 8, 9):
        assert not torch.allclose(before[:, position], after[:, position])


def test_transformer_host_refuses_sequences_past_its_context() -> None:
    with pytest.raises(ValueError, match="context_length=16"):
        tiny_lm()(torch.zeros(1, 17, dtype=torch.long))


def test_tied_weights_are_one_tensor_and_one_key() -> None:
    host = tiny_lm()
    assert not any("lm_head" in key for key in host.state_dict())
    untied = tiny_lm(tie_weights=False)
    assert "lm_head.weight" in untied.state_dict()


def test_gpt2_small_shape_has_124m_parameters() -> None:
    # On the meta device nothing is allocated or initialised: only the shape is built.
    with torch.device("meta"):
        host = TransformerHost.gpt2_small()
    assert host.config == GPT2_SMALL
    assert (GPT2_SMALL.vocab_size, GPT2_SMALL.context_length, GPT2_SMALL.d_model) == (50257, 1024, 768)
    assert sum(p.numel() for p in host.parameters()) == 124_439_808
    assert len(host.slot_ids) == 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "n_heads=4 must divide d_model=30"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_transformer_config_names_the_bad_argument(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------- model
def test_slots_are_built_in_forward_order_whatever_the_listing_order() -> None:
    model = MorphogeneticModel(CNNHost(widths=(8, 8, 8)), slots=["r0c2", "r0c0"])
    assert isinstance(model.seed_slots, torch.nn.ModuleDict)
    assert model.slot_ids == ("r0c0", "r0c2")
    assert MorphogeneticModel(CNNHost(widths=(8, 8, 8))).slot_ids == ("r0c0", "r0c1", "r0c2")


def test_parameter_groups_and_seed_counts() -> None:
    torch.manual_seed(0)
    model = MorphogeneticModel(tiny_lm(), slots=["r0c0", "r0c1", "r0c2"])
    host_count = sum(p.numel() for p in model.get_host_parameters())
    assert list(model.get_seed_parameters()) == []
    assert model.total_params() == host_count
    model.germinate_seed("lora", slot="r0c0")
    model.germinate_seed("mlp", "the-mlp", slot="r0c2")
    for _ in range(4):
        model.advance_seed(slot="r0c2")
    assert model.get_slot("r0c2").stage == SeedStage.FOSSILIZED
    lora = sum(p.numel() for p in model.get_seed_parameters("r0c0"))
    mlp = sum(p.numel() for p in model.get_seed_parameters("r0c2"))
    assert lora == 2 * 8 * 24 and mlp > lora
    assert sum(p.numel() for p in model.get_seed_parameters()) == lora + mlp
    assert model.total_params() == host_count + lora + mlp
    assert (model.count_active_seeds(), model.count_fossilized_seeds()) == (1, 1)
    assert model.prune_seed(slot="r0c0", reason="test") is True
    assert (model.count_active_seeds(), model.count_fossilized_seeds()) == (0, 1)
    assert model.slot_states["r0c0"].stage == SeedStage.PRUNED  # type: ignore[union-attr]


def test_step_epoch_reaches_every_slot() -> None:
    model = MorphogeneticModel(CNNHost(widths=(8, 8, 8)), embargo_epochs=1)
    model.germinate_seed("conv_light", slot="r0c0")
    model.germinate_seed("conv_light", slot="r0c1")
    model.prune_seed(slot="r0c0")
    model.step_epoch()
    assert model.slot_states["r0c0"] is None
    assert model.slot_states["r0c1"].epochs_in_stage == 1  # type: ignore[union-attr]


def test_permissive_gates_reach_the_slots() -> None:
    model = MorphogeneticModel(CNNHost(widths=(8, 8, 8)), permissive_gates=False)
    assert all(not slot.permissive_gates for slot in model.iter_slots())


@pytest.mark.parametrize("call", ["get_slot", "seed_params", "germinate", "prune"])
def test_unknown_slot_in_a_model_call_lists_the_model_slots(call: str) -> None:
    model = MorphogeneticModel(CNNHost(widths=(8, 8, 8)), slots=["r0c1"])
    with pytest.raises(ValueError, match=r"'r0c0'.*\['r0c1'\]"):
        if call == "get_slot":
            model.get_slot("r0c0")
        elif call == "seed_params":
            model.get_seed_parameters("r0c0")
        elif call == "germinate":
            model.germinate_seed("conv_light", slot="r0c0")
        else:
            model.prune_seed(slot="r0c0")


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ([], r"at least one slot; valid slot ids: \['r0c0', 'r0c1', 'r0c2'\]"),
        ("r0c0", "not|got 'r0c0'"),
        (["r0c1", "r0c0", "r0c1", "r0c0", "r0c2"], r"slots contains duplicates: \['r0c0', 'r0c1'\]"),
        (["r0c0", "r5c5"], r"unknown slot\(s\) \['r5c5'\].*valid slot ids: \['r0c0', 'r0c1', 'r0c2'\]"),
    ],
)
def test_bad_slot_lists_are_refused_before_anything_is_built(slots: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_slots(slots, ["r0c0", "r0c1", "r0c2"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        MorphogeneticModel(CNNHost(widths=(8, 8, 8)), slots=slots)  # type: ignore[arg-type]
