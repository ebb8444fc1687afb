"""Small seed-bearing models and slot helpers shared by the morphogenesis tests."""

from __future__ import annotations

from typing import cast

import torch

from tolaria.morphogenesis import CNNHost, MorphogeneticModel, SeedSlot, SeedStage, TransformerHost

S = SeedStage


def cnn_slot(**kwargs: object) -> SeedSlot:
    return SeedSlot("r0c0", 8, "cnn", **kwargs)  # type: ignore[arg-type]


def tiny_cnn_model(**kwargs: object) -> MorphogeneticModel:
    torch.manual_seed(0)
    model = MorphogeneticModel(CNNHost(widths=(8, 16, 16)), slots=["r0c0", "r0c1", "r0c2"], **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        # A trained-looking head, so outputs depend strongly on the features seeds touch.
        cast(CNNHost, model.host).head.weight.normal_()
    return model


def tiny_lm_model() -> MorphogeneticModel:
    torch.manual_seed(0)
    host = TransformerHost(vocab_size=97, context_length=16, d_model=16, n_layers=2, n_heads=2)
    return MorphogeneticModel(host, slots=["r0c0", "r0c1"])


def advance_to(slot: SeedSlot, target: SeedStage) -> None:
    order = [S.GERMINATED, S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED]
    while slot.stage != target:
        slot.advance_stage(order[order.index(slot.stage) + 1])
