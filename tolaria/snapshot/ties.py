"""Which captured tensors share memory (tied weights), decided once for both stores."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def storage_groups(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Group tensors that are the same view of the same memory, so a snapshot stores them once.

    Two tensors are one group when device, data address, shape, stride and dtype are equal AND
    their lazy conjugate and negative bits are: a conjugate or negative view reads other values
    from the same memory, so it is not a tie. Partially overlapping views are kept apart (they
    are captured at the same instant, so restoring both writes consistent values).

    Returns, for each tensor, its group index in order of first appearance (-1 for an empty
    tensor: there is nothing to store), and for each group the index of its first tensor.
    """
    groups: dict[tuple[object, ...], int] = {}
    group_first: list[int] = []
    group_of: list[int] = []
    for index, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            group_of.append(-1)
            continue
        ident = (
            tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
            tensor.is_conj(), tensor.is_neg(),
        )  # fmt: skip
        group = groups.setdefault(ident, len(group_first))
        if group == len(group_first):
            group_first.append(index)
        group_of.append(group)
    return group_of, group_first


__all__ = ["storage_groups"]
