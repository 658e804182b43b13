"""Pieces of a training run that know about reduced models: the recipe from command-line flags, an EMA that updates
shared tensors once, safe checkpoint reading and a distributed setup with a timeout.

Used by the project's `train.py`; the library itself never imports that script.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .errors import ReduceError
from .core.record import get_record
from .persistence.serialization import read_weights, safe_torch_load
from .core.sharing import alias_map, count_unique
from .core.spec import ReduceSpec, parse_recipe

__all__ = [
    'MLP_RATIO_MEANING', 'recipe_from_flags', 'recipe_to_text', 'SharedEma', 'load_training_checkpoint',
    'checkpoint_recipe', 'checkpoint_state', 'read_model_weights', 'DistInfo', 'init_distributed', 'param_report',
    'patch_timm_posterize', 'KeyValueArgs',
]

_logger = logging.getLogger(__name__)

# The seed's overloaded `--reduction-mlp-ratio`: one number whose meaning depends on the strategy.
MLP_RATIO_MEANING: dict[str, tuple[str, Callable[[float], dict[str, Any]]]] = {
    'thin': ('hidden width / embedding width (mlp_ratio)', lambda v: {'mlp_ratio': v}),
    'shallow': ('fraction of hidden units kept (keep)', lambda v: {'keep': v}),
    'grouped': ("init scale of the shared MLP (init='scale', scale)", lambda v: {'init': 'scale', 'scale': v}),
}


def _read_spec_argument(value: str) -> Any:
    """`--reduction-spec`: a path to a JSON file, a JSON object/list, or spec text like `grouped:group_size=2`."""
    text = value.strip()
    if not text.startswith(('{', '[')) and os.path.isfile(text):
        try:
            data = json.loads(Path(text).read_text())
        except json.JSONDecodeError as e:
            raise ReduceError(f'--reduction-spec file {text} is not valid JSON: {e}') from e
        # a save_pretrained config.json documents its recipe in a `timm_reduce` block
        if isinstance(data, Mapping) and 'strategy' not in data and 'recipe' in data.get('timm_reduce', {}):
            data = data['timm_reduce']['recipe']
        return data
    return text


def recipe_from_flags(
        strategy: str | None = None,
        mlp_ratio: float | None = None,
        kwargs: Mapping[str, Any] | None = None,
        spec: str | None = None,
) -> list[ReduceSpec]:
    """The reduction recipe asked for by `--reduction-strategy/-mlp-ratio/-kwargs` or `--reduction-spec`.

    Args:
        strategy: a registered strategy name.
        mlp_ratio: the seed's per-strategy number (see `MLP_RATIO_MEANING`); only for thin, shallow and grouped.
        kwargs: further strategy options (`key=value` from the command line, already parsed).
        spec: a JSON file, a JSON spec/recipe, or spec text; excludes the three flags above.

    Returns:
        The list of steps, empty for no reduction.

    Raises:
        ReduceError: conflicting or incomplete flags, an unknown or unavailable strategy, an invalid option.
    """
    kwargs = dict(kwargs or {})
    if spec is not None:
        if strategy is not None or mlp_ratio is not None or kwargs:
            raise ReduceError('--reduction-spec describes the whole recipe; do not combine it with '
                              '--reduction-strategy, --reduction-mlp-ratio or --reduction-kwargs.')
        recipe = parse_recipe(_read_spec_argument(spec))
        if not recipe:
            raise ReduceError(f'--reduction-spec {spec!r} holds no reduction step.')
        return recipe
    if strategy is None:
        if mlp_ratio is not None or kwargs:
            raise ReduceError('--reduction-mlp-ratio and --reduction-kwargs need --reduction-strategy.')
        return []
    from .core.registry import get_strategy, list_strategies

    if strategy not in list_strategies():
        raise ReduceError(f'Reduction strategy {strategy!r} is not available in this installation; '
                          f'available: {", ".join(list_strategies())}.')
    options: dict[str, Any] = {}
    if mlp_ratio is not None:
        if strategy not in MLP_RATIO_MEANING:
            meanings = '; '.join(f'{k}: {v[0]}' for k, v in MLP_RATIO_MEANING.items())
            raise ReduceError(f'--reduction-mlp-ratio has no meaning for strategy {strategy!r} (it means {meanings}). '
                              f'Pass its options with --reduction-kwargs key=value; allowed keys: '
                              f'{", ".join(get_strategy(strategy).option_names)}.')
        options.update(MLP_RATIO_MEANING[strategy][1](mlp_ratio))
    clash = sorted(k for k in kwargs if k in options)
    if clash:
        raise ReduceError(f'--reduction-kwargs {", ".join(clash)} repeats what --reduction-mlp-ratio sets '
                          f'for {strategy!r}; give it once.')
    options.update(kwargs)
    return [ReduceSpec(strategy, options)]


def recipe_to_text(recipe: Iterable[ReduceSpec]) -> str:
    return ' -> '.join(str(s) for s in recipe) or '(none)'


class SharedEma(ModelEmaV3):
    """`ModelEmaV3` whose update touches every tensor once, also when the model shares it between modules.

    `ModelEmaV3` walks `state_dict()`, which lists a shared tensor under each of its names, so a tensor shared by
    two blocks would be lerped twice per step (decay d acting as d²). Here aliases are dropped first.
    """

    def _pairs(self, model: nn.Module, params_only: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_state, model_state = self.module.state_dict(), model.state_dict()
        if params_only:
            names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
            ema_state = {k: v for k, v in ema_state.items() if k in names}
            model_state = {k: v for k, v in model_state.items() if k in names}
        if ema_state.keys() != model_state.keys():
            raise RuntimeError('EMA and model state_dict keys differ; create the EMA after the reduction.')
        aliases = alias_map(model_state)
        if aliases != alias_map(ema_state):
            raise RuntimeError('EMA and model share tensors differently; create the EMA after the reduction.')
        keys = [k for k in model_state if k not in aliases]
        return [ema_state[k] for k in keys], [model_state[k] for k in keys]

    def _update(self, ema_values: list[torch.Tensor], model_values: list[torch.Tensor], decay: float) -> None:
        lerp_ema, lerp_model = [], []
        for ema_v, model_v in zip(ema_values, model_values):
            model_v = model_v.detach()
            if self.device is not None:
                model_v = model_v.to(device=self.device)
            if ema_v.is_floating_point():
                lerp_ema.append(ema_v)
                lerp_model.append(model_v)
            else:
                ema_v.copy_(model_v)
        if not lerp_ema:
            return
        if self.foreach:
            self._foreach_lerp_(lerp_ema, lerp_model, weight=1. - decay)
        else:
            for ema_v, model_v in zip(lerp_ema, lerp_model):
                self._lerp_(ema_v, model_v, weight=1. - decay)

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        self._update(*self._pairs(model, params_only=False), decay)

    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        self._update(*self._pairs(model, params_only=True), decay)
        for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(model_b.to(device=ema_b.device))


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a timm training checkpoint (`last.pth.tar`, ...) without executing code.

    Only tensors, plain containers and `argparse.Namespace` (timm stores the run's args) are unpickled.

    Raises:
        ReduceError: the file is missing or not a readable checkpoint.
    """
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise ReduceError(f'Checkpoint {path} is not a dict of training state.')
    return checkpoint


def checkpoint_recipe(checkpoint: Mapping[str, Any]) -> list[ReduceSpec] | None:
    """The reduction recipe recorded by `train.py` in a checkpoint's args; None if it recorded none (not ours)."""
    args = checkpoint.get('args')
    recipe = getattr(args, 'reduction_recipe', None) if args is not None else None
    return None if recipe is None else parse_recipe(recipe)


def checkpoint_state(checkpoint: Mapping[str, Any], ema: bool = False) -> dict[str, torch.Tensor]:
    """The model (or EMA) state_dict of a training checkpoint, without DDP's `module.` prefixes."""
    key = 'state_dict_ema' if ema else 'state_dict'
    state = checkpoint.get(key)
    if not isinstance(state, dict):
        raise ReduceError(f'The checkpoint holds no {key!r}.')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return dict(state)


def read_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[ReduceSpec] | None]:
    """Weights for `--initial-checkpoint`: a training checkpoint, a safetensors file, or a save_pretrained folder.

    Returns the state_dict and the recipe the file records (None if it records none).
    """
    path = Path(path)
    if path.is_dir() or path.suffix == '.safetensors':
        config = (path if path.is_dir() else path.parent) / 'config.json'
        recipe = None
        if config.is_file():
            block = json.loads(config.read_text()).get('timm_reduce', {})
            recipe = parse_recipe(block['recipe']) if 'recipe' in block else None
        return read_weights(path), recipe
    checkpoint = load_training_checkpoint(path)
    if 'state_dict' not in checkpoint:  # a bare state_dict saved with torch.save
        return read_weights(path), None
    return checkpoint_state(checkpoint), checkpoint_recipe(checkpoint)


@dataclass
class DistInfo:
    """Where this process runs: `device`, its `rank` among `world_size` processes, `local_rank` on this host."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None, backend: str | None = None, timeout_s: float = 600.) -> DistInfo:
    """Join the process group torchrun describes in the environment (if any) and pick this process's device.

    Args:
        device: `'cpu'`, `'cuda'` (a GPU per local rank) or None for CUDA when available, else CPU.
        backend: None for nccl on CUDA and gloo on CPU.
        timeout_s: collectives wait at most this long; when a rank dies, the others fail instead of hanging.
    """
    from timm.utils import is_distributed_env, world_info_from_env

    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device_type = device.split(':')[0]
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise ReduceError(f'--device {device}: CUDA is not available on this machine; use --device cpu.')
    if not is_distributed_env():
        return DistInfo(torch.device(device))
    local_rank, _, _ = world_info_from_env()
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(local_rank)
    backend = backend or ('nccl' if device_type == 'cuda' else 'gloo')
    kwargs: dict[str, Any] = {'backend': backend, 'timeout': timedelta(seconds=timeout_s)}
    if device_type == 'cuda':
        kwargs['device_id'] = torch.device(device)
    torch.distributed.init_process_group(**kwargs)
    return DistInfo(torch.device(device), torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size())


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # what Pillow < 13 returned for 0 bits: every bit masked, a black image
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    """Make timm's RandAugment posterize accept 0 bits again.

    With magnitude noise (`rand-m9-mstd0.5-inc1`, the seed's policy) `PosterizeIncreasing` reaches 0 bits, which
    Pillow >= 13 rejects ("bits must be between or equal to 1 and 8"), killing a data loader worker after a few
    hundred images. Call before the loaders are created (AugmentOp looks its function up when built).
    """
    from timm.data import auto_augment

    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        auto_augment.NAME_TO_OP[name] = _posterize


def param_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts for the log: dense model before reduction, as used by the forward pass, stored once."""
    params = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    record = get_record(model)
    return {
        'params_before': record.params_before if record is not None and record.params_before else params,
        'params': params,
        'unique_params': count_unique(model),
    }


class KeyValueArgs(argparse.Action):
    """`--flag a=1 b=x` -> `{'a': 1, 'b': 'x'}` (values as Python literals where they are, else text, like timm's
    ParseKwargs), with a usage error naming the item when one is not `key=value`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        out = {}
        for item in values or []:
            key, sep, text = item.partition('=')
            if not sep or not key.strip():
                raise argparse.ArgumentError(self, f'expected KEY=VALUE items, got {item!r} (e.g. group_size=2).')
            try:
                out[key.strip()] = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                out[key.strip()] = text
        setattr(namespace, self.dest, out)
