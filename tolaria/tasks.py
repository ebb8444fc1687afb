"""Task registry: what to train (host shape, loss, random-guess loss) and on which data.

Every task carries a synthetic data source that needs no download, is deterministic given
a seed, and has learnable structure, so a few optimizer steps visibly lower the loss:

- ``cifar10``: 32×32×3 images, 10 classes; each class is a fixed smooth colour pattern and
  every sample is its class pattern plus Gaussian noise.
- ``tinystories``: a GPT-style LM over the GPT-2 vocabulary (50257 ids); text is a Markov
  chain over a small set of "words" scattered through the vocabulary, where each word is
  followed by its fixed successor most of the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from tolaria.morphogenesis import (
    CNNHost,
    HostNetwork,
    MorphogeneticModel,
    TransformerConfig,
    TransformerHost,
    slot_id_for,
)

TaskKind = Literal["classification", "language_modeling"]

# Fixed, so every run of a task sees the same underlying distribution; the sampling seed of
# batches() only changes which samples are drawn from it.
_STRUCTURE_SEED = 20240611


class SyntheticSource(Protocol):
    """A data source: ``batch(batch_size, generator)`` returns ``(inputs, targets)`` on CPU."""

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClassPatternImages:
    """Images ``pattern[label] + noise_std · N(0, 1)``; patterns are smooth and unit-variance.

    Outputs: images ``(batch, channels, size, size)`` float32, labels ``(batch,)`` int64.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        size: int = 32,
        noise_std: float = 2.0,
        structure_seed: int = _STRUCTURE_SEED,
    ) -> None:
        generator = torch.Generator().manual_seed(structure_seed)
        # Coarse 4×4 noise upsampled to full size: low-frequency patterns that a small CNN
        # picks up within a few steps, unlike per-pixel noise.
        coarse = torch.randn(num_classes, channels, 4, 4, generator=generator)
        patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        patterns = patterns - patterns.mean(dim=(1, 2, 3), keepdim=True)
        self.patterns = patterns / patterns.std(dim=(1, 2, 3), keepdim=True)
        self.num_classes = num_classes
        self.noise_std = noise_std

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(self.num_classes, (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *self.patterns.shape[1:]), generator=generator)
        return self.patterns[labels] + self.noise_std * noise, labels


class MarkovTokens:
    """Token sequences from a sparse Markov chain over ``num_words`` ids of the vocabulary.

    Each word is followed by its fixed successor with probability ``stickiness``, otherwise
    by a uniformly random word. Outputs: inputs and next-token targets, both ``(batch,
    context_length)`` int64.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        context_length: int = 32,
        num_words: int = 64,
        stickiness: float = 0.9,
        structure_seed: int = _STRUCTURE_SEED,
    ) -> None:
        if not 1 <= num_words <= vocab_size:
            raise ValueError(f"num_words must be in [1, vocab_size={vocab_size}], got {num_words}")
        generator = torch.Generator().manual_seed(structure_seed)
        self.words = torch.randperm(vocab_size, generator=generator)[:num_words]
        self.successor = torch.randperm(num_words, generator=generator)
        self.context_length = context_length
        self.num_words = num_words
        self.stickiness = stickiness

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        states = torch.empty(batch_size, self.context_length + 1, dtype=torch.int64)
        states[:, 0] = torch.randint(self.num_words, (batch_size,), generator=generator)
        follow = torch.rand(batch_size, self.context_length, generator=generator) < self.stickiness
        jumps = torch.randint(self.num_words, (batch_size, self.context_length), generator=generator)
        for t in range(self.context_length):
            states[:, t + 1] = torch.where(follow[:, t], self.successor[states[:, t]], jumps[:, t])
        tokens = self.words[states]
        return tokens[:, :-1], tokens[:, 1:]


@dataclass(frozen=True)
class TaskSpec:
    """One trainable task.

    ``num_classes`` is the class count (classification) or the vocabulary size (language
    modelling); ``random_guess_loss`` is its natural log, the cross-entropy of a uniform
    guess. ``slot_ids`` lists the host's injection points in forward order.
    """

    name: str
    kind: TaskKind
    num_classes: int
    slot_ids: tuple[str, ...]
    host_factory: Callable[[], HostNetwork]
    source_factory: Callable[[], SyntheticSource]
    batch_size: int
    learning_rate: float
    momentum: float = 0.9
    description: str = ""

    @property
    def random_guess_loss(self) -> float:
        """Cross-entropy (nats) of a uniform guess: ``ln(num_classes)``."""
        return math.log(self.num_classes)

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size for language-modelling tasks, None otherwise."""
        return self.num_classes if self.kind == "language_modeling" else None

    def create_model(
        self,
        device: str | torch.device = "cpu",
        slots: Sequence[str] | None = None,
        permissive_gates: bool = True,
    ) -> MorphogeneticModel:
        """A fresh model for this task; ``slots=None`` gives a slot at every injection point.

        The device is passed to torch as is; :func:`tolaria.environment.create_model` is the
        front door that validates it first.
        """
        return MorphogeneticModel(
            self.host_factory(), device=device, slots=slots, permissive_gates=permissive_gates
        )

    def create_optimizer(self, model: torch.nn.Module) -> torch.optim.SGD:
        """SGD with this task's tuned ``learning_rate`` and ``momentum`` over ``model``'s parameters."""
        return torch.optim.SGD(model.parameters(), lr=self.learning_rate, momentum=self.momentum)

    def data_source(self) -> SyntheticSource:
        """This task's synthetic data source."""
        return self.source_factory()

    def batches(
        self, batch_size: int | None = None, *, seed: int = 0, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(inputs, targets)`` batches, the same sequence for the same ``seed``."""
        size = batch_size or self.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        source = self.data_source()
        generator = torch.Generator().manual_seed(seed)
        while True:
            inputs, targets = source.batch(size, generator)
            yield inputs.to(device), targets.to(device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy; LM logits ``(B, T, V)`` are flattened against ``(B, T)`` targets."""
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


# Small enough for a 2-core CPU: the 50257-way output dominates, so d_model and the
# context stay tiny.
_TINYSTORIES_SHAPE = TransformerConfig(vocab_size=50257, context_length=32, d_model=32, n_layers=2, n_heads=2)
_CNN_WIDTHS = (32, 64, 128)

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the registry; a name already taken raises ValueError."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


register_task(
    TaskSpec(
        name="cifar10",
        kind="classification",
        num_classes=10,
        slot_ids=tuple(slot_id_for(i) for i in range(len(_CNN_WIDTHS))),
        host_factory=lambda: CNNHost(num_classes=10, widths=_CNN_WIDTHS),
        source_factory=lambda: ClassPatternImages(num_classes=10),
        batch_size=32,
        learning_rate=0.05,
        description="CIFAR-10-shaped classification on synthetic class patterns",
    )
)
register_task(
    TaskSpec(
        name="tinystories",
        kind="language_modeling",
        num_classes=50257,
        slot_ids=tuple(slot_id_for(i) for i in range(_TINYSTORIES_SHAPE.n_layers)),
        host_factory=lambda: TransformerHost.from_config(_TINYSTORIES_SHAPE),
        source_factory=lambda: MarkovTokens(50257, _TINYSTORIES_SHAPE.context_length),
        batch_size=8,
        learning_rate=0.05,
        description="GPT-2-vocabulary causal LM on a synthetic Markov token stream",
    )
)


def available_tasks() -> list[str]:
    """Sorted names of the registered tasks."""
    return sorted(TASKS)


def get_task_spec(name: str) -> TaskSpec:
    """The task called ``name``; an unknown name raises ValueError listing the tasks."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; available tasks: {available_tasks()}") from None


__all__ = [
    "TASKS",
    "ClassPatternImages",
    "MarkovTokens",
    "SyntheticSource",
    "TaskKind",
    "TaskSpec",
    "available_tasks",
    "get_task_spec",
    "register_task",
]
