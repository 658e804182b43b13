"""The protocol between the layers a strategy adds and generic code (summary, persistence, materialize).

A reduced layer implements whichever of these methods apply to it; generic code reaches them only through the
functions below, never through a strategy's own names:

    summary_info() -> dict               describe yourself: one row of `summary()['layers']` (kind, rank, sparsity,
                                         stored_params, bytes, ...)
    encode_state_dict(prefix, state)     replace your entries of a de-duplicated state_dict by your compact stored form
    decode_state_dict(prefix, state)     the inverse, before `load_state_dict`
    materialize() -> nn.Module           a plain module computing the same function
    referenced_parameters() -> list      parameters your forward pass uses that another module registers (a shared bank
                                         this layer only points to); `summary()` counts them once per use
    describe_stored(prefix, layout)      what `encode_state_dict` writes, known without the data (names, dtypes, shapes
                                         or bounds as `StoredTensor`): a loader checks a file's header against it
                                         before it allocates anything
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ['Describes', 'CompactState', 'DescribesStorage', 'StoredTensor', 'Materializes', 'ReferencesShared',
           'layer_rows', 'referenced_parameters', 'encode_compact', 'decode_compact', 'describe_compact']


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a stored state, known without its data.

    Attributes:
        dtype: the dtype the entry is stored in.
        shape: its exact shape; None for a 1-D entry of data-dependent length (at most `max_numel` entries).
        max_numel: the bound on a data-dependent length.
        exact_dtype: the dtype must match exactly (otherwise any floating dtype stands for a floating one).
        optional: the entry may be absent.
    """

    dtype: torch.dtype
    shape: tuple[int, ...] | None = None
    max_numel: int | None = None
    exact_dtype: bool = False
    optional: bool = False


@runtime_checkable
class Describes(Protocol):
    def summary_info(self) -> dict[str, Any]: ...


@runtime_checkable
class CompactState(Protocol):
    def encode_state_dict(self, prefix: str, state: dict[str, torch.Tensor]) -> None: ...

    def decode_state_dict(self, prefix: str, state: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class DescribesStorage(Protocol):
    def describe_stored(self, prefix: str, layout: dict[str, StoredTensor]) -> None: ...


@runtime_checkable
class Materializes(Protocol):
    def materialize(self) -> nn.Module: ...


@runtime_checkable
class ReferencesShared(Protocol):
    def referenced_parameters(self) -> list[nn.Parameter]: ...


def layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """`summary_info()` of every module that describes itself, each with its `path`."""
    return [{'path': path, **module.summary_info()} for path, module in model.named_modules()
            if isinstance(module, Describes)]


def referenced_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters `module` computes with but does not register (empty for ordinary modules)."""
    return module.referenced_parameters() if isinstance(module, ReferencesShared) else []


def encode_compact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Let every layer with a compact stored form rewrite its entries of `state` in place."""
    for prefix, module in model.named_modules():
        if isinstance(module, CompactState):
            module.encode_state_dict(f'{prefix}.' if prefix else '', state)


def decode_compact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `encode_compact`, in place."""
    for prefix, module in model.named_modules():
        if isinstance(module, CompactState):
            module.decode_state_dict(f'{prefix}.' if prefix else '', state)


def describe_compact(model: nn.Module, layout: dict[str, StoredTensor]) -> list[str]:
    """`encode_compact` on a layout instead of data, in place. Returns the prefixes of compact layers that do not
    describe their stored form (their entries cannot be checked before loading)."""
    opaque = []
    for prefix, module in model.named_modules():
        if isinstance(module, CompactState):
            dotted = f'{prefix}.' if prefix else ''
            if isinstance(module, DescribesStorage):
                module.describe_stored(dotted, layout)
            else:
                opaque.append(dotted)
    return opaque
