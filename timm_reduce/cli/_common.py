"""Helpers shared by the CLI subcommands: model sources and key=value options."""
from __future__ import annotations

import argparse
import os
from typing import Any

from torch import nn

from ..errors import ReduceError
from ..core.spec import parse_value


def parse_kv(items: list[str] | None, what: str = 'option') -> dict[str, Any]:
    """`['a=1', 'b=x']` -> `{'a': 1, 'b': 'x'}` (values parsed as JSON where possible)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ReduceError(f'Expected {what} as key=value, got {item!r}.')
        out[key.replace('-', '_')] = parse_value(value)
    return out


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True,
                        help='timm model name, a folder written by save_pretrained, or local-dir:/hf-hub: id')
    src = parser.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help="load timm's pretrained weights (needs the Hub)")
    src.add_argument('--checkpoint', help='weights to load: .safetensors, a torch/timm checkpoint, or a saved folder')
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                        help='timm model kwargs, e.g. num_classes=10 img_size=32')


def looks_like_path(source: str) -> bool:
    """True for text that can only be meant as a path (timm model names hold no separator and no leading dot)."""
    return os.sep in source or '/' in source or source.startswith(('.', '~'))


def is_saved_folder(source: str) -> bool:
    return os.path.isdir(source) and os.path.isfile(os.path.join(source, 'config.json'))


def load_model(source: str | None, pretrained: bool = False, checkpoint: str | None = None,
               model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The model of a subcommand: a timm name, a save_pretrained folder or a `local-dir:`/`hf-hub:` id, plus
    optional weights (`checkpoint`: a weights file or a saved folder). With `source=None`, `checkpoint` must be a
    saved folder, which then is the model.
    """
    import timm

    from ..persistence.serialization import load_pretrained, load_reduced_state, read_weights

    kwargs = model_kwargs or {}
    if pretrained and checkpoint:
        raise ReduceError('Use either --pretrained (timm weights) or --checkpoint PATH, not both.')
    if source is None:
        if checkpoint and is_saved_folder(checkpoint):
            return load_pretrained(checkpoint, **kwargs)
        if checkpoint and os.path.isfile(checkpoint):
            raise ReduceError(f'--checkpoint {checkpoint} is a weights file: give --model NAME to build the '
                              'architecture it fits.')
        if checkpoint:
            raise ReduceError(f'--checkpoint {checkpoint} is neither a weights file nor a folder written by '
                              'save_pretrained (config.json + model.safetensors).')
        raise ReduceError('Give --model NAME (with --pretrained or --checkpoint) or --checkpoint FOLDER.')
    if is_saved_folder(source) or source.startswith(('local-dir:', 'hf-hub:')):
        model = load_pretrained(source, **kwargs)
    elif os.path.exists(source):
        raise ReduceError(f'{source} is not a folder written by save_pretrained (no config.json in it).')
    elif looks_like_path(source):
        raise ReduceError(f'{source} does not exist (expected a folder written by save_pretrained, or a timm model '
                          f'name such as vit_small_patch16_224).')
    else:
        if not timm.is_model(source):
            raise ReduceError(f'Unknown timm model {source!r} (see timm.list_models()).')
        model = timm.create_model(source, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_reduced_state(model, read_weights(checkpoint), checkpoint)
    return model
