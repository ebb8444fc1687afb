"""The models and tensor sets the scenarios share, built the same way for every variant.

- ``many-small``: an ``nn.Sequential`` of 2,500 ``Linear(8, 8)`` layers: 5,000 small tensors;
- ``gpt2-small``: the 148 parameter shapes of GPT-2 small (124M parameters, ~0.5 GB, fp32) as an
  ``nn.ParameterDict`` (a module, so the Governor and ``load_state_dict`` take it as they take a
  model);
- health's ``many-small``: 500 tensors of 256 to 65,536 elements (log-uniform, fixed seed).
"""

from __future__ import annotations

import torch
from torch import nn

MANY_SMALL_LAYERS = 2500


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (vocab 50257, context 1024, 12 layers of width 768)."""
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,)]
        shapes += [(768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


def many_small_shapes(count: int = 500, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` 1-d shapes of 256 to 65,536 elements, log-uniform (the health scenario's set)."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.empty(count).uniform_(8.0, 16.0, generator=generator)
    return [(int(2.0**e),) for e in exponents.tolist()]


def many_small_model(device: str, layers: int = MANY_SMALL_LAYERS, width: int = 8) -> nn.Module:
    """``layers`` ``Linear(width, width)`` layers in a row: ``2 * layers`` small tensors."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)


def parameter_module(shapes: list[tuple[int, ...]], device: str, scale: float = 0.02) -> nn.ParameterDict:
    """One ``nn.Parameter`` per shape (keys ``p0``, ``p1``, ...), random normal times ``scale``."""
    generator = torch.Generator(device=device).manual_seed(0)
    return nn.ParameterDict(
        {
            f"p{i}": nn.Parameter(torch.randn(shape, generator=generator, device=device) * scale)
            for i, shape in enumerate(shapes)
        }
    )


__all__ = [
    "MANY_SMALL_LAYERS",
    "gpt2_small_shapes",
    "many_small_model",
    "many_small_shapes",
    "parameter_module",
]
