"""`compress()`: reduce a model and calibrate it against its former self; on any error the model is put back."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..core.api import as_spec, reduce
from ..core.discovery import find_mlp_sites
from ..core.record import get_record, set_record
from ..core.registry import get_strategy
from ..core.spec import ReduceSpec
from ..core.statistics import collect_statistics
from ..errors import ReduceError
from .config import REPORT_ATTR, CalibrationConfig, recipe_defaults
from .data import collect_batches
from .distributed import rank_and_world

from .run import calibrate_collected, check_finite_weights

__all__ = ['compress']

_logger = logging.getLogger(__name__)


def compress(model: nn.Module, strategy: Any, data: Iterable | None = None, **options: Any) -> nn.Module:
    """Reduce `model` in place with `strategy`, then calibrate it block-wise against its former self.

    Example:
        >>> timm_reduce.compress(model, 'fips', data=loader, budget=0.25, sparsity=0.75, group_size=4, epochs=20)

    Args:
        model: a timm transformer with its pretrained weights.
        strategy: a strategy name, spec text or ReduceSpec (see `reduce`).
        data: calibration images: a DataLoader or any iterable of image batches or (images, targets) tuples.
        **options: the strategy's options plus the calibration options of `CalibrationConfig` (`epochs`, `batches`,
            `lr`, `weight_decay`, `warmup_steps`, `min_lr_ratio`, `seed`, `shuffle`, `cache`, `cache_limit_gb`,
            `checkpoint_dir`, `resume`, `stop_after`, `progress`, `callback`, `count_flops`, `evaluate`,
            `eval_batches`, `amp`, `distill_epochs`, `distill_lr`, `distill_temperature`, `distill_ce_weight`,
            `inputs`, `init_from`, `recipe`). An option both take (e.g. fips's `seed`) goes to both. `recipe` fills in
            the calibration options and the strategy's options (its config's `RECIPES`, e.g. FiPS's) that are not
            given.

    Returns:
        The model (the same object). `calibration_report(model)` gives the CalibrationReport.

    Raises:
        ReduceError: no data, an unknown or invalid option (strategy or calibration), malformed batches (wrong
            rank, channels or size, NaN/inf values), non-finite weights, a refused checkpoint, a non-finite loss.
            On any error the model is put back as it was (the MLP modules are those of a copy taken before).
    """
    calib_names = set(CalibrationConfig.option_names())
    if data is None:
        raise ReduceError('compress() needs calibration data: pass data=<a DataLoader or an iterable of image batches '
                          'or (images, targets) tuples>. For a reduction without data use timm_reduce.reduce().')
    name = strategy.strategy if isinstance(strategy, ReduceSpec) else str(strategy).partition(':')[0].strip()
    registered = get_strategy(name)
    shared = calib_names & set(registered.option_names)  # e.g. `seed`: given to both
    calib = {k: v for k, v in options.items() if k in calib_names}
    strategy_options = {k: v for k, v in options.items() if k not in calib_names or k in shared}
    recipe = calib.get('recipe', 'default')
    config = CalibrationConfig(**{**recipe_defaults(recipe), **calib})  # validate before any work
    spec = as_spec(strategy, strategy_options)
    spec = _with_recipe(spec, getattr(registered.config_cls, 'RECIPES', {}).get(recipe, {}))
    check_finite_weights(model, 'compress: the model')
    rank, world = rank_and_world()
    collected = collect_batches(data, config.batches, rank, world, model, digest=config.checkpoint_dir is not None,
                                targets=config.distill_ce_weight > 0)
    teacher = copy.deepcopy(model)
    modes = {n: m.training for n, m in model.named_modules(remove_duplicate=False)}
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    teacher.eval()
    teacher.requires_grad_(False)
    try:
        statistics, spent = None, 0.0
        sensitivity = registered.needs_sensitivity(spec.config)  # e.g. fips allocation='sensitivity'
        if sensitivity or (config.init_from == 'activations' and registered.reads_statistics(spec.config)):
            tic = time.perf_counter()
            statistics = collect_statistics(teacher, _on_device(collected.batches, teacher), sensitivity,
                                            config.seed, batch_name=lambda i: f'calibration batch {i * world + rank}')
            if config.init_from == 'weights':  # only the sensitivities: the initialisation stays weight-only
                statistics = {k: dataclasses.replace(v, input_moment=None, hidden_energy=None, output_moment=None)
                              for k, v in statistics.items()}
            spent = time.perf_counter() - tic
        reduce(model, spec, statistics=statistics)
        report = calibrate_collected(model, teacher, collected, config, 'auto')
        report.init_from = config.init_from if statistics is not None else 'weights'
        report.statistics_time = spent
        recorded = get_record(model).recipe[-1].options
        report.allocated = {k: v for k, v in recorded.items() if k not in spec.options or spec.options[k] != v}
    except BaseException:
        _put_back(model, teacher, modes, flags)
        raise
    del teacher
    model.__dict__[REPORT_ATTR] = report
    return model


def _with_recipe(spec: ReduceSpec, defaults: dict[str, Any]) -> ReduceSpec:
    """`spec` with the strategy's recipe defaults for the options it does not give (options given win). A default
    that does not fit the given options (e.g. shallow's allocation='sensitivity' with importance='first') is left
    out rather than turning valid options into an error."""
    options = dict(spec.options)
    for key, value in defaults.items():
        if key in options:
            continue
        try:
            ReduceSpec(spec.strategy, {**options, key: value})
        except ReduceError:
            _logger.info(f'compress: recipe default {key}={value!r} does not fit the options given; left out.')
            continue
        options[key] = value
    return ReduceSpec(spec.strategy, options)


def _on_device(batches: list[torch.Tensor], model: nn.Module) -> Iterator[torch.Tensor]:
    param = next(model.parameters())
    return (b.to(param.device, param.dtype) for b in batches)


def _put_back(model: nn.Module, original: nn.Module, modes: dict[str, bool], flags: dict[str, bool]) -> None:
    """Make `model` what it was before `reduce()`, from `original` (a deep copy taken before): the blocks get
    `original`'s MLP modules (reduction replaced or changed theirs in place), every other tensor gets `original`'s
    values in place, and the reduction record, train/eval modes and `requires_grad` flags are those of before."""
    for site in find_mlp_sites(original):
        model.get_submodule(site.path).mlp = site.mlp
    model.load_state_dict(original.state_dict())
    set_record(model, get_record(original))
    for name, module in model.named_modules(remove_duplicate=False):
        module.training = modes.get(name, module.training)
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(flags.get(name, p.requires_grad))
