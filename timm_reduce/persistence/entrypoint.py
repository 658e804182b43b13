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
from .serialization import WEIGHTS_NAME, load_reduced_state, read_weights, saved_dtype
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
    if create_kwargs == base_kwargs:  # the model is still the dense base: count it instead of building it again
        params_before = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        mlp_before = mlp_unique_params(model)
    else:
        params_before, mlp_before = _dense_counts(base, base_kwargs)
    # steps built natively by timm are recorded as applied; reduce() appends the others
    applied = list(recipe[:len(recipe) - len(steps)])
    set_record(model, ReductionRecord(base, base_kwargs, applied, params_before, mlp_before))
    for step in steps:
        reduce(model, step)
    return model


def _stored_weights_file(pretrained_cfg: dict[str, Any], cache_dir: Any) -> tuple[Path, str]:
    """The folder's own weights file (never a file its config names) and how to name the folder in errors."""
    source = pretrained_cfg['source']
    if source == 'local-dir':
        folder = Path(pretrained_cfg['file'])
        if not (folder / WEIGHTS_NAME).is_file():
            raise ReduceError(f'{folder} holds no {WEIGHTS_NAME}: not a folder written by save_pretrained.')
        return folder / WEIGHTS_NAME, str(folder)
    from timm.models._hub import download_from_hf

    repo = pretrained_cfg['hf_hub_id']
    return Path(download_from_hf(repo, WEIGHTS_NAME, cache_dir=cache_dir)), f'hf-hub:{repo}'


def _config_name(pretrained_cfg: dict[str, Any]) -> str:
    if pretrained_cfg.get('source') == 'local-dir':
        return str(Path(pretrained_cfg.get('file', '')) / 'config.json')
    return f'hf-hub:{pretrained_cfg.get("hf_hub_id")} config.json'


def _check_stored_config(pretrained_cfg: dict[str, Any], source_args: dict[str, Any] | None, base: Any,
                         reduce: Any, kwargs: dict[str, Any]) -> None:
    """Path-like fields and bounds of a config.json this entrypoint rebuilds (`persistence.trust`)."""
    from .trust import check_model_args, check_source_cfg

    where = _config_name(pretrained_cfg)
    check_source_cfg(pretrained_cfg, where, raw=False)  # timm itself set file/source/hf_hub_id
    check_model_args(source_args if source_args is not None else {'base': base, 'reduce': reduce, **kwargs}, where)


def _check_against_header(weights: Path, where: str, base: str, recipe: list[ReduceSpec],
                          kwargs: dict[str, Any]) -> None:
    """Build the reduced model on the meta device (no memory, no init) and compare it with the weights file's
    header: a recipe or size that disagrees with the file is refused before any weight is allocated."""
    import timm

    from .trust import check_header, check_header_outside_mlps, on_meta, read_header

    header = read_header(weights, where)
    try:
        with on_meta():
            dense = timm.create_model(base, pretrained=False, **kwargs)
        check_header_outside_mlps(dense, header, where)  # quick: depth, widths, sizes before any recipe step
        with on_meta():
            skeleton = build_reduced(base, recipe, pretrained=False, **kwargs)
    except ReduceError:
        raise
    except Exception as e:  # an architecture that cannot be built on meta: checked after building, strictly
        _logger.debug(f'{where}: no meta-device build of {base} to check the header against ({e})')
        return
    check_header(skeleton, header, where)


def _check_size(where: str, base: str, kwargs: dict[str, Any]) -> None:
    import timm

    from .trust import check_meta_size, on_meta

    try:
        with on_meta():
            dense = timm.create_model(base, pretrained=False, **kwargs)
    except Exception:  # invalid kwargs or no meta build: the real build reports it
        return
    check_meta_size(dense, where)


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
    source_args = kwargs.pop('pretrained_model_args', None)  # timm passes config.json's model_args here
    dtype = saved_dtype(kwargs.pop('dtype', None), 'timm_reduce dtype')  # save_pretrained's model_args.dtype
    stored = isinstance(pretrained_cfg, dict) and pretrained_cfg.get('source') in _REDUCED_SOURCES
    if stored:
        _check_stored_config(pretrained_cfg, source_args, base, reduce, kwargs)
    if not isinstance(base, str) or not base:
        raise ReduceError("timm_reduce needs base='<timm model name>' (and reduce='<strategy:options>'); "
                          f'got base={base!r}. A saved folder whose config.json lacks it is not a timm_reduce model.')
    if reduce is None:
        raise ReduceError(f"timm_reduce(base={base!r}) needs reduce='<strategy:options>' (a spec or a list of specs).")
    try:
        recipe = parse_recipe(reduce)
    except ReduceError as e:
        raise ReduceError(f'Invalid reduce recipe {reduce!r} for base {base!r}: {e}') from e
    if stored and pretrained:
        weights, where = _stored_weights_file(pretrained_cfg, cache_dir)
        _check_against_header(weights, where, base, recipe,
                              dict(pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs))
    elif stored:  # random weights in the architecture a config describes: at least refuse an absurd size first
        _check_size(_config_name(pretrained_cfg), base, dict(pretrained_cfg_overlay=pretrained_cfg_overlay,
                                                             cache_dir=cache_dir, **kwargs))
    model = build_reduced(base, recipe, pretrained=pretrained and not stored,
                          pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)
    if dtype is not None:
        model.to(dtype)  # before the stored weights are loaded: a round trip is exact in every dtype
    if stored:
        cfg = {k: v for k, v in pretrained_cfg.items() if k not in ('source', 'file', 'hf_hub_id', 'architecture')}
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **cfg, 'architecture': base}
        if pretrained:
            load_reduced_state(model, read_weights(weights), where, deduplicated=True)
    return model
