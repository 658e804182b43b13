"""Tensors shared between several places of a model: find them, count them once, store them once."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ['tensor_identity', 'alias_map', 'unique_parameters', 'unique_tensors', 'count_unique']


def tensor_identity(t: torch.Tensor) -> tuple:
    """A key equal for two tensors exactly when they are the same view of the same memory."""
    if t.device.type == 'meta':
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def alias_map(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """`{alias_key: canonical_key}` for every key whose tensor is the same as an earlier key's."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, t in state.items():
        ident = tensor_identity(t)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        ident = tensor_identity(t)
        if ident not in seen:
            seen.add(ident)
            out.append(t)
    return out


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with every shared tensor listed once (also when two Parameter objects view one memory)."""
    return unique_tensors(model.parameters())


def count_unique(model: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(model))
