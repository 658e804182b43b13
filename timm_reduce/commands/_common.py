"""Helpers shared by the CLI subcommands: model sources and key=value options."""
from __future__ import annotations

import argparse
import os
from typing import Any

from torch import nn

from ..errors import ReduceError
from ..spec import parse_value


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


def is_saved_folder(source: str) -> bool:
    return os.path.isdir(source) and os.path.isfile(os.path.join(source, 'config.json'))


def load_model(source: str, pretrained: bool = False, checkpoint: str | None = None,
               model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A model from a timm name, a save_pretrained folder or a `local-dir:`/`hf-hub:` id, plus optional weights."""
    import timm

    from ..serialization import load_reduced_state, read_weights

    model_kwargs = model_kwargs or {}
    if is_saved_folder(source):
        model = timm.create_model(f'local-dir:{source}', pretrained=True, **model_kwargs)
    elif source.startswith(('local-dir:', 'hf-hub:')):
        model = timm.create_model(source, pretrained=True, **model_kwargs)
    elif os.path.exists(source):
        raise ReduceError(f'{source} is not a folder written by save_pretrained (no config.json in it).')
    else:
        if not timm.is_model(source):
            raise ReduceError(f'Unknown timm model {source!r} (see timm.list_models()).')
        model = timm.create_model(source, pretrained=pretrained, **model_kwargs)
    if checkpoint:
        state = read_weights(checkpoint)
        load_reduced_state(model, state, checkpoint)
    return model
