"""The registered timm model `timm_reduce`: a base timm model name plus a reduce recipe.

    timm.create_model('timm_reduce', base='vit_small_patch16_224', reduce='grouped:group_size=2')
    timm.create_model('local-dir:out/', pretrained=True)   # config.json written by save_pretrained

`pretrained=True` with a default config means "dense base weights, then reduce"; when the config comes from a
`local-dir:` / `hf-hub:` folder it means "the reduced weights stored there".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.models import register_model
from torch import nn

from ..core.api import mlp_unique_params
from ..errors import ReduceError
from ..core.record import ReductionRecord, set_record
from ..core.registry import get_strategy
from .serialization import WEIGHTS_NAME, load_reduced_state, read_weights
from ..core.spec import ReduceSpec, parse_recipe

__all__ = ['build_reduced', 'timm_reduce']

_logger = logging.getLogger(__name__)
_REDUCED_SOURCES = ('local-dir', 'hf-hub')


def _dense_counts(base: str, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(params, MLP params) of the dense base, counted on the meta device (no memory, no init cost)."""
    import timm

    with torch.device('meta'):
        dense = timm.create_model(base, pretrained=False, **kwargs)
    return sum(p.numel() for _, p in dense.named_parameters(remove_duplicate=False)), mlp_unique_params(dense)


def build_reduced(
        base: str,
        recipe: list[ReduceSpec],
        *,
        pretrained: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """Create timm model `base` (with `kwargs`) and apply `recipe` to it.

    A first step that timm can build natively (`thin` -> `mlp_ratio`) is passed to timm at creation when the base
    is not loading pretrained dense weights.
    """
    import timm

    from ..core.api import reduce

    base_kwargs = dict(kwargs)
    create_kwargs = dict(kwargs)
    steps = list(recipe)
    if steps and not pretrained:
        native = get_strategy(steps[0].strategy).creation_kwargs
        if native is not None:
            extra = native(steps[0].config)
            clash = {k: (create_kwargs[k], v) for k, v in extra.items() if k in create_kwargs and create_kwargs[k] != v}
            if clash:
                raise ReduceError(f'Arguments {clash} conflict with reduce step {steps[0]}.')
            create_kwargs.update(extra)
            for k in extra:
                base_kwargs.pop(k, None)
            steps.pop(0)
    model = timm.create_model(base, pretrained=pretrained, **create_kwargs)
    params_before, mlp_before = _dense_counts(base, base_kwargs)
    # steps built natively by timm are recorded as applied; reduce() appends the others
    applied = list(recipe[:len(recipe) - len(steps)])
    set_record(model, ReductionRecord(base, base_kwargs, applied, params_before, mlp_before))
    for step in steps:
        reduce(model, step)
    return model


def _read_stored_weights(pretrained_cfg: dict[str, Any], cache_dir: Any) -> tuple[dict, str]:
    source = pretrained_cfg['source']
    if source == 'local-dir':
        folder = Path(pretrained_cfg['file'])
        return read_weights(folder / WEIGHTS_NAME), str(folder)
    from timm.models import load_state_dict_from_hf

    repo = pretrained_cfg['hf_hub_id']
    return load_state_dict_from_hf(repo, filename=WEIGHTS_NAME, cache_dir=cache_dir), f'hf-hub:{repo}'


@register_model
def timm_reduce(
        pretrained: bool = False,
        base: str | None = None,
        reduce: Any = None,
        pretrained_cfg: dict[str, Any] | None = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        cache_dir: Any = None,
        **kwargs: Any,
) -> nn.Module:
    """A timm model `base` reduced by the recipe `reduce` (spec text, spec dict, or a list of them).

    Other kwargs (`num_classes`, `img_size`, ...) go to the base model.
    """
    kwargs.pop('pretrained_model_args', None)
    if not isinstance(base, str) or not base:
        raise ReduceError("timm_reduce needs base='<timm model name>' (and reduce='<strategy:options>'); "
                          f'got base={base!r}. A saved folder whose config.json lacks it is not a timm_reduce model.')
    if reduce is None:
        raise ReduceError(f"timm_reduce(base={base!r}) needs reduce='<strategy:options>' (a spec or a list of specs).")
    try:
        recipe = parse_recipe(reduce)
    except ReduceError as e:
        raise ReduceError(f'Invalid reduce recipe {reduce!r} for base {base!r}: {e}') from e
    stored = isinstance(pretrained_cfg, dict) and pretrained_cfg.get('source') in _REDUCED_SOURCES
    model = build_reduced(base, recipe, pretrained=pretrained and not stored,
                          pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)
    if stored:
        cfg = {k: v for k, v in pretrained_cfg.items() if k not in ('source', 'file', 'hf_hub_id', 'architecture')}
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **cfg, 'architecture': base}
        if pretrained:
            state, where = _read_stored_weights(pretrained_cfg, cache_dir)
            load_reduced_state(model, state, where)
    return model
