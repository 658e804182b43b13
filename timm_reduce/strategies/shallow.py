"""ShallowMLP: keep a subset of every MLP's hidden units, chosen by importance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import nn

from ..errors import ReduceError
from ..core.hidden_units import hidden_units, select_units, unit_importance
from ..core.registry import register_strategy
from ..core.statistics import MlpStatistics


@dataclass
class ShallowConfig:
    """Options of `shallow`.

    Attributes:
        keep: fraction of hidden units kept, in (0, 1] (0.5 = the paper's ShallowMLP); or a list with the number
            of units to keep in each block.
        importance: `'magnitude'` keeps the units with the largest ‖fc1 row‖·‖fc2 column‖ (right for pretrained
            weights); with activation statistics (`compress(init_from='activations')`) the measured RMS of the unit's
            activation replaces ‖fc1 row‖: RMS(h_j)·‖fc2 column j‖, the unit's share of fc2's output.
            `'first'` keeps units 0..k-1 (the seed paper's behaviour, fine from scratch).
    """

    keep: float | list[int] = 0.5
    importance: Literal['magnitude', 'first'] = 'magnitude'

    def __post_init__(self) -> None:
        if isinstance(self.keep, list):
            bad = [w for w in self.keep if w < 1]
            if not self.keep or bad:
                raise ReduceError(f'shallow: per-block keep widths must be a non-empty list of integers >= 1, '
                                  f'got {self.keep}.')
        elif not 0 < self.keep <= 1:
            raise ReduceError(f'shallow: keep must be a fraction in (0, 1] or a list of per-block widths, '
                              f'got {self.keep}.')


def kept_units(config: ShallowConfig, sites: list) -> list[int]:
    """Number of units each block keeps."""
    if isinstance(config.keep, list):
        if len(config.keep) != len(sites):
            raise ReduceError(f'shallow: keep lists {len(config.keep)} widths but the model has {len(sites)} blocks.')
        widths = list(config.keep)
    else:
        widths = [max(1, int(round(config.keep * hidden_units(s.mlp)))) for s in sites]
    for site, k in zip(sites, widths):
        if k > hidden_units(site.mlp):
            raise ReduceError(f'shallow: block {site.path} has {hidden_units(site.mlp)} hidden units, cannot keep {k}.')
    return widths


@register_strategy('shallow', ShallowConfig, uses_statistics=True,
                   description='keep the most important hidden units of every MLP')
def apply_shallow(model: nn.Module, sites: list, config: ShallowConfig,
                  statistics: Mapping[str, MlpStatistics] | None = None) -> None:
    """Cut every MLP to its kept units, in place; kept units stay in their original order."""
    for site, k in zip(sites, kept_units(config, sites)):
        if config.importance == 'first':
            index = torch.arange(k)
        else:
            energy = statistics[site.path].hidden_energy if statistics is not None else None
            index = torch.topk(unit_importance(site.mlp, energy), k).indices.sort().values
        select_units(site.mlp, index)
