"""GroupedMLP: consecutive blocks share one MLP module."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.discovery import resolve_groups
from ..errors import ReduceError
from ..core.hidden_units import input_linears
from ..core.registry import register_strategy


@dataclass
class GroupedConfig:
    """Options of `grouped`.

    Attributes:
        group_size: blocks per shared MLP (>= 1; 2 = the paper). A shorter last group is allowed.
        init: `'mean'` (default; the group's mean, right for pretrained weights and, for i.i.d. random weights,
            the same variance as the paper's scaling), `'scale'` (the paper's from-scratch init: the first member's
            fc1 weight, fc1 bias and fc2 weight times `scale`, fc2 bias unscaled) or `'first'` (the first member).
        scale: the factor for `init='scale'`; default 1/sqrt(group_size) (0.707 for pairs).
        within_stage: groups never span two stages (Swin's `layers[i]`).
        groups: explicit groups of block indices instead of `group_size`, e.g. `[[0, 1, 2], [3]]`.
    """

    group_size: int = 2
    init: Literal['mean', 'scale', 'first'] = 'mean'
    scale: float | None = None
    within_stage: bool = True
    groups: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ReduceError(f'grouped: group_size must be an integer >= 1, got {self.group_size}.')
        if self.scale is not None and self.init != 'scale':
            raise ReduceError(f"grouped: scale={self.scale} only applies with init='scale' (init is {self.init!r}).")

    @property
    def scale_factor(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.group_size)


@register_strategy('grouped', GroupedConfig, description='one shared MLP per group of consecutive blocks')
def apply_grouped(model: nn.Module, sites: list, config: GroupedConfig) -> None:
    """Make every group's blocks use one MLP module (shared object: one set of parameters), in place."""
    for group in resolve_groups(sites, config.group_size, config.groups, config.within_stage):
        members = [sites[i].mlp for i in group]
        shapes = [[tuple(p.shape) for p in m.parameters()] for m in members]
        if any(type(m) is not type(members[0]) or s != shapes[0] for m, s in zip(members, shapes)):
            paths = ', '.join(sites[i].path for i in group)
            raise ReduceError(f'grouped: blocks {paths} have MLPs of different types or shapes and cannot share one.')
        shared = members[0]
        with torch.no_grad():
            if config.init == 'mean' and len(members) > 1:
                means = {name: torch.stack([m.get_parameter(name).detach() for m in members]).mean(0)
                         for name, _ in shared.named_parameters()}
                for name, p in shared.named_parameters():
                    p.copy_(means[name])
            elif config.init == 'scale':
                c = config.scale_factor
                for name in input_linears(shared):
                    layer = getattr(shared, name)
                    layer.weight.mul_(c)
                    if layer.bias is not None:
                        layer.bias.mul_(c)
                shared.fc2.weight.mul_(c)
        for i in group:
            sites[i].mlp = shared
