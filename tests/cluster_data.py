"""The integration tests' task: four well-separated Gaussian clusters in 8 dimensions, which a
tiny MLP learns in a few steps (its random-guess loss is ln 4)."""

from __future__ import annotations

import math

import torch

CLASSES = 4
RANDOM_GUESS = math.log(CLASSES)


def cluster_tensors(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: ``n`` points, labels cycling through the classes."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, 8, generator=generator) * 3
    labels = torch.arange(n) % CLASSES
    inputs = centers[labels] + torch.randn(n, 8, generator=generator) * 0.5
    return inputs, labels


def cluster_data(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    """The same points as a TensorDataset of (input, label) pairs."""
    return torch.utils.data.TensorDataset(*cluster_tensors(n, seed))


def final_loss(model: torch.nn.Module) -> float:
    """Cross-entropy of a logits model over every cluster point, without gradients."""
    inputs, labels = cluster_data().tensors
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(inputs), labels))


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
