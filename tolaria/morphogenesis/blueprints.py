"""Blueprints: the seed modules a slot can grow.

Every seed maps host features to a tensor of the same shape, and its last layer starts at
zero, so grafting a fresh seed leaves the host's function unchanged until the seed learns.
CNN seeds take ``(batch, channels, height, width)``; transformer seeds take
``(batch, tokens, d_model)`` and are causal (a token never sees later tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HostKind = Literal["cnn", "transformer"]
HOST_KINDS: tuple[HostKind, ...] = ("cnn", "transformer")

SeedFactory = Callable[[int, Mapping[str, int]], nn.Module]


@dataclass(frozen=True)
class Blueprint:
    """A named recipe for a seed: ``factory(dim, options)`` builds it for one host kind."""

    name: str
    kind: HostKind
    description: str
    factory: SeedFactory


def _zero_(layer: nn.Linear | nn.Conv2d) -> None:
    # The zero output of a fresh seed rests on this: the final layer contributes nothing.
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class ConvLightSeed(nn.Module):
    """Depthwise 3×3 conv, GELU, pointwise 1×1 conv (zero-initialised)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)
        _zero_(self.pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(F.gelu(self.depthwise(x)))


class ConvHeavySeed(nn.Module):
    """Two full 3×3 convs with GroupNorm between them; the second is zero-initialised."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # GroupNorm, not BatchNorm: the seed's output must not depend on batch composition,
        # and it keeps running statistics out of the seed's state.
        groups = math.gcd(channels, 8)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        _zero_(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm(self.conv1(x))))


class AttentionSeed(nn.Module):
    """Pre-norm causal self-attention whose output projection starts at zero."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        _zero_(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, d_model = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        shape = (batch, tokens, self.n_heads, d_model // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, d_model))


class MLPSeed(nn.Module):
    """Pre-norm two-layer MLP (GELU); the down projection starts at zero."""

    def __init__(self, d_model: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, ratio * d_model)
        self.down = nn.Linear(ratio * d_model, d_model)
        _zero_(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


class LoRASeed(nn.Module):
    """Low-rank residual ``B(A(x))``: A random, B zero, the usual LoRA start."""

    def __init__(self, d_model: int, rank: int = 8) -> None:
        super().__init__()
        rank = max(1, min(rank, d_model))
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        _zero_(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _attention_heads(d_model: int, options: Mapping[str, int]) -> int:
    # Follow the host's head count when it divides d_model; otherwise one head always works.
    heads = int(options.get("n_heads", 1))
    return heads if heads > 0 and d_model % heads == 0 else 1


BLUEPRINTS: dict[str, Blueprint] = {}


def register_blueprint(blueprint: Blueprint) -> Blueprint:
    """Add ``blueprint`` to the registry; a name already taken raises ValueError."""
    if blueprint.kind not in HOST_KINDS:
        raise ValueError(f"blueprint kind must be one of {HOST_KINDS}, got {blueprint.kind!r}")
    if blueprint.name in BLUEPRINTS:
        raise ValueError(f"blueprint {blueprint.name!r} is already registered")
    BLUEPRINTS[blueprint.name] = blueprint
    return blueprint


for _blueprint in (
    Blueprint("conv_light", "cnn", "depthwise-separable 3x3 conv", lambda d, o: ConvLightSeed(d)),
    Blueprint("conv_heavy", "cnn", "two 3x3 convs with GroupNorm", lambda d, o: ConvHeavySeed(d)),
    Blueprint(
        "attention",
        "transformer",
        "causal self-attention",
        lambda d, o: AttentionSeed(d, _attention_heads(d, o)),
    ),
    Blueprint(
        "mlp", "transformer", "two-layer GELU MLP", lambda d, o: MLPSeed(d, int(o.get("mlp_ratio", 4)))
    ),
    Blueprint(
        "lora", "transformer", "rank-8 low-rank adapter", lambda d, o: LoRASeed(d, int(o.get("rank", 8)))
    ),
):
    register_blueprint(_blueprint)


def available_blueprints(kind: HostKind | None = None) -> list[str]:
    """Sorted names of registered blueprints, optionally only those for host ``kind``."""
    return sorted(name for name, bp in BLUEPRINTS.items() if kind is None or bp.kind == kind)


def get_blueprint(name: str, kind: HostKind | None = None) -> Blueprint:
    """Look ``name`` up; unknown (or, given ``kind``, incompatible) names raise ValueError."""
    blueprint = BLUEPRINTS.get(name)
    if blueprint is None:
        raise ValueError(f"unknown blueprint {name!r}; known blueprints: {available_blueprints()}")
    if kind is not None and blueprint.kind != kind:
        raise ValueError(
            f"blueprint {name!r} is for {blueprint.kind} hosts, not {kind} hosts; "
            f"blueprints for {kind} hosts: {available_blueprints(kind)}"
        )
    return blueprint


def create_seed(name: str, kind: HostKind, dim: int, options: Mapping[str, int] | None = None) -> nn.Module:
    """Build a fresh seed of blueprint ``name`` for a ``kind`` host with feature size ``dim``."""
    return get_blueprint(name, kind).factory(dim, options or {})


__all__ = [
    "BLUEPRINTS",
    "HOST_KINDS",
    "AttentionSeed",
    "Blueprint",
    "ConvHeavySeed",
    "ConvLightSeed",
    "HostKind",
    "LoRASeed",
    "MLPSeed",
    "available_blueprints",
    "create_seed",
    "get_blueprint",
    "register_blueprint",
]
