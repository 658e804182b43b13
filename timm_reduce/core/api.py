"""reduce() and materialize(): the two structural verbs of timm_reduce."""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

from torch import nn

from .discovery import find_mlp_sites
from .finite import non_finite
from ..errors import ReduceError
from .record import ReductionRecord, base_name, get_record, set_record
from .registry import get_strategy
from .sharing import count_unique, tensor_identity
from .protocol import Materializes
from .spec import ReduceSpec
from .statistics import MlpStatistics

__all__ = ['reduce', 'materialize', 'as_spec', 'mlp_unique_params', 'check_finite_mlps']

_logger = logging.getLogger(__name__)


def as_spec(strategy: str | ReduceSpec, options: dict[str, Any] | None = None) -> ReduceSpec:
    """A ReduceSpec from a strategy name + options, a spec text (`'grouped:group_size=2'`) or a ReduceSpec."""
    options = dict(options or {})
    if isinstance(strategy, ReduceSpec):
        if options:
            raise ReduceError('Pass options either inside the ReduceSpec or as keyword arguments, not both.')
        return strategy
    if not isinstance(strategy, str):
        raise ReduceError(f'strategy must be a name, a spec text or a ReduceSpec, got {type(strategy).__name__}.')
    spec = ReduceSpec.parse(strategy)
    if options:
        spec = ReduceSpec(spec.strategy, {**spec.options, **options})
    return spec


def mlp_unique_params(model: nn.Module) -> int:
    """Parameters of all block MLPs, each shared tensor counted once."""
    seen, total = set(), 0
    for site in find_mlp_sites(model):
        for p in site.mlp.parameters():
            ident = tensor_identity(p)
            if ident not in seen:
                seen.add(ident)
                total += p.numel()
    return total


def check_finite_mlps(model: nn.Module, sites: list | None = None, what: str = 'reduce') -> None:
    """Raise a ReduceError naming the first MLP parameter or floating buffer that holds NaN or infinite values."""
    sites = find_mlp_sites(model) if sites is None else sites
    mlps = {id(t) for site in sites for t in (*site.mlp.parameters(), *site.mlp.buffers())}
    named = ((n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in mlps)
    for name, bad, size in non_finite(named):
        raise ReduceError(f'{what}: {name} contains NaN or infinite values ({bad} of {size}); refusing to '
                          f'reduce a model with non-finite MLP weights. Reload or repair the weights first.')


def reduce(model: nn.Module, strategy: str | ReduceSpec, *, statistics: Mapping[str, MlpStatistics] | None = None,
           **options: Any) -> nn.Module:
    """Apply a reduction strategy to `model` in place and return it.

    Args:
        model: a timm transformer (ViT/DeiT, Swin, EVA, BEiT, ...).
        strategy: a registered name (`list_strategies()`), a spec text `'grouped:group_size=2'` or a ReduceSpec.
        statistics: activation statistics of the model's MLPs (`collect_statistics`, keyed by block path) for a
            data-aware initialisation, used by the strategies that take them (fips, shallow) and ignored by the
            others; `compress(init_from='activations')` passes them. They must cover every block.
        **options: the strategy's options (see its config class, e.g. `GroupedConfig`).

    Raises:
        ReduceError: unknown strategy or option, or an invalid value (the message lists what is allowed); NaN or
            infinite MLP weights (the tensor is named; the model is left unchanged).
        UnsupportedModelError: the model has no MLP blocks timm_reduce understands.
    """
    spec = as_spec(strategy, options)
    strat = get_strategy(spec.strategy)
    config = spec.config
    sites = find_mlp_sites(model)
    if strat.reads_weights:
        check_finite_mlps(model, sites, spec.strategy)
    record = get_record(model)
    if record is None:
        record = ReductionRecord(
            base=base_name(model),
            base_args=dict(getattr(model, '_model_args', {}) or {}),
            params_before=sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)),
            mlp_params_before=mlp_unique_params(model),
        )
    if statistics is not None:
        missing = [s.path for s in sites if s.path not in statistics]
        if missing:
            raise ReduceError(f'reduce: statistics lack block(s) {", ".join(missing[:4])}; collect them on this '
                              f'model with timm_reduce.collect_statistics before reducing it.')
    if strat.uses_statistics:
        resolved = strat.apply(model, sites, config, statistics=statistics)
    else:
        resolved = strat.apply(model, sites, config)
    if resolved:  # options the strategy derived from data (e.g. fips ranks): recorded so the shapes rebuild
        spec = ReduceSpec(spec.strategy, {**spec.options, **resolved})
    record.recipe.append(spec)
    set_record(model, record)
    _logger.info(f'Applied {spec} to {type(model).__name__}: {count_unique(model):,} unique params.')
    return model


def _replace_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition('.')
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def materialize(model: nn.Module) -> nn.Module:
    """A plain timm model with ordinary layers and no shared tensors, giving the same outputs. `model` is unchanged.

    Shared modules and parameters are copied per use; reduced layers that know a dense form (FiPS factors,
    scaled shared weights) are replaced by it via their `materialize()` method.
    """
    dense = copy.deepcopy(model)
    seen_modules: set[int] = set()
    copied: list[str] = []
    for path, module in list(dense.named_modules(remove_duplicate=False)):
        if not path or any(path.startswith(f'{c}.') for c in copied):
            continue  # inside a module that was just copied whole
        if id(module) in seen_modules:
            _replace_child(dense, path, copy.deepcopy(module))
            copied.append(path)
        seen_modules.add(id(module))
    for path, module in list(dense.named_modules()):
        if path and isinstance(module, Materializes):
            _replace_child(dense, path, module.materialize())
    seen_params: set[tuple] = set()
    for module in dense.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            ident = tensor_identity(p)
            if ident in seen_params:
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            seen_params.add(tensor_identity(getattr(module, name)))
    record = get_record(dense)
    if record is not None:
        widths = [site.mlp.fc2.in_features for site in find_mlp_sites(dense)]
        structural = [ReduceSpec('shallow', {'keep': widths, 'importance': 'first'})]
        set_record(dense, ReductionRecord(record.base, dict(record.base_args), structural,
                                          record.params_before, record.mlp_params_before))
    return dense
