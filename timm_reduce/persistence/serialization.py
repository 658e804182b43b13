"""save_pretrained / loading: config.json + de-duplicated model.safetensors that timm's `local-dir:` and
`hf-hub:` loaders rebuild exactly.

Two formats:
  * plain timm: a model timm can describe by itself (thin, uniform shallow, materialised) is saved with
    `architecture = <base>` and `model_args` such as `mlp_ratio`; stock timm loads it without this plugin.
  * timm_reduce: `architecture = 'timm_reduce'`, `model_args = {base, reduce: [specs], <base kwargs>}`. The
    registered entrypoint rebuilds the reduced structure, then loads these weights strictly.
Shared tensors are stored once; reduced layers store themselves compactly (`persistence.encoding`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn

from ..version import __version__
from ..core.discovery import find_mlp_sites
from ..errors import ReduceError
from ..core.record import ReductionRecord, base_name, get_record
from ..core.sharing import alias_map, count_unique
from .encoding import decode_state, encode_state

__all__ = ['save_pretrained', 'load_reduced_state', 'plain_model_args',
           'read_weights', 'safe_torch_load', 'load_pretrained', 'WEIGHTS_NAME', 'CONFIG_NAME']

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
_DROP_ARGS = ('drop_rate', 'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate',
              'patch_drop_rate', 'drop_block_rate', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')


def load_reduced_state(model: nn.Module, stored: dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Load stored (encoded) weights strictly into a model rebuilt with the same reduction."""
    state = decode_state(model, stored)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ReduceError(
            f'The weights in {source} do not match the architecture rebuilt from its config: '
            f'missing {missing[:5]}{" ..." if len(missing) > 5 else ""}, '
            f'unexpected {unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}.')
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ReduceError(f'The weights in {source} do not fit the rebuilt architecture: {e}') from e


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` that never executes code: tensors, plain containers and `argparse.Namespace` (timm training
    checkpoints store the run's args in one) only.

    Raises:
        ReduceError: the file is missing, broken, or a pickle that needs code to load.
    """
    import argparse

    path = Path(path)
    if not path.is_file():
        raise ReduceError(f'Checkpoint {path} does not exist.')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickles with code objects are refused by weights_only
        raise ReduceError(f'Cannot read checkpoint {path} safely (weights_only=True): {e}') from e


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code: safetensors, or a torch checkpoint with `weights_only=True`.

    timm training checkpoints (`{'state_dict': ..., 'state_dict_ema': ...}`) give their `state_dict`;
    DDP `module.` prefixes are removed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise ReduceError(f'Checkpoint {path} does not exist.')
    if path.suffix == '.safetensors':
        state = safetensors.torch.load_file(str(path), device='cpu')
    else:
        state = safe_torch_load(path)
        if isinstance(state, dict):
            for key in ('state_dict', 'model', 'module'):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReduceError(f'Checkpoint {path} does not hold a state_dict of tensors.')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def load_pretrained(source: str | os.PathLike, **model_kwargs: Any) -> nn.Module:
    """The model `save_pretrained` wrote: a folder, a `local-dir:` path or an `hf-hub:` repo id.

    The same model as `timm.create_model('local-dir:FOLDER', pretrained=True, **model_kwargs)` (shared tensors
    re-tied, sparse factors decoded), with errors that say what is wrong with the folder.

    Raises:
        ReduceError: no such folder, config.json or model.safetensors missing, config.json not JSON, or weights that
            do not fit the architecture the config describes.
    """
    import timm

    text = str(source)
    if text.startswith('hf-hub:'):
        name = text
    else:
        folder = Path(text[len('local-dir:'):] if text.startswith('local-dir:') else text)
        if not folder.is_dir():
            what = 'is a file' if folder.exists() else 'does not exist'
            raise ReduceError(f'{folder} is not a saved model folder: it {what}. Expected a folder written by '
                              'timm_reduce.save_pretrained (config.json + model.safetensors), a local-dir: path or '
                              'an hf-hub: id.')
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
        if missing:
            raise ReduceError(f'{folder} is not a saved model folder: {", ".join(missing)} missing (write one with '
                              'timm_reduce.save_pretrained or `timm-reduce compress`).')
        try:
            json.loads((folder / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReduceError(f'{folder / CONFIG_NAME} is not valid JSON: {e}') from e
        name = f'local-dir:{folder.resolve()}'
    try:
        return timm.create_model(name, pretrained=True, **model_kwargs)
    except ReduceError:
        raise
    except Exception as e:  # timm's own loader: strict load errors, unknown architectures, Hub errors
        raise ReduceError(f'{text} does not load as a timm model: {type(e).__name__}: {e}') from e


def _clean_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in _DROP_ARGS and not k.endswith('_drop_rate')}


def _shape_signature(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plain_model_args(model: nn.Module) -> dict[str, Any] | None:
    """timm kwargs that rebuild `model` exactly with stock timm (e.g. `{'mlp_ratio': 2.0, ...}`), or None.

    Only models without shared tensors or custom layers qualify; the answer is checked by building the
    candidate on the meta device and comparing every tensor shape.
    """
    import timm

    record = get_record(model)
    base = base_name(model)
    if base is None or alias_map(model.state_dict()):
        return None
    args = _clean_args(dict(record.base_args if record else getattr(model, '_model_args', {}) or {}))
    sites = find_mlp_sites(model)
    if any(type(m).__module__.startswith('timm_reduce') for m in model.modules()):
        return None
    if record is not None and record.recipe:
        widths = {s.mlp.fc2.in_features / s.mlp.fc2.out_features for s in sites}
        if len(widths) != 1:
            return None
        args['mlp_ratio'] = widths.pop()
    args.update(_current_traits(model))
    try:
        with torch.device('meta'):
            candidate = timm.create_model(base, pretrained=False, **args)
    except Exception:  # the base does not take these kwargs
        return None
    return args if _shape_signature(candidate) == _shape_signature(model) else None


def _current_traits(model: nn.Module) -> dict[str, Any]:
    from timm.models import get_model_traits

    traits = get_model_traits(model)
    out = {k: traits[k] for k in ('num_classes', 'in_chans') if k in traits}
    if traits.get('img_size') is not None:
        out['img_size'] = list(traits['img_size'])
    return out


def _config(model: nn.Module, architecture: str, model_args: dict[str, Any], extra: dict[str, Any]) -> dict:
    """A config.json in timm's format (timm's own exporter writes the data/pretrained part)."""
    from timm.models._hub import save_config_for_hf

    saved_args = getattr(model, '_model_args', None)
    model._model_args = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_NAME
            save_config_for_hf(model, str(path))
            config = json.loads(path.read_text())
    finally:
        if saved_args is None:
            del model._model_args
        else:
            model._model_args = saved_args
    config['architecture'] = architecture
    config['model_args'] = model_args
    config.update(extra)
    return config


def _atomic_write(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every file to a temporary name first; only when all succeeded, move them into place."""
    directory.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
            os.close(fd)
            temps[name] = Path(tmp)
            write(temps[name])
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
        temps.clear()
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _dense_size(record: ReductionRecord, dtype: torch.dtype) -> dict[str, int]:
    """Unique params and tensor bytes of the dense base before reduction, built on the meta device (no memory)."""
    import timm

    try:
        with torch.device('meta'):
            dense = timm.create_model(record.base, pretrained=False, **_clean_args(record.base_args))
    except Exception as e:  # the card then shows n/a; the weights are unaffected
        _logger.warning(f'Could not rebuild the dense base {record.base!r} to measure it: {e}')
        return {}
    state = dense.state_dict(keep_vars=True)
    tensors = {id(t): t for t in state.values()}.values()
    return {'unique_params_before': sum(p.numel() for p in dense.parameters()),
            'bytes_before': sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                                for t in tensors)}


def recipe_block(model: nn.Module) -> dict[str, Any]:
    """The informational `timm_reduce` block of config.json (timm ignores it)."""
    import timm

    record = get_record(model)
    block = {'version': __version__, 'timm_version': timm.__version__, 'torch_version': torch.__version__,
             'unique_params': count_unique(model)}
    if record is not None:
        block.update(base=record.base, recipe=[s.to_dict() for s in record.recipe],
                     params_before=record.params_before, mlp_params_before=record.mlp_params_before)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        block.update(_dense_size(record, dtype))
    return block


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    from .card import BLOCK_KEYS

    metadata = dict(metadata or {})
    reserved = sorted(set(metadata) & set(BLOCK_KEYS))
    if reserved:
        raise ReduceError(f'metadata keys {reserved} are written by timm_reduce itself; use other names '
                          f'(reserved: {", ".join(BLOCK_KEYS)}).')
    try:
        json.dumps(metadata, default=_json_default)
    except TypeError as e:
        raise ReduceError(f'metadata must be JSON-serialisable (it is stored in config.json): {e}') from e
    return metadata


def save_pretrained(
        model: nn.Module,
        save_directory: str | os.PathLike,
        *,
        dense: bool = False,
        metadata: dict[str, Any] | None = None,
        model_card: bool = True,
) -> Path:
    """Save `model` as `config.json` + `model.safetensors`, loadable with `timm.create_model('local-dir:DIR')`.

    Args:
        model: a timm model, reduced or not.
        save_directory: created if needed; other files in it are left alone. Files are replaced only once all new
            files are written, so a failed save leaves a previous save intact.
        dense: save a plain timm model (`materialize(model)`) that stock timm loads without timm_reduce.
        metadata: extra JSON-able fields for the `timm_reduce` block of config.json (e.g. accuracy, data);
            the model card renders `description`, `license`, `base_model`, `datasets`, `calibration_data` and
            `accuracy` in their own places.
        model_card: also write README.md (see `timm_reduce.card`); a README.md not written by timm_reduce is kept.

    Returns:
        The directory path.
    """
    from ..core.api import materialize

    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ReduceError(f'Cannot save to {directory}: it exists and is not a directory.')
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise ReduceError('Refusing to save: the model has NaN or infinite weights.')
    metadata = _check_metadata(metadata)
    block = recipe_block(model)  # the recipe of the reduced model, also for its dense form
    if dense:
        model = materialize(model)
        block.update(dense=True, unique_params=count_unique(model))
    base = base_name(model)
    if base is None:
        raise ReduceError('Cannot tell which timm architecture this model is (no pretrained_cfg["architecture"]); '
                          'create it with timm.create_model.')
    plain_args = plain_model_args(model)
    record = get_record(model)
    extra = {'timm_reduce': {**block, **metadata}}
    if plain_args is not None:
        config = _config(model, base, plain_args, extra)
    elif dense:
        raise ReduceError('dense=True: this model has per-block MLP widths that plain timm model_args cannot '
                          'describe; save it without dense=True (loads with timm_reduce installed).')
    else:
        model_args = {'base': base, 'reduce': [s.to_dict() for s in record.recipe],
                      **_clean_args(record.base_args), **_current_traits(model)}
        config = _config(model, 'timm_reduce', model_args, extra)
    state = encode_state(model)
    text = json.dumps(config, indent=2, default=_json_default)
    writers = {
        WEIGHTS_NAME: lambda p: safetensors.torch.save_file(state, str(p), metadata={'format': 'pt'}),
        CONFIG_NAME: lambda p: p.write_text(text),
    }
    if model_card:
        from .card import CARD_NAME, is_generated_card, render_model_card

        existing = directory / CARD_NAME
        if existing.is_file() and not is_generated_card(existing.read_text(encoding='utf-8', errors='replace')):
            _logger.warning(f'{existing} was not written by timm_reduce: keeping it, no model card written.')
        else:
            card = render_model_card(model, json.loads(text))
            writers[CARD_NAME] = lambda p: p.write_text(card, encoding='utf-8')
    _atomic_write(directory, writers)
    _logger.info(f'Saved {type(model).__name__} ({"plain timm" if plain_args is not None else "timm_reduce"} '
                 f'format) to {directory}')
    return directory


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')
