"""What a saved folder may make the loader do, checked before anything is built, allocated or read.

A folder (config.json + model.safetensors, local or from the Hub) is untrusted input. Loading it:
  * reads no file but its own config.json and model.safetensors: config fields that name files, URLs, other
    folders or Hub repos are refused (`check_config`, `check_model_args`, `check_source_cfg`);
  * stays within the bounds below (recipe steps, depth, widths, parameter count), refused before any build;
  * builds the architecture on the meta device first and compares it with the safetensors header (names, shapes,
    dtypes, read without loading a tensor): a file that does not describe exactly that model is refused before a
    weight is allocated (`check_header`);
  * loads every tensor from exactly one key: a shared tensor from its canonical (first) name, never from an alias,
    nothing cast between floating point and integers/bools (`check_stored_state`).
Every refusal is a ReduceError that names the field, key or limit.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.protocol import decode_compact
from ..core.sharing import alias_map, unique_tensors
from ..errors import ReduceError
from .encoding import stored_layout

__all__ = ['MAX_CONFIG_BYTES', 'MAX_RECIPE_STEPS', 'MAX_DEPTH', 'MAX_MLP_RATIO', 'MAX_WIDTH', 'MAX_ARG_NUMBER',
           'MAX_PARAMS', 'ENTRIES_PER_STORED_BYTE', 'check_config', 'check_model_args', 'check_source_cfg',
           'on_meta', 'read_header', 'check_meta_size', 'check_header', 'check_header_outside_mlps',
           'check_stored_state',
           'load_failure_reason']

# ---- bounds: what a config.json may ask for (generous for every timm ViT-family model; all checked before building)
MAX_CONFIG_BYTES = 16 * 2 ** 20      # config.json size (ours are a few KB; label names of 22k classes fit)
MAX_RECIPE_STEPS = 8                 # steps in a reduce recipe (real recipes have 1-3)
MAX_DEPTH = 128                      # blocks in total: `depth`, or the sum of `depths` (timm's deepest: 48)
MAX_MLP_RATIO = 64.0                 # `mlp_ratio` (timm models use 2.0-8.0)
MAX_WIDTH = 65_536                   # any `*dim*`, `*width*`, `*features*`, `num_heads`, `*size*` entry
MAX_ARG_NUMBER = 10_000_000          # any other number in model_args (num_classes, img_size, ...)
MAX_PARAMS = 20_000_000_000          # tensor entries of the rebuilt model (counted on the meta device)
ENTRIES_PER_STORED_BYTE = 16         # a model holds at most 16 tensor entries per byte of its weights file (a masked
_HEADER_SLACK = 2 ** 20              # FiPS factor entry and its mask entry take one bit), plus this many slack

_BOUNDS_TEXT = (f'allowed: at most {MAX_RECIPE_STEPS} recipe steps, depth {MAX_DEPTH}, mlp_ratio {MAX_MLP_RATIO:g}, '
                f'widths {MAX_WIDTH:,}, other numbers {MAX_ARG_NUMBER:,}, {MAX_PARAMS:,} parameters')

# config keys that would make timm read another file, folder, URL or repo, or change how weights are loaded
_PATH_KEYS = frozenset({'checkpoint_path', 'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args',
                        'cache_dir', 'pretrained', 'pretrained_strict', 'file', 'url', 'state_dict', 'hf_hub_id',
                        'hf_hub_filename', 'source', 'custom_load', 'feature_cfg'})
_PATH_SUFFIXES = ('_path', '_file', '_dir', '_url', '_filename', '_uri')
# pretrained_cfg entries that say where weights come from (timm's exporter removes them; timm sets its own on load)
_SOURCE_CFG_KEYS = ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'source', 'state_dict')
_PATHLIKE_TEXT = re.compile(r'[/\\]|^~|^\.|://|^[A-Za-z]:|^(local-dir|hf-hub|hf_hub|file|timm):')


def _refuse_path(where: str, field: str, value: Any) -> ReduceError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + '...'
    return ReduceError(f'{where}: {field} = {shown} would make the loader read another file, folder, URL or Hub '
                       f'repository. A saved model may only point to its own config.json and model.safetensors; '
                       f'remove this field.')


def _refuse_bound(where: str, field: str, value: Any, limit: str) -> ReduceError:
    return ReduceError(f'{where}: {field} = {value!r} is beyond what a saved model may ask for ({limit}). '
                       f'Bounds ({_BOUNDS_TEXT}) keep a small config from hanging the loader or allocating '
                       f'terabytes; the folder is damaged or not a model to trust.')


def check_source_cfg(pretrained_cfg: Mapping[str, Any] | None, where: str, *, raw: bool = True) -> None:
    """Refuse pretrained_cfg entries naming where weights come from (`raw=False`: timm has set file/source/hf_hub_id
    itself after reading config.json, so only the entries it keeps from the file are checked)."""
    if not pretrained_cfg:
        return
    if not isinstance(pretrained_cfg, Mapping):
        raise ReduceError(f'{where}: pretrained_cfg must be a JSON object, got {type(pretrained_cfg).__name__}.')
    keys = _SOURCE_CFG_KEYS if raw else ('url', 'hf_hub_filename', 'state_dict')
    for key in keys:
        if pretrained_cfg.get(key) not in (None, ''):
            raise _refuse_path(where, f'pretrained_cfg.{key}', pretrained_cfg[key])
    if pretrained_cfg.get('custom_load'):
        raise _refuse_path(where, 'pretrained_cfg.custom_load', pretrained_cfg['custom_load'])


def _width_like(key: str) -> bool:
    return any(w in key for w in ('dim', 'width', 'features', 'size', 'heads', 'hidden', 'channels', 'chans'))


def _check_value(where: str, field: str, key: str, value: Any, depth: int = 0) -> None:
    if depth > 8:
        raise _refuse_bound(where, field, '...', 'nesting depth 8')
    if isinstance(value, str):
        if len(value) > 1024:
            raise _refuse_bound(where, field, value[:40] + '...', 'text of 1024 characters')
        if _PATHLIKE_TEXT.search(value):
            raise _refuse_path(where, field, value)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _refuse_bound(where, field, value, 'finite numbers only')
        limit = MAX_WIDTH if _width_like(key) else MAX_ARG_NUMBER
        if key == 'mlp_ratio':
            limit = MAX_MLP_RATIO
        elif key == 'depth':
            limit = MAX_DEPTH
        if abs(value) > limit:
            raise _refuse_bound(where, field, value, f'at most {limit:,}')
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_DEPTH:
            raise _refuse_bound(where, field, f'a list of {len(value)}', f'lists of at most {MAX_DEPTH} entries')
        for i, item in enumerate(value):
            _check_value(where, f'{field}[{i}]', key, item, depth + 1)
    elif isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ReduceError(f'{where}: {field} has a non-text key {k!r}.')
            if k in _PATH_KEYS or k.endswith(_PATH_SUFFIXES):
                raise _refuse_path(where, f'{field}.{k}', item)
            _check_value(where, f'{field}.{k}', k, item, depth + 1)
    else:
        raise ReduceError(f'{where}: {field} is a {type(value).__name__}; config values are JSON only.')


def check_model_args(model_args: Mapping[str, Any] | None, where: str) -> None:
    """Refuse path-like fields and sizes beyond the bounds in a config's `model_args` (also the `timm_reduce` format's
    `base` and the number of `reduce` steps; the steps' options are validated by their strategy)."""
    if model_args is None:
        return
    if not isinstance(model_args, Mapping):
        raise ReduceError(f'{where}: model_args must be a JSON object, got {type(model_args).__name__}.')
    for key, value in model_args.items():
        field = f'model_args.{key}'
        if not isinstance(key, str):
            raise ReduceError(f'{where}: model_args has a non-text key {key!r}.')
        if key in _PATH_KEYS or key.endswith(_PATH_SUFFIXES):
            raise _refuse_path(where, field, value)
        if key == 'reduce':
            steps = value if isinstance(value, (list, tuple)) else [value]
            if len(steps) > MAX_RECIPE_STEPS:
                raise _refuse_bound(where, field, f'a recipe of {len(steps)} steps', f'at most {MAX_RECIPE_STEPS} '
                                    'steps')
            continue
        if key == 'base':
            import timm

            if not isinstance(value, str) or _PATHLIKE_TEXT.search(value) or ':' in value:
                raise _refuse_path(where, field, value)
            if value == 'timm_reduce' or not timm.is_model(value):
                raise ReduceError(f'{where}: model_args.base = {value!r} is not a timm model name '
                                  f'(see timm.list_models()).')
            continue
        if key == 'depths' and isinstance(value, (list, tuple)):
            total = sum(v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v))
            if total > MAX_DEPTH:
                raise _refuse_bound(where, field, value, f'at most {MAX_DEPTH} blocks in total')
        _check_value(where, field, key, value)


def check_config(config: Any, where: str) -> None:
    """Check a parsed config.json (either format) before timm sees it: path-like fields and bounds."""
    if not isinstance(config, dict):
        raise ReduceError(f'{where}: config.json must hold a JSON object, got {type(config).__name__}.')
    architecture = config.get('architecture')
    if not isinstance(architecture, str) or not architecture:
        raise ReduceError(f'{where}: config.json has no "architecture" (the timm model name).')
    if _PATHLIKE_TEXT.search(architecture) or ':' in architecture:
        raise _refuse_path(where, 'architecture', architecture)
    # timm's legacy single-dict form keeps the pretrained config at the top level
    check_source_cfg(config.get('pretrained_cfg', config), where)
    check_model_args(config.get('model_args'), where)


# ---- building without data -------------------------------------------------------------------------------------

# in-place ops that only change values: on the meta device there are none, yet torch runs its (slow, Python) meta
# kernels for them; weight init alone made a 200-block skeleton take seconds
_VALUE_OPS = frozenset({'normal_', 'uniform_', 'erfinv_', 'clamp_', 'clamp_min_', 'clamp_max_', 'mul_', 'add_',
                        'sub_', 'div_', 'fill_', 'zero_', 'copy_', 'exponential_', 'bernoulli_', 'random_',
                        'log_normal_', 'geometric_', 'cauchy_', 'addcmul_', 'addcdiv_', 'masked_fill_', 'sqrt_',
                        'neg_', 'abs_', 'exp_', 'log_'})


class _SkipMetaValueOps(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, '__name__', '') in _VALUE_OPS and args and isinstance(args[0], torch.Tensor)
                and args[0].device.type == 'meta'):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build on the meta device (shapes and dtypes, no memory), skipping the value-only in-place ops of weight init."""
    with torch.device('meta'), _SkipMetaValueOps():
        yield


# ---- the weights file's header --------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}


def read_header(path: str | Path, where: str) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """`{key: (dtype, shape)}` of a safetensors file, from its header only (no tensor is read).

    safetensors checks that the header's offsets cover the file exactly, so the shapes are bounded by the file size.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework='pt', device='cpu') as f:
            header = {}
            for key in f.keys():
                info = f.get_slice(key)
                dtype = info.get_dtype()
                header[key] = (_SAFETENSORS_DTYPES.get(dtype, dtype), tuple(info.get_shape()))
            return header
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise ReduceError(f'{where}: {Path(path).name} is not a readable safetensors file: {e}') from e


def _alias_hint(key: str, aliases: Mapping[str, str]) -> str:
    for alias, canonical in aliases.items():
        if key == alias or key.startswith(alias + '.'):
            return f'{key} (an alias of the shared {canonical}, stored once under that name)'
    return key


def _listing(keys: list[str], aliases: Mapping[str, str] | None = None, limit: int = 6) -> str:
    shown = [_alias_hint(k, aliases or {}) for k in keys[:limit]]
    return ', '.join(shown) + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')


def _mismatch(where: str, problems: list[str]) -> ReduceError:
    return ReduceError(f'The weights in {where} do not match the model its config describes: {"; ".join(problems)}. '
                       f'Was config.json (the recipe, e.g. group_size) edited after saving, or are these weights of '
                       f'another model? Nothing was loaded.')


def _dtype_fits(spec_dtype: torch.dtype, stored: Any, exact: bool) -> bool:
    if exact or not spec_dtype.is_floating_point:
        return stored == spec_dtype
    return isinstance(stored, torch.dtype) and stored.is_floating_point


def check_meta_size(model: nn.Module, where: str) -> int:
    """The tensor entries of a model built on the meta device (shared tensors once), refused beyond MAX_PARAMS."""
    numel = sum(t.numel() for t in unique_tensors(model.state_dict(keep_vars=True).values()))
    if numel > MAX_PARAMS:
        raise _refuse_bound(where, 'the rebuilt model', f'{numel:,} tensor entries', f'at most {MAX_PARAMS:,}')
    return numel


def check_header(model: nn.Module, header: Mapping[str, tuple[Any, tuple[int, ...]]], where: str) -> None:
    """Compare a model built on the meta device with a weights file's header: exactly its stored keys (no alias of a
    shared tensor, nothing missing), shapes, dtypes, and a parameter count the file size can back."""
    layout, aliases, opaque = stored_layout(model)
    numel = check_meta_size(model, where)

    def opaque_key(key: str) -> bool:
        return any(key.startswith(p) for p in opaque)

    problems = []
    unexpected = sorted(k for k in header if k not in layout and not opaque_key(k))
    missing = sorted(k for k, spec in layout.items() if k not in header and not spec.optional and not opaque_key(k))
    if unexpected:
        problems.append(f'keys the rebuilt model does not store: {_listing(unexpected, aliases)}')
    if missing:
        problems.append(f'missing keys: {_listing(missing)}')
    wrong = []
    for key, (dtype, shape) in header.items():
        spec = layout.get(key)
        if spec is None:
            continue
        if not _dtype_fits(spec.dtype, dtype, spec.exact_dtype):
            wrong.append(f'{key} is {dtype}, the model stores {spec.dtype}')
        elif spec.shape is not None and shape != spec.shape:
            wrong.append(f'{key} has shape {list(shape)}, the model {list(spec.shape)}')
        elif spec.shape is None and (len(shape) != 1 or shape[0] > (spec.max_numel or 0)):
            wrong.append(f'{key} has shape {list(shape)}, the model stores at most {spec.max_numel} entries (1-D)')
    if wrong:
        problems.append('; '.join(wrong[:6]) + (f' ... ({len(wrong)} in all)' if len(wrong) > 6 else ''))
    if problems:
        raise _mismatch(where, problems)
    stored = sum(math.prod(shape) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 1)
                 for dtype, shape in header.values())
    if numel > ENTRIES_PER_STORED_BYTE * stored + _HEADER_SLACK:
        raise _refuse_bound(where, 'the rebuilt model', f'{numel:,} tensor entries',
                            f'at most {ENTRIES_PER_STORED_BYTE} per byte of its {stored:,}-byte weights file')


def check_header_outside_mlps(dense: nn.Module, header: Mapping[str, tuple[Any, tuple[int, ...]]], where: str) -> None:
    """The quick first check, on the dense base built on the meta device before any recipe step runs: every tensor
    outside the block MLPs (which no strategy changes) must be in the file with its shape and a fitting dtype. A
    config with another depth, width, image size or class count is refused here, before the recipe is applied."""
    from ..core.discovery import find_mlp_sites

    try:
        prefixes = tuple(f'{site.path}.mlp.' for site in find_mlp_sites(dense))
    except ReduceError:  # no MLP sites: the full check reports what is wrong
        return
    state = dense.state_dict(keep_vars=True)
    aliases = alias_map(state)
    problems, missing = [], []
    for key, t in state.items():
        if key in aliases or key.startswith(prefixes):
            continue
        if key not in header:
            missing.append(key)
            continue
        dtype, shape = header[key]
        if not _dtype_fits(t.dtype, dtype, exact=False):
            problems.append(f'{key} is {dtype}, the model stores {t.dtype}')
        elif shape != tuple(t.shape):
            problems.append(f'{key} has shape {list(shape)}, the model {list(t.shape)}')
    if missing:
        problems.insert(0, f'missing keys: {_listing(sorted(missing))}')
    if problems:
        raise _mismatch(where, problems[:6])


def check_stored_state(model: nn.Module, stored: Mapping[str, torch.Tensor], where: str,
                       deduplicated: bool) -> dict[str, torch.Tensor]:
    """The full state_dict to load into `model` from `stored`, each tensor from exactly one key.

    A shared tensor is loaded from its canonical (first) key. `deduplicated=True` (the save_pretrained format stores
    each shared tensor once): any alias key is an error. Otherwise (a training checkpoint lists a shared tensor under
    every name) an alias key must hold exactly the canonical key's values. Compact forms are decoded (and validated
    by their layer); then the keys must be exactly the model's, shapes equal and dtypes of the same kind (floating
    point for floating point; integer and bool tensors exactly): nothing is cast from bool or integers to weights.
    """
    state = dict(stored)
    aliases = alias_map(model.state_dict())
    present = sorted(a for a in aliases if a in state)
    if present and deduplicated:
        raise _mismatch(where, [f'a shared tensor stored again under an alias key: {_listing(present, aliases)}'])
    differing = [a for a in present if aliases[a] in state and not (
        state[a].shape == state[aliases[a]].shape and state[a].dtype == state[aliases[a]].dtype
        and torch.equal(state[a], state[aliases[a]]))]
    if differing:
        raise _mismatch(where, [('alias keys whose values differ from the shared tensor they name: '
                                 f'{_listing(differing, aliases)}')])
    for alias in present:
        del state[alias]
    try:
        decode_compact(model, state)
    except ReduceError as e:
        raise ReduceError(f'{where}: {e}') from e
    expected = {k: t for k, t in model.state_dict().items() if k not in aliases}
    problems = []
    unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unexpected:
        problems.append(f'keys the rebuilt model does not have: {_listing(unexpected, aliases)}')
    if missing:
        problems.append(f'missing keys: {_listing(missing)}')
    wrong = []
    for key, mine in expected.items():
        t = state.get(key)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            wrong.append(f'{key} is a {type(t).__name__}, not a tensor')
        elif not _dtype_fits(mine.dtype, t.dtype, exact=False):
            wrong.append(f'{key} is {t.dtype}, the model has {mine.dtype}')
        elif t.shape != mine.shape:
            wrong.append(f'{key} has shape {list(t.shape)}, the model {list(mine.shape)}')
    if wrong:
        problems.append('; '.join(wrong[:6]) + (f' ... ({len(wrong)} in all)' if len(wrong) > 6 else ''))
    if problems:
        raise _mismatch(where, problems)
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return state


# ---- torch.load failures ---------------------------------------------------------------------------------------

def load_failure_reason(error: BaseException) -> str:
    """Why a `weights_only=True` torch.load failed, in our words: never torch's advice to retry with
    `weights_only=False`, which would run whatever code an untrusted pickle carries."""
    text = str(error)
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return (f'it is a pickle that needs Python object {found.group(1)} to load, and only tensors and plain '
                f'containers are read from checkpoint files (never code). If you made this file yourself, save '
                f'a plain state_dict or a safetensors file instead.')
    if not text.strip():
        return f'{type(error).__name__} (the file is empty or truncated)'
    if 'weights only' in text.lower() or 'weights_only' in text:
        return ('it is not a readable torch checkpoint of plain tensors and containers (damaged, or written with '
                'a pickle feature a safe load does not run)')
    first = text.strip().splitlines()[0]
    return f'{type(error).__name__}: {first[:300]}'
