"""Model cards (README.md) for saved and pushed reduced models: YAML front matter for the Hub plus a readable body.

The card is rendered from the model as stored and its config.json: the numbers after reduction come from
`summary()`, the numbers before from the `timm_reduce` block written by `save_pretrained`. No network access here.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import yaml
from torch import nn

__all__ = ['CARD_NAME', 'CARD_MARKER', 'BLOCK_KEYS', 'is_generated_card', 'render_model_card', 'user_metadata']

_logger = logging.getLogger(__name__)

CARD_NAME = 'README.md'
CARD_MARKER = '<!-- timm_reduce:model-card -->'
# keys of config.json's `timm_reduce` block written by timm_reduce itself; any other key is user metadata
BLOCK_KEYS = ('version', 'timm_version', 'torch_version', 'unique_params', 'base', 'recipe', 'params_before',
              'mlp_params_before', 'unique_params_before', 'bytes_before', 'dense', 'dtype')
# user metadata keys the card renders in their own place; others are listed under "Other metadata"
_CARD_KEYS = ('description', 'license', 'base_model', 'datasets', 'calibration_data', 'accuracy')


def is_generated_card(text: str) -> bool:
    """True when a README.md was written by timm_reduce (and may be regenerated), False for a user's own card."""
    return CARD_MARKER in text


def user_metadata(block: dict[str, Any]) -> dict[str, Any]:
    """The user metadata stored in a config.json `timm_reduce` block (everything timm_reduce did not write)."""
    return {k: v for k, v in block.items() if k not in BLOCK_KEYS}


def _fmt(n: Any) -> str:
    return f'{n:,}' if isinstance(n, int) else 'n/a'


def _ratio(after: Any, before: Any) -> str:
    return f'{after / before:.1%}' if isinstance(after, int) and isinstance(before, int) and before else ''


def _size_rows(info: dict[str, Any], block: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(label, before, after) rows; a model never reduced has before == after."""
    rows = [('parameters (as used in the forward pass)', 'params_before', 'params'),
            ('unique parameters (stored)', 'unique_params_before', 'unique_params'),
            ('MLP parameters', 'mlp_params_before', 'mlp_params'),
            ('bytes at rest (tensor data)', 'bytes_before', 'bytes')]
    reduced = 'params_before' in block
    return [(label, block.get(before) if reduced else info[now], info[now]) for label, before, now in rows]


def _spec_text(step: dict[str, Any]) -> str:
    options = ','.join(f'{k}={json.dumps(v)}' for k, v in step.get('options', {}).items())
    return f"{step['strategy']}:{options}" if options else step['strategy']


def _recipe_lines(recipe: list[dict[str, Any]]) -> list[str]:
    if not recipe:
        return ['No reduction recorded: timm_reduce did not reduce this model (or it was loaded as plain timm).']
    return [f'{i}. `{_spec_text(step)}`' for i, step in enumerate(recipe, 1)]


def _value_lines(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f'- **{k}**: {v if isinstance(v, (str, int, float)) else json.dumps(v)}' for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [f'- {v}' for v in value]
    return [str(value)]


def _accuracy_lines(accuracy: Any) -> list[str]:
    rows = accuracy if isinstance(accuracy, dict) else {'accuracy': accuracy}
    lines = ['| metric | value |', '|---|---:|']
    lines += [f'| {k} | {v if isinstance(v, (str, int, float)) else json.dumps(v)} |' for k, v in rows.items()]
    return lines


def _front_matter(config: dict[str, Any], block: dict[str, Any], meta: dict[str, Any]) -> str:
    tags = ['timm', 'timm_reduce']
    tags += [step['strategy'] for step in block.get('recipe', []) if step['strategy'] not in tags]
    data: dict[str, Any] = {'library_name': 'timm', 'tags': tags}
    if config.get('num_classes'):
        tags.append('image-classification')
        data['pipeline_tag'] = 'image-classification'
    for key in ('license', 'base_model', 'datasets'):
        if meta.get(key):
            data[key] = meta[key]
    return '---\n' + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + '---\n'


def _loading_lines(config: dict[str, Any], block: dict[str, Any], repo_id: str | None) -> list[str]:
    source = f'hf-hub:{repo_id}' if repo_id else 'local-dir:path/to/this/folder'
    plain = config.get('architecture') != 'timm_reduce'
    lines = [
        '## How to load', '',
        '### With timm_reduce', '',
        '```python',
        'import timm',
        'import timm_reduce  # pip install timm_reduce; registers the `timm_reduce` architecture',
        '',
        f"model = timm.create_model('{source}', pretrained=True).eval()",
        "print(timm_reduce.format_summary(timm_reduce.summary(model)))",
        '```', '',
        '### Without timm_reduce', '',
    ]
    if plain:
        lines += [
            f"This checkpoint is a plain timm `{config.get('architecture')}` (reduced widths are ordinary "
            '`model_args`, no shared tensors), so stock timm loads it:', '',
            '```python', 'import timm', '',
            f"model = timm.create_model('{source}', pretrained=True).eval()", '```',
        ]
    else:
        lines += [
            'This checkpoint stores shared or compact tensors once, and its architecture `timm_reduce` is registered '
            'by the plugin, so stock timm alone cannot build it. To get a plain timm model (shared weights expanded, '
            'same outputs, larger file), load it once with timm_reduce and save or push a dense copy:', '',
            '```python',
            "timm_reduce.save_pretrained(model, 'dense/', dense=True)  # or push_to_hub(model, repo_id, dense=True)",
            "dense = timm.create_model('local-dir:dense/', pretrained=True)  # stock timm, no plugin needed",
            '```', '',
            'or export it: `timm-reduce export DIR --format onnx` (runs with onnxruntime only).',
        ]
    if block.get('dense'):
        lines += ['', 'This is the dense (materialised) form of the reduced model: shared weights are stored once per '
                      'use, so it loads anywhere timm runs, with the outputs of the reduced model.']
    return lines


def render_model_card(model: nn.Module, config: dict[str, Any], repo_id: str | None = None) -> str:
    """The README.md text for a saved model.

    Args:
        model: the model exactly as stored (after `materialize` for a dense save).
        config: its config.json content; the `timm_reduce` block gives the recipe, versions, the size before
            reduction and user metadata (`description`, `license`, `base_model`, `datasets`, `calibration_data`,
            `accuracy`, anything else).
        repo_id: the Hub repository, used in the loading instructions; None for a local folder.
    """
    from ..summary import format_summary, summary

    block = dict(config.get('timm_reduce') or {})
    meta = user_metadata(block)
    try:
        info = summary(model)
    except Exception as e:  # MAC counting runs a forward pass; the card is still useful without MACs
        _logger.warning(f'Model card: could not count MACs ({e}); the card omits them.')
        info = summary(model, macs=False)
    base = block.get('base') or info['base']
    recipe = block.get('recipe', [])
    if 'params_before' in block:  # a plain-timm checkpoint forgets its recipe on load: the config remembers it
        info.update(params_before=block['params_before'], mlp_params_before=block['mlp_params_before'],
                    recipe=[_spec_text(step) for step in recipe])
    title = repo_id.split('/')[-1] if repo_id else f"{base} reduced with timm_reduce"
    steps = ' -> '.join(step['strategy'] for step in recipe) or 'no reduction'
    lines = [CARD_MARKER, f'# {title}', '']
    if meta.get('description'):
        lines += [str(meta['description']), '']
    lines += [f'A timm `{base}` made smaller with [timm_reduce](https://pypi.org/project/timm_reduce/) ({steps}).', '']
    lines += ['## Size', '', '| | before | after | after / before |', '|---|---:|---:|---:|']
    lines += [f'| {name} | {_fmt(b)} | {_fmt(a)} | {_ratio(a, b)} |' for name, b, a in _size_rows(info, block)]
    if 'macs' in info:
        lines.append(f"| MACs per image | | {_fmt(info['macs'])} | |")
    lines += ['', '## Recipe', '', *_recipe_lines(recipe), '']
    if 'calibration_data' in meta:
        lines += ['## Calibration data', '', *_value_lines(meta['calibration_data']), '']
    if 'accuracy' in meta:
        lines += ['## Evaluation', '', *_accuracy_lines(meta['accuracy']), '']
    lines += _loading_lines(config, block, repo_id)
    others = {k: v for k, v in meta.items() if k not in _CARD_KEYS}
    if others:
        lines += ['', '## Other metadata', '', *_value_lines(others)]
    lines += ['', '## Details', '', '```text', format_summary(info), '```', '',
              f"Saved with timm_reduce {block.get('version', '?')}, timm {block.get('timm_version', '?')}, "
              f"torch {block.get('torch_version', '?')}.", '']
    return _front_matter(config, block, meta) + '\n'.join(lines)
