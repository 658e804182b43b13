"""Operations on the hidden units of one MLP: count, score, keep a subset, rebuild at a new width.

A hidden unit is one input column of fc2 together with the fc1 rows that feed it: one row for `Mlp`, the paired
value/gate rows `i` and `i + h` of GluMlp's packed fc1, or row `i` of both `fc1_g` and `fc1_x` for SwiGLU. Any
hidden-sized `mlp.norm` (scale_mlp_norm) is cut together with the units.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .discovery import mlp_kind

__all__ = ['hidden_units', 'input_linears', 'unit_importance', 'select_units', 'rebuild_units', 'mlp_param_count']


def hidden_units(mlp: nn.Module) -> int:
    """Number of hidden units (fc2's input width)."""
    return mlp.fc2.in_features


def input_linears(mlp: nn.Module) -> list[str]:
    """Names of the layers that produce the hidden activation."""
    return ['fc1_g', 'fc1_x'] if mlp_kind(mlp) == 'swiglu' else ['fc1']


def mlp_param_count(mlp: nn.Module) -> int:
    return sum(p.numel() for p in mlp.parameters())


def _unit_rows(mlp: nn.Module, name: str) -> torch.Tensor:
    """fc1 rows of a layer reshaped to (units, -1, in): GluMlp's packed rows become pairs."""
    weight = getattr(mlp, name).weight.detach()
    h = hidden_units(mlp)
    if mlp_kind(mlp) == 'glu':
        return weight.reshape(2, h, -1).transpose(0, 1)
    return weight.reshape(h, 1, -1)


@torch.no_grad()
def unit_importance(mlp: nn.Module, hidden_energy: torch.Tensor | None = None) -> torch.Tensor:
    """Importance per unit (float32): the norm of its fc2 column times, by default, the norms of its fc1 rows (and a
    hidden-sized norm's weight); with `hidden_energy` (measured E[h_j²] of fc2's input) times its RMS instead."""
    score = mlp.fc2.weight.detach().float().norm(dim=0)
    if hidden_energy is not None:
        return score * hidden_energy.sqrt().to(score)
    for name in input_linears(mlp):
        rows = _unit_rows(mlp, name).float()  # (h, k, in): k = 2 for GluMlp's gate/value pair
        score = score * rows.norm(dim=-1).prod(dim=1)
    norm_weight = getattr(getattr(mlp, 'norm', None), 'weight', None)
    if isinstance(norm_weight, torch.Tensor) and norm_weight.numel() == score.numel():
        score = score * norm_weight.detach().float().abs()
    return score


def _new_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def _slice_norm(norm: nn.Module, index: torch.Tensor, h: int) -> nn.Module:
    """Cut a hidden-sized norm (LayerNorm / RMSNorm over h) to the kept units; other norms pass through."""
    if isinstance(norm, nn.Identity):
        return norm
    params = dict(norm.named_parameters(recurse=False))
    if not any(p.shape[:1] == (h,) for p in params.values()):
        return norm
    new = copy.deepcopy(norm)
    for name, p in params.items():
        if p.shape[:1] == (h,):
            setattr(new, name, nn.Parameter(p.detach()[index].clone(), requires_grad=p.requires_grad))
    if hasattr(new, 'normalized_shape'):
        new.normalized_shape = (len(index),)
    return new


@torch.no_grad()
def select_units(mlp: nn.Module, index: torch.Tensor) -> None:
    """Keep only the hidden units in `index` (in that order), in place. fc2's bias is untouched."""
    kind = mlp_kind(mlp)
    h = hidden_units(mlp)
    index = index.to(device=mlp.fc2.weight.device, dtype=torch.long)
    k = len(index)
    for name in input_linears(mlp):
        old = getattr(mlp, name)
        rows = torch.cat([index, index + h]) if kind == 'glu' else index
        new = _new_linear(old, old.in_features, len(rows))
        new.weight.copy_(old.weight[rows])
        if old.bias is not None:
            new.bias.copy_(old.bias[rows])
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(mlp, name, new)
    old = mlp.fc2
    new = _new_linear(old, k, old.out_features)
    new.weight.copy_(old.weight[:, index])
    if old.bias is not None:
        new.bias.copy_(old.bias)
    mlp.fc2 = new
    if hasattr(mlp, 'norm'):
        mlp.norm = _slice_norm(mlp.norm, index, h)


@torch.no_grad()
def rebuild_units(mlp: nn.Module, units: int) -> None:
    """Give the MLP `units` hidden units with fresh weights, in place.

    Weights use timm's ViT default init (truncated normal, std 0.02, zero bias); a hidden-sized norm is reset.
    """
    kind = mlp_kind(mlp)
    for name in input_linears(mlp):
        old = getattr(mlp, name)
        setattr(mlp, name, _new_linear(old, old.in_features, units * (2 if kind == 'glu' else 1)))
    mlp.fc2 = _new_linear(mlp.fc2, units, mlp.fc2.out_features)
    for name in input_linears(mlp) + ['fc2']:
        layer = getattr(mlp, name)
        nn.init.trunc_normal_(layer.weight, std=.02)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    norm = getattr(mlp, 'norm', None)
    if norm is not None and not isinstance(norm, nn.Identity):
        params = dict(norm.named_parameters(recurse=False))
        if params:
            old_h = next(iter(params.values())).shape[0]
            mlp.norm = _slice_norm(norm, torch.zeros(units, dtype=torch.long), old_h)
            if hasattr(mlp.norm, 'reset_parameters'):
                mlp.norm.reset_parameters()
