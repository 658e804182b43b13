"""GroupedMLP: consecutive blocks share one MLP module."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import nn

from ..core.discovery import resolve_groups
from ..errors import ReduceError
from ..core.hidden_units import input_linears
from ..core.registry import register_strategy
from ..core.statistics import MlpStatistics


@dataclass
class GroupedConfig:
    """Options of `grouped`.

    Attributes:
        group_size: blocks per shared MLP (>= 1; 2 = the paper). A shorter last group is allowed.
        init: `'mean'` (default; the group's mean, right for pretrained weights and, for i.i.d. random weights,
            the same variance as the paper's scaling), `'scale'` (the paper's from-scratch init: the first member's
            fc1 weight, fc1 bias and fc2 weight times `scale`, fc2 bias unscaled) or `'first'` (the first member).
            With activation statistics (`compress(init_from='activations')`, the default) `'mean'` weighs each
            layer by its inputs: input linears W = (Σ_b W_b S_b)(Σ_b S_b)⁻¹ with S_b = E[x xᵀ] of block b's MLP
            input, the least-squares fit of every member's pre-activations (the plain mean in directions the inputs
            never take); fc2's column j averaged with weights E[h_j²] of each member's unit j; biases plain means.
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
    def reads_statistics(self) -> bool:
        """Only the mean init weighs the members by their activations."""
        return self.init == 'mean'

    @property
    def scale_factor(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.group_size)


def _weighted_mean(shared: nn.Module, members: list[dict[str, torch.Tensor]], stats: list[MlpStatistics]) -> None:
    """Set the weights of `shared` (holding the plain mean) to the activation-weighted mean of the members' weights
    (`members`: each one's weights by name, float64 copies taken before), in place; see GroupedConfig.init. A layer
    whose statistics are missing or all zero keeps the plain mean."""
    for name in input_linears(shared):
        moments = [s.input_moment for s in stats]
        if any(m is None for m in moments) or float(sum(m.trace() for m in moments)) <= 0:
            continue
        # W = mean + Σ_b (W_b - mean) S_b · S⁺ (S = Σ_b S_b): the least-squares fit where the inputs vary, the
        # plain mean in directions they never take (LayerNorm's output lacks its mean direction), not an arbitrary,
        # possibly huge, value there
        layer = shared.get_submodule(name)
        mean = layer.weight.detach().double().cpu()
        pinv = torch.linalg.pinv(sum(moments), rtol=1e-6, hermitian=True)
        weight = mean + sum((m[f'{name}.weight'] - mean) @ s for m, s in zip(members, moments)) @ pinv
        layer.weight.copy_(weight.to(layer.weight))
    energies = [s.hidden_energy for s in stats]
    if all(e is not None for e in energies):
        e = torch.stack(energies).double()  # (members, hidden)
        totals = e.sum(0)
        w = torch.where(totals > 0, e / totals.clamp_min(1e-300), torch.full_like(e, 1.0 / len(members)))
        columns = torch.stack([m['fc2.weight'] for m in members])  # (members, out, hidden)
        shared.fc2.weight.copy_((columns * w[:, None, :]).sum(0).to(shared.fc2.weight))


@register_strategy('grouped', GroupedConfig, uses_statistics=True,
                   description='one shared MLP per group of consecutive blocks')
def apply_grouped(model: nn.Module, sites: list, config: GroupedConfig,
                  statistics: Mapping[str, MlpStatistics] | None = None) -> None:
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
                weighted = statistics is not None and shared.fc2.weight.device.type != 'meta'
                originals = [{n: p.detach().double().cpu() for n, p in m.named_parameters()} for m in members] \
                    if weighted else []
                means = {name: torch.stack([m.get_parameter(name).detach() for m in members]).mean(0)
                         for name, _ in shared.named_parameters()}
                for name, p in shared.named_parameters():
                    p.copy_(means[name])
                if weighted:
                    _weighted_mean(shared, originals, [statistics[sites[i].path] for i in group])
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
