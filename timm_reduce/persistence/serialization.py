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
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..version import __version__
from ..core.discovery import find_mlp_sites
from ..core.finite import non_finite
from ..errors import ReduceError
from ..core.record import ReductionRecord, base_name, get_record
from ..core.sharing import alias_map, count_unique
from .encoding import encode_state
from .files import write_folder

__all__ = ['save_pretrained', 'load_reduced_state', 'plain_model_args', 'check_saveable', 'saved_dtype',
           'restore_saved_dtype', 'read_weights', 'safe_torch_load', 'load_pretrained', 'WEIGHTS_NAME', 'CONFIG_NAME']

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
_DROP_ARGS = ('drop_rate', 'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate',
              'patch_drop_rate', 'drop_block_rate', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir',
              'device', 'dtype')  # placement is not architecture: the dtype is saved and restored on its own


def load_reduced_state(model: nn.Module, stored: dict[str, torch.Tensor], source: str = 'checkpoint', *,
                       deduplicated: bool = False) -> None:
    """Load stored (encoded) weights strictly into a model rebuilt with the same reduction.

    Every tensor is loaded from exactly one key, a shared tensor from its canonical (first) name (see
    `trust.check_stored_state`). `deduplicated=True` for the save_pretrained format, which stores each shared tensor
    once: a second (alias) key for it is an error. A full state_dict (training checkpoints) may repeat a shared tensor
    under its aliases only with exactly the same values.

    Raises:
        ReduceError: keys, shapes or dtypes that differ from the model, alias keys, or an invalid compact form; the
            message names the keys. The model is unchanged then.
    """
    from .trust import check_stored_state

    state = check_stored_state(model, stored, source, deduplicated)
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
        from .trust import load_failure_reason

        # our words, not torch's: its message advises retrying with weights_only=False, which runs the file's code
        raise ReduceError(f'Cannot read checkpoint {path} safely: {load_failure_reason(e)}') from None


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
        _check_hub_config(name, model_kwargs.get('cache_dir'))
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
        _check_folder(folder)
        name = f'local-dir:{folder.resolve()}'
    try:
        model = timm.create_model(name, pretrained=True, **model_kwargs)
    except ReduceError:
        raise
    except Exception as e:  # timm's own loader: strict load errors, unknown architectures, Hub errors
        raise ReduceError(f'{text} does not load as a timm model: {type(e).__name__}: {e}') from e
    return restore_saved_dtype(model, name, model_kwargs.get('cache_dir'))  # plain timm builds float32


def _read_config(path: Path) -> dict[str, Any]:
    """config.json, parsed with bounds: size, nesting, JSON only (NaN/Infinity refused), then `trust.check_config`."""
    from .trust import MAX_CONFIG_BYTES, check_config

    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ReduceError(f'{path} is {size:,} bytes; a config.json may have at most {MAX_CONFIG_BYTES:,}.')

    def no_constant(name: str) -> Any:
        raise ValueError(f'{name} is not a JSON number')

    try:
        config = json.loads(path.read_bytes().decode('utf-8'), parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        what = 'nested too deeply' if isinstance(e, RecursionError) else e
        raise ReduceError(f'{path} is not valid JSON: {what}') from None
    check_config(config, str(path))
    return config


def _check_folder(folder: Path) -> None:
    """What a local folder may ask of the loader, before timm reads it (`persistence.trust`). A plain timm config is
    also built on the meta device and compared with the weights file's header, as the timm_reduce entrypoint does
    for its own format: a config inflating sizes is refused before anything is allocated."""
    import timm

    from .trust import check_header, on_meta, read_header

    config = _read_config(folder / CONFIG_NAME)
    architecture = config['architecture']
    if architecture == 'timm_reduce' or not timm.is_model(architecture):
        return  # the entrypoint checks its own format; timm names an unknown architecture
    where = str(folder / WEIGHTS_NAME)
    header = read_header(folder / WEIGHTS_NAME, where)
    try:
        with on_meta():
            skeleton = timm.create_model(architecture, pretrained=False, **(config.get('model_args') or {}))
    except Exception as e:  # invalid kwargs: timm says so when it builds; nothing was allocated here
        _logger.debug(f'{folder}: no meta-device build of {architecture} to check the header against ({e})')
        return
    check_header(skeleton, header, where)


def _check_hub_config(name: str, cache_dir: Any = None) -> None:
    """`_check_folder`'s config checks for an `hf-hub:` id (the header is checked by the entrypoint)."""
    try:
        from timm.models._hub import download_from_hf

        path = Path(download_from_hf(name[len('hf-hub:'):], CONFIG_NAME, cache_dir=cache_dir))
    except Exception:  # timm's own download reports Hub errors with the repo id
        return
    _read_config(path)


def _clean_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in _DROP_ARGS and not k.endswith('_drop_rate')}


def _shape_signature(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _hidden_ratio(sites: list) -> float | None:
    """The `mlp_ratio` giving every MLP its present hidden width (timm computes `int(dim * mlp_ratio)`), or None
    when the ratio differs per block."""
    ratios = {s.mlp.fc2.in_features / s.mlp.fc2.out_features for s in sites}
    if len(ratios) != 1:
        return None
    ratio = ratios.pop()
    if any(int(s.mlp.fc2.out_features * ratio) != s.mlp.fc2.in_features for s in sites):
        ratio = math.nextafter(ratio, math.inf)  # width / dim rounded down: the next float up gives the width back
    return ratio


def _meta_signature(base: str, args: dict[str, Any]) -> dict[str, tuple] | None:
    import timm

    try:
        with torch.device('meta'):
            return _shape_signature(timm.create_model(base, pretrained=False, **args))
    except Exception:  # the base does not take these kwargs
        return None


def plain_model_args(model: nn.Module) -> dict[str, Any] | None:
    """timm kwargs that rebuild `model` exactly with stock timm (e.g. `{'mlp_ratio': 2.0, ...}`), or None.

    Only models without shared tensors or custom layers qualify; the answer is checked by building the
    candidate on the meta device and comparing every tensor shape. A model whose MLPs were pruned outside
    timm_reduce (no recipe recorded) to one width in every block gets the measured `mlp_ratio`.
    """
    record = get_record(model)
    base = base_name(model)
    if base is None or alias_map(model.state_dict()):
        return None
    args = _clean_args(dict(record.base_args if record else getattr(model, '_model_args', {}) or {}))
    sites = find_mlp_sites(model)
    if any(type(m).__module__.startswith('timm_reduce') for m in model.modules()):
        return None
    ratio = _hidden_ratio(sites) if sites else None
    if record is not None and record.recipe:
        if ratio is None:
            return None
        args['mlp_ratio'] = ratio
    args.update(_current_traits(model))
    signature = _shape_signature(model)
    if _meta_signature(base, args) == signature:
        return args
    if (record is None or not record.recipe) and ratio is not None:  # pruned by another library: measured ratio
        args = {**args, 'mlp_ratio': ratio}
        if _meta_signature(base, args) == signature:
            return args
    return None


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


_NO_BASE = ('Cannot tell which timm architecture this model is (no pretrained_cfg["architecture"]); create it with '
            'timm.create_model.')


def check_saveable(model: nn.Module) -> None:
    """Raise now, before any expensive step, if `save_pretrained(model)` would fail on how the model was created.

    config.json stores the timm architecture and every argument the model was created with, as JSON, so that timm
    can rebuild it; an argument JSON cannot hold (e.g. `norm_layer=functools.partial(nn.LayerNorm, eps=1e-5)`) cannot
    be saved. Reads no weights: call it before compress or training whose result will be saved.

    Raises:
        ReduceError: no timm architecture name, or a creation argument that is not JSON (named, with what to do).
    """
    base = base_name(model)
    if base is None:
        raise ReduceError(_NO_BASE)
    record = get_record(model)
    args = {**(getattr(model, '_model_args', None) or {}), **(record.base_args if record is not None else {})}
    for key, value in _clean_args(args).items():
        try:
            json.dumps(value, default=_json_default)
        except (TypeError, ValueError, RecursionError):
            shown = repr(value) if len(repr(value)) <= 100 else repr(value)[:97] + '...'
            raise ReduceError(
                f'Cannot save this {base} model: it was created with {key}={shown}, a {type(value).__name__} that '
                'config.json cannot hold (it stores the arguments timm rebuilds the model from, as JSON). Create the '
                'model with a JSON value timm understands instead (numbers, text, lists; for a layer its registered '
                f"name, e.g. norm_layer='layernorm'), or leave {key} at its default.") from None


# ---- dtype: saved in config.json, restored on load -----------------------------------------------------------

_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32, 'float64': torch.float64}


def _dtype_name(model: nn.Module) -> str | None:
    """The floating dtype of every tensor the model stores, by name; None (reloads as float32) when it mixes several."""
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    names = sorted(str(d).removeprefix('torch.') for d in dtypes)
    if len(names) == 1 and names[0] in _DTYPES:
        return names[0]
    if names:
        _logger.warning(f'The model stores {" and ".join(names)} tensors; config.json can record one dtype of '
                        f'{", ".join(_DTYPES)}, so it will reload as float32. Cast it with model.to(dtype) first to '
                        'keep one dtype.')
        return None
    return 'float32'


def saved_dtype(value: Any, where: str = 'config.json') -> torch.dtype | None:
    """The torch dtype named by a config's `dtype` entry (None for none).

    Raises:
        ReduceError: anything but float16, bfloat16, float32 or float64.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix('torch.') in _DTYPES:
        return _DTYPES[value.removeprefix('torch.')]
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + '...'
    raise ReduceError(f'{where}: dtype {shown} is not one a saved model may have; allowed: {", ".join(_DTYPES)}.')


def _saved_file(source: str, name: str, cache_dir: Any = None) -> Path | None:
    """`name` of a `local-dir:` folder or, already downloaded, of an `hf-hub:` repo (no network access)."""
    if source.startswith('local-dir:'):
        path = Path(source[len('local-dir:'):]) / name
        return path if path.is_file() else None
    if source.startswith('hf-hub:'):
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = source[len('hf-hub:'):].partition('@')
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision or None)
        return Path(found) if isinstance(found, str) else None
    return None


def restore_saved_dtype(model: nn.Module, source: str, cache_dir: Any = None) -> nn.Module:
    """Give a plain-timm model loaded from `source` (`local-dir:`/`hf-hub:`) the dtype it was saved in.

    timm builds plain architectures in float32 and casts the stored weights into them; config.json's
    `timm_reduce.dtype` says what they were. bfloat16/float16 values survive float32 exactly, so a cast restores them;
    float64 weights are read again after the cast. The `timm_reduce` architecture restores its dtype itself (its
    `model_args.dtype`, applied before the weights are loaded). No-op for float32 or a config without the entry.
    """
    path = _saved_file(source, CONFIG_NAME, cache_dir)
    if path is None:
        return model
    config = json.loads(path.read_text(encoding='utf-8'))
    block = config.get('timm_reduce') if isinstance(config, dict) else None
    dtype = saved_dtype(block.get('dtype') if isinstance(block, dict) else None, str(path))
    current = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtype is None or current == {dtype}:
        return model
    model.to(dtype)
    if dtype.itemsize > 4:  # values float32 cannot hold: load them again, now in the saved dtype
        weights = _saved_file(source, WEIGHTS_NAME, cache_dir)
        if weights is None:
            raise ReduceError(f'{source}: config.json says {dtype} but {WEIGHTS_NAME} is not at hand to reload.')
        model.load_state_dict(safetensors.torch.load_file(str(weights), device='cpu'), strict=True)
    return model


# ---- save-time checks: the folder written must load back as this model -----------------------------------------

def _structure(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """State-dict shapes and which keys share a tensor (by identity: also visible on the meta device)."""
    state = model.state_dict(keep_vars=True)
    return {k: tuple(t.shape) for k, t in state.items()}, alias_map(state)


def _rebuild_structure(config: dict[str, Any], device: str) -> tuple[dict, dict]:
    import timm

    with torch.random.fork_rng(devices=[]), torch.device(device):  # saving leaves the caller's random stream alone
        return _structure(timm.create_model(config['architecture'], pretrained=False,
                                            **dict(config.get('model_args') or {})))


def _listing(keys: list[str], shapes: dict[str, tuple], limit: int = 4) -> str:
    shown = ', '.join(f'{k} {list(shapes[k])}' for k in keys[:limit])
    return shown + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def _mlp_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = {id(m): n for n, m in model.named_modules()}
    try:
        return tuple(f'{names[id(s.mlp)]}.' for s in find_mlp_sites(model) if id(s.mlp) in names)
    except ReduceError:
        return ()


def _mismatch(model: nn.Module, config: dict[str, Any], want: tuple, got: tuple) -> ReduceError:
    (shapes, aliases), (rebuilt, rebuilt_aliases) = want, got
    extra = [k for k in shapes if k not in rebuilt]
    missing = [k for k in rebuilt if k not in shapes]
    resized = [k for k in shapes if k in rebuilt and shapes[k] != rebuilt[k]]
    parts = []
    if extra:
        parts.append(f'this model has {_listing(extra, shapes)}, the rebuilt one does not')
    if missing:
        parts.append(f'the rebuilt one has {_listing(missing, rebuilt)}, this model does not')
    if resized:
        parts.append('shapes differ: ' + ', '.join(f'{k} {list(shapes[k])} here, {list(rebuilt[k])} rebuilt'
                                                   for k in resized[:4]))
    shared = sorted(set(aliases.items()) ^ set(rebuilt_aliases.items()))
    if shared:
        parts.append(f'tensors are shared differently ({", ".join(f"{a} = {c}" for a, c in shared[:4])})')
    args = config.get('model_args') or {}
    shown = {k: v for k, v in args.items() if k not in ('reduce',)}
    described = f"{config['architecture']}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
    changed = extra + missing + resized
    mlps = _mlp_prefixes(model)
    record = get_record(model)
    if changed and mlps and all(k.startswith(mlps) for k in changed):
        widths = [s.mlp.fc2.in_features for s in find_mlp_sites(model)]
        if record is None or not record.recipe:
            hint = (f'The MLP hidden widths {widths} differ per block and no timm_reduce recipe records them (pruned by '
                    "another library?); timm's model_args hold one mlp_ratio for all blocks. Record them with "
                    f"timm_reduce: reduced = timm_reduce.reduce(timm.create_model('{base_name(model)}', ...), "
                    f"'shallow', keep={widths}, importance='first'); reduced.load_state_dict(model.state_dict()); "
                    'then save reduced.')
        else:
            hint = ('The MLPs were changed after timm_reduce recorded its recipe '
                    f'({" -> ".join(str(s) for s in record.recipe)}), so the recipe no longer rebuilds them. Reduce '
                    'the model only with timm_reduce, or save the weights yourself with safetensors.')
    else:
        modules = sorted({k.split('.')[0] for k in changed}) or sorted({a.split('.')[0] for a, _ in shared})
        hint = (f'config.json can only describe what timm builds from an architecture name and its arguments (plus a '
                f'timm_reduce recipe); {", ".join(f"model.{m}" for m in modules)} was changed or replaced by hand '
                '(e.g. model.head = nn.Sequential(...)), which the loader cannot rebuild. Keep timm\'s own module (for '
                'another number of classes: model.reset_classifier(num_classes), or create the model with '
                'num_classes=...), or save the state_dict yourself with safetensors.torch.save_file and rebuild the '
                'module in code before loading it.')
    return ReduceError(f'Refusing to save: the folder would not load back. timm rebuilds {described} from its '
                       f'config.json, and that differs from this model: {"; ".join(parts)}. {hint}')


def _check_rebuilds(model: nn.Module, config: dict[str, Any]) -> None:
    """save_pretrained never writes a folder its own loader rejects: config.json passes the loader's checks, and the
    architecture it describes, rebuilt on the meta device (for real where a layer computes while it is built), has
    exactly the model's state-dict keys, shapes and shared tensors."""
    from .trust import check_config

    try:
        check_config(config, 'the config.json save_pretrained would write')
    except ReduceError as e:
        raise ReduceError(f'Refusing to save: the loader would refuse the folder. {e}') from None
    want = _structure(model)
    try:
        got = _rebuild_structure(config, 'meta')
    except Exception:  # a layer that computes while it is built (SVD, .item()): build it for real below
        got = None
    if got != want:  # the meta device hides sharing by memory: the real build decides
        try:
            got = _rebuild_structure(config, 'cpu')
        except Exception as e:
            raise ReduceError(f'Refusing to save: the config.json written for this model does not rebuild it '
                              f'({type(e).__name__}: {e}).') from e
    if got != want:
        raise _mismatch(model, config, want, got)


def _not_plain(model: nn.Module, base: str, dense: bool) -> ReduceError:
    """Why a model without a usable timm_reduce recipe cannot be saved as a plain timm architecture."""
    sites = find_mlp_sites(model)
    widths = [s.mlp.fc2.in_features for s in sites]
    if dense and len(set(widths)) > 1:
        return ReduceError('dense=True: this model has per-block MLP widths that plain timm model_args cannot '
                           'describe; save it without dense=True (loads with timm_reduce installed).')
    if alias_map(model.state_dict()) or any(type(m).__module__.startswith('timm_reduce') for m in model.modules()):
        return ReduceError('Refusing to save: this model has shared tensors or timm_reduce layers but no timm_reduce '
                           'recipe (get_record(model) is None), so no config.json can rebuild it. Save the model '
                           'timm_reduce.reduce returned (or a copy.deepcopy of it), which carries its recipe.')
    record = get_record(model)
    args = _clean_args(dict(record.base_args if record else getattr(model, '_model_args', {}) or {}))
    ratio = _hidden_ratio(sites) if sites else None
    if ratio is not None:  # as plain_model_args would write it: the comparison then shows what else differs
        args['mlp_ratio'] = ratio
    args.update(_current_traits(model))
    config = {'architecture': base, 'model_args': json.loads(json.dumps(args, default=_json_default))}
    try:
        _check_rebuilds(model, config)
    except ReduceError as e:
        return ReduceError(f'{"dense=True: " if dense else ""}{e}')
    return ReduceError(f'Refusing to save: no plain timm config.json rebuilds this {base} model.')


def _check_targets(directory: Path, model_card: bool) -> None:
    """The folder's entries save_pretrained replaces must be files: refused before anything is written."""
    from .card import CARD_NAME

    if directory.exists() and not directory.is_dir():
        raise ReduceError(f'Cannot save to {directory}: it exists and is not a directory.')
    for name in (CONFIG_NAME, WEIGHTS_NAME) + ((CARD_NAME,) if model_card else ()):
        if (directory / name).is_dir():
            extra = ' (or pass model_card=False: then the README.md folder is left alone)' if name == CARD_NAME else ''
            raise ReduceError(f'Cannot save to {directory}: {name} there is a folder, not a file. Move it away{extra}; '
                              'nothing was written.')


def _refuse_non_finite(model: nn.Module) -> None:
    bad = [f'{key} ({count} of {size})' for key, count, size in non_finite(model.state_dict().items())]
    if bad:
        raise ReduceError(f'Refusing to save: the model has NaN or infinite weights in {", ".join(bad[:3])}'
                          f'{f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""}. Nothing was written.')


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
        model: a timm model, reduced or not, in any of float32/bfloat16/float16/float64 (kept: see `saved_dtype`).
        save_directory: created if needed; other files in it are kept. All or nothing: the files are written into a
            new sibling folder that then replaces the folder in one step, so the folder holds the complete previous
            save or the complete new one, never a mix (see `persistence.files`).
        dense: save a plain timm model (`materialize(model)`) that stock timm loads without timm_reduce.
        metadata: extra JSON-able fields for the `timm_reduce` block of config.json (e.g. accuracy, data);
            the model card renders `description`, `license`, `base_model`, `datasets`, `calibration_data` and
            `accuracy` in their own places.
        model_card: also write README.md (see `timm_reduce.card`); a README.md not written by timm_reduce is kept.

    Returns:
        The directory path.

    Raises:
        ReduceError: before anything is written: NaN/Inf weights, a creation argument JSON cannot hold
            (`check_saveable`), a config.json that would not rebuild this model (a module replaced by hand, MLPs
            changed outside timm_reduce; the message says what differs), an entry to replace that is a folder.
    """
    from ..core.api import materialize

    directory = Path(save_directory)
    _check_targets(directory, model_card)
    check_saveable(model)
    _refuse_non_finite(model)
    metadata = _check_metadata(metadata)
    dtype = _dtype_name(model)
    block = recipe_block(model)  # the recipe of the reduced model, also for its dense form
    if dense:
        model = materialize(model)
        block.update(dense=True, unique_params=count_unique(model))
    if dtype is not None:
        block['dtype'] = dtype
    base = base_name(model)
    if base is None:
        raise ReduceError(_NO_BASE)
    plain_args = plain_model_args(model)
    record = get_record(model)
    extra = {'timm_reduce': {**block, **metadata}}
    if plain_args is not None:
        config = _config(model, base, plain_args, extra)
    elif dense or record is None or not record.recipe:
        raise _not_plain(model, base, dense)
    else:
        model_args = {'base': base, 'reduce': [s.to_dict() for s in record.recipe],
                      **_clean_args(record.base_args), **_current_traits(model)}
        if dtype not in (None, 'float32'):  # the entrypoint casts the rebuilt model before loading the weights
            model_args['dtype'] = dtype
        config = _config(model, 'timm_reduce', model_args, extra)
    text = json.dumps(config, indent=2, default=_json_default)
    _check_rebuilds(model, json.loads(text))
    state = encode_state(model)
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
    write_folder(directory, writers)
    _logger.info(f'Saved {type(model).__name__} ({"plain timm" if plain_args is not None else "timm_reduce"} '
                 f'format) to {directory}')
    return directory


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')
