"""ShallowMLP: keep a subset of every MLP's hidden units, chosen by importance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from ..errors import ReduceError
from ..core.allocation import allocate, weighted_shares
from ..core.hidden_units import hidden_units, input_linears, select_units, unit_importance
from ..core.registry import register_strategy
from ..core.statistics import MlpStatistics, sensitivities


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
        allocation: how a fractional `keep` is spread over the blocks. `'uniform'`: every block keeps `keep` of its
            units. `'sensitivity'`: the same total of unit weights, kept where they matter most: units of all
            blocks ranked by their share of their block's output energy (importance², normalised per block) times
            the block's measured sensitivity (`collect_statistics(..., sensitivity=True)`; `compress()` measures
            it), each block keeping between half and twice its uniform width. Needs those statistics; the widths
            it picks are written into `keep` of the recorded spec. `reduce()` defaults to `'uniform'`,
            `compress()` to `'sensitivity'` (its `recipe='default'`; `'paper'`: uniform; with `importance='first'`
            it stays uniform).
    """

    keep: float | list[int] = 0.5
    importance: Literal['magnitude', 'first'] = 'magnitude'
    allocation: Literal['uniform', 'sensitivity'] = 'uniform'

    # option defaults per `compress(recipe=...)`; compress() allocates by sensitivity (measured: +0.6-0.8 pt at 5%,
    # +0.15-0.6 at 10%, docs/evidence.md §9); reduce() without data stays uniform
    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        'default': {'allocation': 'sensitivity'},
        'paper': {'allocation': 'uniform'},
    }

    def __post_init__(self) -> None:
        if isinstance(self.keep, list):
            bad = [w for w in self.keep if w < 1]
            if not self.keep or bad:
                raise ReduceError(f'shallow: per-block keep widths must be a non-empty list of integers >= 1, '
                                  f'got {self.keep}.')
        elif not 0 < self.keep <= 1:
            raise ReduceError(f'shallow: keep must be a fraction in (0, 1] or a list of per-block widths, '
                              f'got {self.keep}.')
        if self.allocation == 'sensitivity' and self.importance == 'first':
            raise ReduceError("shallow: allocation='sensitivity' ranks units by importance; it needs "
                              "importance='magnitude', not 'first'.")

    @property
    def needs_sensitivity(self) -> bool:
        """Whether `apply` will allocate by measured sensitivity (a fractional `keep`)."""
        return self.allocation == 'sensitivity' and not isinstance(self.keep, list)


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


def _unit_cost(mlp: nn.Module) -> int:
    """Weights one hidden unit holds: its fc1 row(s) and its fc2 column."""
    rows = sum(getattr(mlp, n).weight.shape[1] * getattr(mlp, n).weight.shape[0] // hidden_units(mlp)
               for n in input_linears(mlp))
    return rows + mlp.fc2.out_features


def _sensitivity_widths(sites: list, uniform: list[int], importances: list[torch.Tensor],
                        statistics: Mapping[str, MlpStatistics] | None) -> list[int]:
    """Units per block for `allocation='sensitivity'`, within the uniform widths' total of unit weights."""
    sensitivity = sensitivities(statistics, [s.path for s in sites], 'shallow', 'keep=[...] per block')
    costs = [_unit_cost(s.mlp) for s in sites]
    gains = [weighted_shares(score.double().pow(2), sensitivity[s.path]) for s, score in zip(sites, importances)]
    budget = sum(k * c for k, c in zip(uniform, costs))
    return allocate(costs, gains, budget, uniform, [hidden_units(s.mlp) for s in sites])


@register_strategy('shallow', ShallowConfig, uses_statistics=True,
                   description='keep the most important hidden units of every MLP')
def apply_shallow(model: nn.Module, sites: list, config: ShallowConfig,
                  statistics: Mapping[str, MlpStatistics] | None = None) -> dict[str, Any] | None:
    """Cut every MLP to its kept units, in place; kept units stay in their original order. Returns
    `{'keep': [...]}` when `allocation='sensitivity'` chose the widths (for the recorded spec)."""
    widths = kept_units(config, sites)
    scores = None
    if config.importance == 'magnitude':
        scores = [unit_importance(s.mlp, statistics[s.path].hidden_energy if statistics is not None else None)
                  for s in sites]
    chosen = None
    if config.allocation == 'sensitivity' and not isinstance(config.keep, list):
        widths = chosen = _sensitivity_widths(sites, widths, scores, statistics)
    for i, (site, k) in enumerate(zip(sites, widths)):
        index = torch.arange(k) if scores is None else torch.topk(scores[i], k).indices.sort().values
        select_units(site.mlp, index)
    return {'keep': chosen} if chosen is not None else None
