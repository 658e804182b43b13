"""FiPS: Fine-grained Parameter Sharing. One shared SVD basis per group of MLPs + sparse per-layer factors.

The algorithm lives in `timm_reduce.fips` (decompose -> layers -> sparsity); this file holds the options and the
`apply` that wires it into a model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from ...core.discovery import MlpSite, resolve_groups
from ...errors import ReduceError
from .decompose import SliceData, decompose_group, group_gram, rank_for_budget, spectrum
from .layers import FipsBasis, FipsLinear
from .sparsity import fips_layers, make_hooks, prune
from ...core.allocation import allocate, weighted_shares
from ...core.hidden_units import input_linears
from ...core.registry import register_strategy
from ...core.statistics import MlpStatistics, sensitivities

__all__ = ['FipsConfig', 'apply_fips', 'group_slices']

_logger = logging.getLogger(__name__)

_DEFAULT_SPARSITY = 0.75


@dataclass
class FipsConfig:
    """Options of `fips`.

    Attributes:
        budget: fraction of the original MLP weight parameters stored (dense bases + the factors' non-zeros at the
            final sparsity), in (0, 1]. Biases stay dense, outside the budget.
        sparsity: final sparsity of the factors, in [0, 1); default 0.75 (0 with `sparsifier='dense'`).
        group_size: consecutive blocks sharing one basis (default 4); groups never span two stages (Swin).
        groups: explicit groups of block indices instead of `group_size`, e.g. `[[0, 1, 2, 3], [4, 5]]`.
        growth: how the basis grows past d components when the budget asks for rank r > d: `'hybrid'` (zero basis
            columns + top factor rows / beta), `'random'` (zero basis columns + random rows of std(V) / beta) or
            `'split'` (neuron splitting: a direction and its factor row split into equal copies).
        beta: divisor of the grown factor rows (hybrid and random growth).
        scaling_vectors: per-hidden-unit scales (paper §5): every unit (fc1 row, fc2 column) is normalised before
            the SVD and its norm becomes a trainable scale (one vector per layer, dense, counted like the biases
            outside the budget). The paper found them useful with local pruning only.
        sparsifier: `'gmp'` (cubic schedule from s0 to `sparsity` during calibration), `'rigl'` (constant
            sparsity, drop/regrow), `'static'` (pruned once) or `'dense'` (no masks, sparsity 0).
        pruning: `'global'` (one magnitude threshold over all factors of the model) or `'local'` (same sparsity in
            every factor).
        s0: GMP start sparsity (capped at `sparsity`): `reduce()` prunes to it, calibration raises it to `sparsity`.
        delta_t: steps between GMP pruning / RigL exchange updates (>= 1). None (default): derived from the run,
            `max(1, floor(S / 20))` with S = t_end - t0 steps for GMP and t_end steps for RigL (T = total steps,
            t0 = floor(t0 * T), t_end = min(floor(t_end * T), T - 1)): GMP prunes >= 20 times before t_end (every
            step when S < 20), RigL exchanges >= 19 times (none at step 0). The paper's fixed 50 (`recipe='paper'`)
            pruned in one jump at the end of a 60-step run.
        t0: fraction of the calibration steps at which GMP starts raising sparsity.
        t_end: fraction of the calibration steps at which GMP reaches `sparsity` and RigL stops exchanging.
        drop_fraction: RigL's initial exchange fraction q (decays as (q/2)(1 + cos(pi t / t_end))). Default 0.1:
            with exchanges every 5 steps it beat the paper's 0.3 by ~0.4 pt (MNIST ViT, 10% budget, issue 13).
        storage_dtype: dtype of the factors' non-zero values in the saved file (`'bfloat16'` halves them, lossy).
        seed: seed of the random growth.
        allocation: how the budget is spread over the groups. `'uniform'`: every group stores `budget` of its own
            weights. `'sensitivity'`: the same total, spent rank by rank where it loses least: each group's
            spectrum (its Gram matrix's eigenvalues, data-aware with activation statistics) as the share of its
            weights' energy a rank keeps, times the group's measured sensitivity (the summed `sensitivity` of its
            MLPs, `collect_statistics(..., sensitivity=True)`; `compress()` measures it), each group's rank kept
            between half and twice its uniform rank (never past d unless the uniform rank is). Needs those statistics;
            the ranks it picks are written into `ranks` of the recorded spec, so a saved model rebuilds without
            them. `reduce()` defaults to `'uniform'`, `compress()` to `'sensitivity'` (its `recipe='default'`;
            `'paper'`: uniform).
        ranks: explicit basis rank per group (in group order), instead of deriving them from `budget`.
    """

    budget: float = 0.25
    sparsity: float | None = None
    group_size: int | None = None
    groups: list[list[int]] | None = None
    growth: Literal['hybrid', 'random', 'split'] = 'hybrid'
    beta: float = 32.0
    scaling_vectors: bool = False
    sparsifier: Literal['gmp', 'rigl', 'static', 'dense'] = 'gmp'
    pruning: Literal['global', 'local'] = 'global'
    s0: float = 0.25
    delta_t: int | None = None
    t0: float = 0.0
    t_end: float = 0.75
    drop_fraction: float = 0.1
    storage_dtype: Literal['float32', 'bfloat16'] = 'float32'
    seed: int = 0
    allocation: Literal['uniform', 'sensitivity'] = 'uniform'
    ranks: list[int] | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ReduceError(f'fips: {msg}')

        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and 0 < self.budget <= 1):
            bad(f'budget must be a fraction in (0, 1] of the MLP weights to store, got {self.budget}.')
        if self.sparsity is not None and not (math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            bad(f'sparsity must be in [0, 1), got {self.sparsity}.')
        if self.sparsifier == 'dense' and self.sparsity not in (None, 0, 0.0):
            bad(f"sparsifier='dense' keeps every factor entry; sparsity must be 0 (or unset), got {self.sparsity}.")
        if self.groups is not None and self.group_size is not None:
            bad('give either group_size or groups, not both.')
        if self.group_size is not None and self.group_size < 1:
            bad(f'group_size must be an integer >= 1, got {self.group_size}.')
        if not (math.isfinite(self.beta) and self.beta > 0):
            bad(f'beta must be > 0, got {self.beta}.')
        if not 0 <= self.s0 < 1:
            bad(f's0 (GMP start sparsity) must be in [0, 1), got {self.s0}.')
        if self.delta_t is not None and not (isinstance(self.delta_t, int) and not isinstance(self.delta_t, bool)
                                             and self.delta_t >= 1):
            bad(f'delta_t must be an integer >= 1, or None (derived from the number of steps), got {self.delta_t}.')
        if not 0 <= self.t0 <= self.t_end <= 1:
            bad(f't0 and t_end are fractions of the calibration steps with 0 <= t0 <= t_end <= 1, '
                f'got t0={self.t0}, t_end={self.t_end}.')
        if not 0 <= self.drop_fraction < 1:
            bad(f'drop_fraction must be in [0, 1), got {self.drop_fraction}.')
        if self.ranks is not None and (not self.ranks or any(r < 1 for r in self.ranks)):
            bad(f'ranks must be a non-empty list of integers >= 1 (one per group), got {self.ranks}.')

    # option defaults per `compress(recipe=...)` (see timm_reduce.calibration.config.RECIPES); given options win
    # compress() allocates by sensitivity (measured: +0.4-0.6 pt at 5%, neutral at 10-25%, docs/evidence.md §9);
    # reduce() without data stays uniform
    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        'default': {'allocation': 'sensitivity'},
        'paper': {'sparsifier': 'gmp', 'pruning': 'global', 's0': 0.25, 'delta_t': 50, 't0': 0.0, 't_end': 0.75,
                  'drop_fraction': 0.3, 'growth': 'hybrid', 'beta': 32.0, 'scaling_vectors': False,
                  'allocation': 'uniform'},
    }

    @property
    def target_sparsity(self) -> float:
        """The final sparsity of the factors."""
        if self.sparsifier == 'dense':
            return 0.0
        return _DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    @property
    def start_sparsity(self) -> float:
        """The sparsity `reduce()` prunes to: s0 for GMP (capped at the target), the target otherwise."""
        return min(self.s0, self.target_sparsity) if self.sparsifier == 'gmp' else self.target_sparsity

    @property
    def needs_sensitivity(self) -> bool:
        """Whether `apply` will allocate by measured sensitivity (no explicit `ranks`)."""
        return self.allocation == 'sensitivity' and self.ranks is None

    @property
    def dtype_for_storage(self) -> torch.dtype:
        return torch.bfloat16 if self.storage_dtype == 'bfloat16' else torch.float32


def group_slices(mlp: nn.Module) -> list[tuple[str, bool]]:
    """(linear name, transposed) for every weight of an MLP in the order it is concatenated: input linears
    (transposed: d x width) then fc2 (as stored: d x hidden)."""
    return [(name, True) for name in input_linears(mlp)] + [('fc2', False)]


def _check_mlp(site: MlpSite) -> None:
    mlp = site.mlp
    for name, _ in group_slices(mlp):
        layer = getattr(mlp, name)
        if isinstance(layer, FipsLinear):
            raise ReduceError(f'fips: block {site.path} is already reduced with fips.')
        if not isinstance(layer, nn.Linear):
            raise ReduceError(f'fips: {site.path}.mlp.{name} is a {type(layer).__name__}, not an nn.Linear; fips '
                              f'decomposes plain linear MLPs (apply it before other reductions).')
    if mlp.fc2.out_features != getattr(mlp, input_linears(mlp)[0]).in_features:
        raise ReduceError(f'fips: {site.path}.mlp maps {getattr(mlp, input_linears(mlp)[0]).in_features} -> '
                          f'{mlp.fc2.out_features} features; a shared basis needs the same dimension in and out.')


def _sensitivity_ranks(plans: list, config: FipsConfig, statistics: Mapping[str, MlpStatistics] | None,
                       grams: list[torch.Tensor]) -> list[int]:
    """Ranks per group for `allocation='sensitivity'`, with the same total stored budget as the uniform ranks."""
    sensitivity = sensitivities(statistics, [s.path for members, *_ in plans for s in members], 'fips',
                                'ranks=[...] per group')
    keep = 1.0 - config.target_sparsity
    costs, gains, budget, cap = [], [], 0.0, []
    for (members, slices, owners, rank), gram in zip(plans, grams):
        dim, total = slices[0].shape[0], sum(s.shape[1] for s in slices)
        costs.append(dim + keep * total)
        budget += config.budget * dim * total
        cap.append(max(dim, rank))  # components past d only grow the basis: not unless the uniform rank does
        gains.append(weighted_shares(spectrum(gram), sum(sensitivity[s.path] for s in members)))
    return allocate(costs, gains, budget, [rank for *_, rank in plans], cap)


def _slice_data(stats: MlpStatistics, transposed: bool) -> SliceData:
    if transposed:  # an input linear: its d side reads the MLP input
        return SliceData(input_moment=stats.input_moment)
    return SliceData(hidden_energy=stats.hidden_energy, output_moment=stats.output_moment)


@register_strategy('fips', FipsConfig, calibration_hooks=make_hooks, uses_statistics=True,
                   description='shared SVD basis per group of MLPs + sparse per-layer factors (calibrate to recover)')
def apply_fips(model: nn.Module, sites: list[MlpSite], config: FipsConfig,
               statistics: Mapping[str, MlpStatistics] | None = None) -> dict[str, Any] | None:
    """Replace every MLP linear by a FipsLinear over its group's shared basis, then prune to the start sparsity.

    With `statistics` the basis and factors are data-aware (`decompose_group`'s `data`) where they hold moments;
    else from the weights. Returns `{'ranks': [...]}` when `allocation='sensitivity'` chose the ranks (for the
    recorded spec)."""
    if len({id(s.mlp) for s in sites}) != len(sites):
        raise ReduceError('fips: some blocks share one MLP module (e.g. after `grouped`); fips needs one MLP per '
                          'block. Apply fips to the unshared model.')
    for site in sites:
        _check_mlp(site)
    group_size = config.group_size if config.group_size is not None else (None if config.groups else 4)
    groups = resolve_groups(sites, group_size, config.groups, within_stage=True)
    generator = torch.Generator().manual_seed(config.seed)
    plans = []  # validate every group (shapes, rank) before changing the model: a failure leaves it untouched
    for group in groups:
        members = [sites[i] for i in group]
        slices, owners = [], []
        for site in members:
            for name, transposed in group_slices(site.mlp):
                weight = getattr(site.mlp, name).weight.detach()
                slices.append(weight.T if transposed else weight)
                owners.append((site, name, transposed))
        dims = {s.shape[0] for s in slices}
        if len(dims) != 1:
            raise ReduceError(f'fips: blocks {", ".join(s.path for s in members)} have different model dimensions '
                              f'{sorted(dims)} and cannot share a basis; put them in different groups.')
        rank = rank_for_budget(slices[0].shape[0], [s.shape[1] for s in slices], config.budget,
                               config.target_sparsity)
        plans.append((members, slices, owners, rank))
    data = [None if statistics is None else [_slice_data(statistics[site.path], t) for site, _, t in owners]
            for _, _, owners, _ in plans]
    names = [[f'{site.path}.mlp.{name}.weight' for site, name, _ in owners] for _, _, owners, _ in plans]
    chosen, uniform, grams = None, [rank for *_, rank in plans], [None] * len(plans)
    if config.ranks is not None:
        if len(config.ranks) != len(plans):
            raise ReduceError(f'fips: ranks lists {len(config.ranks)} ranks but the model has {len(plans)} groups '
                              f'({"; ".join(", ".join(s.path for s in m) for m, *_ in plans)}).')
        ranks = list(config.ranks)
    elif config.allocation == 'sensitivity':
        if plans[0][1][0].device.type == 'meta':
            raise ReduceError("fips: allocation='sensitivity' cannot be measured on the meta device; give ranks.")
        grams = [group_gram(plan[1], config.scaling_vectors, n, d) for plan, n, d in zip(plans, names, data)]
        ranks = chosen = _sensitivity_ranks(plans, config, statistics, grams)
    else:
        ranks = uniform
    plans = [(members, slices, owners, r) for (members, slices, owners, _), r in zip(plans, ranks)]
    decomposed = []  # decompose every group (NaN checks included) before installing any
    for (members, slices, owners, rank), group_names, group_data, gram in zip(plans, names, data, grams):
        decomposed.append(decompose_group(slices, rank, config.growth, config.beta, generator,
                                          config.scaling_vectors, group_names, group_data, gram))
    for (members, slices, owners, rank), parts in zip(plans, decomposed):
        basis = FipsBasis(parts.basis, [s.path for s in members])
        basis.weight.requires_grad_(any(getattr(s.mlp, n).weight.requires_grad for s, n, _ in owners))
        scales = parts.scales or [None] * len(parts.factors)
        for (site, name, transposed), factor, scale in zip(owners, parts.factors, scales):
            old = getattr(site.mlp, name)
            bias = old.bias.detach().clone() if old.bias is not None else None
            layer = FipsLinear(basis, factor, bias, transposed, config.dtype_for_storage, scale)
            layer.factor.requires_grad_(old.weight.requires_grad)
            if scale is not None:
                layer.scale.requires_grad_(old.weight.requires_grad)
            if bias is not None:
                layer.bias.requires_grad_(old.bias.requires_grad)
            layer.train(old.training)
            setattr(site.mlp, name, layer)
        _logger.info(f'fips: group {", ".join(s.path for s in members)}: d={parts.basis.shape[0]}, rank {rank}')
    layers = list(fips_layers(model).values())
    if config.start_sparsity > 0 and all(m.factor.device.type != 'meta' for m in layers):
        prune(layers, config.start_sparsity, config.pruning)
    if config.start_sparsity < config.target_sparsity:
        _logger.info(f'fips: factors pruned to the GMP start sparsity {config.start_sparsity:.0%}; calibration '
                     f'raises it to {config.target_sparsity:.0%} (only then is the budget {config.budget:.0%} met). '
                     f"Use sparsifier='static' for the final sparsity without calibration.")
    if chosen is not None:
        _logger.info(f'fips: ranks by sensitivity {chosen} (uniform: {uniform})')
        return {'ranks': chosen}
    return None
