"""Host networks: the fixed trunks whose injection points can receive seeds.

A host lists its injection points in forward order (slot ids ``r0c0``, ``r0c1``, ...) and
takes the slots at call time, ``host(x, slots)``, so one host class serves any subset of
slots. A point with no slot in ``slots`` is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tolaria.morphogenesis.blueprints import HostKind


def slot_id_for(index: int, row: int = 0) -> str:
    """Slot id of the ``index``-th injection point in ``row`` (``r0c0``, ``r0c1``, ...)."""
    return f"r{row}c{index}"


@dataclass(frozen=True)
class InjectionPoint:
    """Where a slot can sit: its id, feature size, host kind and options for seed factories."""

    slot_id: str
    dim: int
    kind: HostKind
    seed_options: Mapping[str, int] = field(default_factory=dict)


class HostNetwork(nn.Module):
    """Base class of hosts: subclasses set ``kind`` and ``injection_points`` and call
    :meth:`_inject` after each block."""

    kind: HostKind
    injection_points: tuple[InjectionPoint, ...]

    @property
    def slot_ids(self) -> tuple[str, ...]:
        """Ids of all injection points, in forward order."""
        return tuple(point.slot_id for point in self.injection_points)

    def _inject(
        self, index: int, features: torch.Tensor, slots: Mapping[str, nn.Module] | None
    ) -> torch.Tensor:
        if slots is None:
            return features
        slot_id = self.injection_points[index].slot_id
        return slots[slot_id](features) if slot_id in slots else features


class CNNHost(HostNetwork):
    """Small image classifier: conv-BN-ReLU-maxpool blocks, global average pool, linear head.

    Input ``(batch, in_channels, image_size, image_size)`` float; output ``(batch,
    num_classes)`` logits. One injection point after each block (three by default).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {widths}")
        if image_size < 2 ** len(widths):
            raise ValueError(f"image_size={image_size} is too small for {len(widths)} 2x poolings")
        self.kind = "cnn"
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        blocks = []
        previous = in_channels
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(previous, num_classes)
        # Near-zero logits at start put the initial loss at the random-guess loss ln(classes),
        # the Governor's lobotomy reference; not exactly zero, so outputs still depend on input.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.injection_points = tuple(InjectionPoint(slot_id_for(i), w, "cnn") for i, w in enumerate(widths))

    def forward(self, images: torch.Tensor, slots: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (batch, {self.in_channels}, H, W), got {tuple(images.shape)}"
            )
        features = images
        for index, block in enumerate(self.blocks):
            features = self._inject(index, block(features), slots)
        return self.head(features.mean(dim=(2, 3)))


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`TransformerHost`; validated on construction."""

    vocab_size: int = 50257
    context_length: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


#: GPT-2 small (124M parameters with tied embeddings), for benchmarks.
GPT2_SMALL = TransformerConfig(
    vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12, mlp_ratio=4
)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, d_model = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (batch, tokens, self.n_heads, d_model // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, d_model))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm GPT-2 block: attention and MLP, each on a residual branch."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerHost(HostNetwork):
    """Small causal language model (GPT-2 layout); one injection point after each block.

    Input ``(batch, tokens)`` int64 ids with ``tokens <= context_length``; output ``(batch,
    tokens, vocab_size)`` logits. With ``tie_weights`` the output projection reuses the
    token embedding (one tensor, one state-dict key). ``TransformerHost.gpt2_small()``
    builds the 124M-parameter GPT-2 small shape.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        context_length: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        config = TransformerConfig(
            vocab_size, context_length, d_model, n_layers, n_heads, mlp_ratio, dropout, tie_weights
        )
        self.kind = "transformer"
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = None if tie_weights else nn.Linear(config.d_model, config.vocab_size, bias=False)
        options = {"n_heads": config.n_heads, "mlp_ratio": config.mlp_ratio}
        self.injection_points = tuple(
            InjectionPoint(slot_id_for(i), config.d_model, "transformer", options)
            for i in range(config.n_layers)
        )
        self._init_weights()

    @classmethod
    def from_config(cls, config: TransformerConfig) -> TransformerHost:
        """Build a host of shape ``config``."""
        return cls(**asdict(config))

    @classmethod
    def gpt2_small(cls) -> TransformerHost:
        """GPT-2 small: vocab 50257, context 1024, d_model 768, 12 layers, 12 heads (≈124M)."""
        return cls.from_config(GPT2_SMALL)

    def _init_weights(self) -> None:
        # GPT-2's scheme: N(0, 0.02), zero biases, and residual output projections shrunk by
        # sqrt(2 * n_layers) so the residual stream's variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, slots: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, tokens), got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"sequence length {length} exceeds context_length={self.config.context_length}")
        positions = torch.arange(length, device=tokens.device)
        features = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for index, block in enumerate(self.blocks):
            features = self._inject(index, block(features), slots)
        features = self.ln_f(features)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(features, weight)


__all__ = [
    "GPT2_SMALL",
    "CNNHost",
    "HostNetwork",
    "InjectionPoint",
    "TransformerConfig",
    "TransformerHost",
    "slot_id_for",
]
