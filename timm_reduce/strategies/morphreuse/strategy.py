"""MorphReuse: MLP weights shared by layer shape with per-layer learnable scales, or one shared core MLP.

Two variants:

* `variant='shape'`: within a scope (the whole model, or groups of `group_size` consecutive blocks), every MLP fc1 of
  one (out, in) shape uses one shared (weight, bias), and every fc2 likewise; each layer owns a learnable scale a
  (scalar or per output channel) and computes y = a ⊙ (W x + b). Swin's stages have different widths, so each stage
  width gets its own banks. Materialises to plain `nn.Linear` layers.
* `variant='core'`: every block MLP becomes x -> P_out · core(P_in · x) with per-block bias-free projections
  (d -> core_dim -> d) around one shared residual core z + 2·sigmoid(s)·(W2·GELU(LN(W1 z + b1)) + b2).

Shared modules are owned by the model (registered once, in their first user), never by a process-global cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...core.discovery import resolve_groups
from ...errors import ReduceError
from ...core.hidden_units import input_linears
from .layers import MorphCoreMlp, MorphLinear, SharedCore, SharedLinear
from ...core.registry import register_strategy

__all__ = ['MorphReuseConfig', 'apply_morphreuse', 'lstsq_scale']

_SCALES = ('scalar', 'channel')
_INITS = ('mean', 'first')
_SCALE_INITS = ('lstsq', 'ones')
_TRAIN = {'shape': ('all', 'scales', 'shared'), 'core': ('all', 'adapters', 'core')}
_CORE_DEFAULTS = {'core_dim': 128, 'expand': 2.5, 'alpha_init': -3.0}  # the seed's core
_SHAPE_ONLY = ('scale', 'init', 'scale_init')
_CORE_ONLY = ('core_dim', 'expand', 'alpha_init')


@dataclass
class MorphReuseConfig:
    """Options of `morphreuse`. Options of one variant given with the other are refused.

    Attributes:
        variant: `'shape'` (shared weights per layer shape + per-layer scales) or `'core'` (shared core MLP +
            per-block projections).
        scope: `'all'` (one bank per shape, or one core, for the whole model) or `'group'` (one per group of
            `group_size` consecutive blocks).
        group_size: blocks per group (>= 1); required with `scope='group'`, refused with `scope='all'`.
        within_stage: with `scope='group'`, groups never span two stages (Swin's `layers[i]`); default True.
        train: which MorphReuse parameters train (the others get `requires_grad=False`): `'all'` (default);
            shape variant: `'scales'` or `'shared'`; core variant: `'adapters'` (the projections) or `'core'`.
        scale: shape variant: `'scalar'` (default; one scale per layer) or `'channel'` (one per output channel).
        init: shape variant: the shared (weight, bias) start as the `'mean'` (default) of the layers they replace,
            or as the `'first'` of them (with `scale_init='ones'`: the seed's from-scratch init).
        scale_init: shape variant: `'lstsq'` (default; each layer's scale fits its original [W | b] by least
            squares) or `'ones'`.
        core_dim: core variant: width of the core (default 128).
        expand: core variant: core hidden width = round(core_dim * expand) (default 2.5).
        alpha_init: core variant: initial gate logit s; the residual gain is 2·sigmoid(s) (default -3).
    """

    variant: Literal['shape', 'core'] = 'shape'
    scope: Literal['all', 'group'] = 'all'
    group_size: int | None = None
    within_stage: bool | None = None
    train: str = 'all'
    scale: str | None = None
    init: str | None = None
    scale_init: str | None = None
    core_dim: int | None = None
    expand: float | None = None
    alpha_init: float | None = None

    def __post_init__(self) -> None:
        if self.variant not in _TRAIN:
            raise ReduceError(f"morphreuse: variant must be 'shape' or 'core', got {self.variant!r}.")
        if self.scope not in ('all', 'group'):
            raise ReduceError(f"morphreuse: scope must be 'all' or 'group', got {self.scope!r}.")
        if self.scope == 'group':
            if self.group_size is None:
                raise ReduceError("morphreuse: scope='group' needs group_size=k (an integer >= 1).")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ReduceError(f'morphreuse: group_size must be an integer >= 1, got {self.group_size!r}.')
        else:
            given = [k for k in ('group_size', 'within_stage') if getattr(self, k) is not None]
            if given:
                raise ReduceError(f"morphreuse: {', '.join(given)} only apply with scope='group' (scope is 'all').")
        other = _CORE_ONLY if self.variant == 'shape' else _SHAPE_ONLY
        given = [k for k in other if getattr(self, k) is not None]
        if given:
            allowed = ', '.join(_SHAPE_ONLY if self.variant == 'shape' else _CORE_ONLY)
            raise ReduceError(f"morphreuse: option(s) {', '.join(given)} do not apply to variant={self.variant!r}; "
                              f'its own options are {allowed} (plus variant, scope, group_size, within_stage, train).')
        _choice('train', self.train, _TRAIN[self.variant], f' for variant={self.variant!r}')
        if self.variant == 'shape':
            _choice('scale', self.scale, _SCALES)
            _choice('init', self.init, _INITS)
            _choice('scale_init', self.scale_init, _SCALE_INITS)
        else:
            if self.core_dim is not None and (isinstance(self.core_dim, bool) or not isinstance(self.core_dim, int)
                                              or self.core_dim < 1):
                raise ReduceError(f'morphreuse: core_dim must be an integer >= 1, got {self.core_dim!r}.')
            if self.expand is not None and not (isinstance(self.expand, (int, float)) and self.expand > 0
                                                and round(self.core_width * self.expand) >= 1):
                raise ReduceError(f'morphreuse: expand must be a number > 0 giving a core hidden width >= 1 '
                                  f'(round(core_dim * expand)), got {self.expand!r}.')
            if self.alpha_init is not None and not (isinstance(self.alpha_init, (int, float))
                                                    and math.isfinite(self.alpha_init)):
                raise ReduceError(f'morphreuse: alpha_init must be a finite number, got {self.alpha_init!r}.')

    @property
    def scale_kind(self) -> str:
        return self.scale or 'scalar'

    @property
    def core_width(self) -> int:
        return _CORE_DEFAULTS['core_dim'] if self.core_dim is None else self.core_dim

    @property
    def core_hidden(self) -> int:
        return int(round(self.core_width * (_CORE_DEFAULTS['expand'] if self.expand is None else self.expand)))

    @property
    def core_alpha(self) -> float:
        return _CORE_DEFAULTS['alpha_init'] if self.alpha_init is None else float(self.alpha_init)


def _choice(name: str, value: str | None, allowed: tuple[str, ...], where: str = '') -> None:
    if value is not None and value not in allowed:
        raise ReduceError(f'morphreuse: {name}={value!r} is not allowed{where}; choose one of '
                          f'{", ".join(map(repr, allowed))}.')


def lstsq_scale(target: torch.Tensor, shared: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Least-squares scale a minimising ‖a ⊙ shared − target‖² (closed form, computed in float64).

    Scalar: a = <target, shared> / <shared, shared>. Per row (`per_row`): the same for every row i. A zero
    denominator (an all-zero shared row) gives a = 1.

    Args:
        target: (rows, cols) matrix to approximate.
        shared: (rows, cols) shared matrix.
        per_row: one scale per row instead of one overall.

    Returns:
        A 0-d tensor (scalar) or a (rows,) tensor, in float64.
    """
    t, s = target.double(), shared.double()
    dims = (1,) if per_row else (0, 1)
    num, den = (t * s).sum(dims), (s * s).sum(dims)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b]: the affine map as one matrix (the bias as an extra input column)."""
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def _unique_mlps(sites: list, group: list[int]) -> list[tuple[str, nn.Module]]:
    """(block path, MLP) of a group, each MLP module once (a `grouped` model shares MLP modules)."""
    seen, out = set(), []
    for i in group:
        if id(sites[i].mlp) not in seen:
            seen.add(id(sites[i].mlp))
            out.append((sites[i].path, sites[i].mlp))
    return out


def _check_not_reduced(sites: list) -> None:
    for site in sites:
        mlp = site.mlp
        if isinstance(mlp, MorphCoreMlp) or any(isinstance(m, MorphLinear) for m in mlp.modules()):
            raise ReduceError(f'morphreuse: block {site.path} is already reduced by morphreuse; '
                              f'apply it once, to a model whose MLPs have plain nn.Linear layers.')


@torch.no_grad()
def _share_by_shape(mlps: list[tuple[str, nn.Module]], config: MorphReuseConfig, gid: int) -> list[MorphLinear]:
    """Replace the Linear layers of `mlps` by MorphLinear views of one bank per (role, out, in, bias), in place."""
    buckets: dict[tuple, list[tuple[nn.Module, str, nn.Linear]]] = {}
    for path, mlp in mlps:
        for name in input_linears(mlp) + ['fc2']:
            layer = getattr(mlp, name)
            if type(layer) is not nn.Linear:
                raise ReduceError(f'morphreuse: {path}.mlp.{name} is a {type(layer).__name__}, not an nn.Linear; '
                                  f'the shape variant shares plain Linear layers only.')
            key = (name, layer.out_features, layer.in_features, layer.bias is not None,
                   layer.weight.dtype, layer.weight.device)
            buckets.setdefault(key, []).append((mlp, name, layer))
    created = []
    for (name, out_f, in_f, has_bias, dtype, device), members in buckets.items():
        bank = SharedLinear(in_f, out_f, has_bias, tag=f'g{gid}.{name} {out_f}x{in_f}', device=device, dtype=dtype)
        layers = [layer for _, _, layer in members]
        if config.init == 'first':
            bank.weight.copy_(layers[0].weight)
            if has_bias:
                bank.bias.copy_(layers[0].bias)
        else:  # mean, accumulated in float64 without stacking every layer
            weight = torch.zeros(out_f, in_f, dtype=torch.float64, device=device)
            bias = torch.zeros(out_f, dtype=torch.float64, device=device) if has_bias else None
            for layer in layers:
                weight += layer.weight.double()
                if has_bias:
                    bias += layer.bias.double()
            bank.weight.copy_(weight / len(layers))
            if has_bias:
                bank.bias.copy_(bias / len(layers))
        shared_aug = _augmented(bank.weight, bank.bias)
        for k, (mlp, _, layer) in enumerate(members):
            morph = MorphLinear(bank, config.scale_kind, owner=k == 0)
            if config.scale_init != 'ones':
                scale = lstsq_scale(_augmented(layer.weight, layer.bias), shared_aug, config.scale_kind == 'channel')
                morph.scale.copy_(scale)
            setattr(mlp, name, morph)
            created.append(morph)
    return created


def _attach_core(sites: list, group: list[int], config: MorphReuseConfig) -> list[MorphCoreMlp]:
    """Replace every MLP of the group by projections around one new shared core, in place."""
    first = sites[group[0]].mlp
    ref = first.fc2.weight
    core = SharedCore(config.core_width, config.core_hidden, config.core_alpha, device=ref.device, dtype=ref.dtype)
    replaced: dict[int, MorphCoreMlp] = {}
    for i in group:
        mlp = sites[i].mlp
        if id(mlp) not in replaced:
            in_features = getattr(mlp, input_linears(mlp)[0]).in_features
            replaced[id(mlp)] = MorphCoreMlp(in_features, mlp.fc2.out_features, core, owner=not replaced)
        sites[i].mlp = replaced[id(mlp)]
    return list(replaced.values())


def _set_trainable(modules: list[nn.Module], config: MorphReuseConfig) -> None:
    """Apply `config.train` as requires_grad on the MorphReuse parameters."""
    for module in modules:
        if isinstance(module, MorphLinear):
            own, shared = [module.scale], module.shared_parameters()
            own_on, shared_on = config.train in ('all', 'scales'), config.train in ('all', 'shared')
        else:
            own, shared = [module.fc1.weight, module.fc2.weight], module.shared_parameters()
            own_on, shared_on = config.train in ('all', 'adapters'), config.train in ('all', 'core')
        for p in own:
            p.requires_grad_(own_on)
        for p in shared:
            p.requires_grad_(shared_on)


@register_strategy('morphreuse', MorphReuseConfig,
                   description='MLP weights shared by layer shape with per-layer scales, or one shared core MLP')
def apply_morphreuse(model: nn.Module, sites: list, config: MorphReuseConfig) -> None:
    """Share the MLP weights of every scope (the whole model, or groups of blocks), in place.

    Shape variant: fc1 layers of one shape share one (weight, bias), fc2 layers likewise; the shared pair starts as
    the mean (or first) of the layers it replaces, each layer's scale as its least-squares fit (the scale multiplies
    weight and bias, so it is fitted on [W | b]). Core variant: fresh projections and a fresh core (xavier init).
    """
    _check_not_reduced(sites)
    if config.scope == 'all':
        groups = [[s.index for s in sites]]
    else:
        within = True if config.within_stage is None else config.within_stage
        groups = resolve_groups(sites, config.group_size, None, within)
    modules: list[nn.Module] = []
    for gid, group in enumerate(groups):
        if config.variant == 'shape':
            modules += _share_by_shape(_unique_mlps(sites, group), config, gid)
        else:
            modules += _attach_core(sites, group, config)
    _set_trainable(modules, config)
