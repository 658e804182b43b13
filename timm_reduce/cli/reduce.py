"""`timm-reduce reduce`: apply a strategy to a timm model and save the result."""
from __future__ import annotations

import argparse
import time

from ._common import add_model_args, load_model, parse_kv


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..core.registry import list_strategies

    p = subparsers.add_parser('reduce', help='apply a reduction strategy and save the reduced model')
    add_model_args(p)
    p.add_argument('--strategy', required=True, help=f'one of: {", ".join(list_strategies())}')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', dest='options',
                   help='strategy options, e.g. group_size=2 init=mean')
    p.add_argument('--output', required=True, help='folder to write config.json + model.safetensors to')
    p.add_argument('--dense', action='store_true', help='save a plain timm model that loads without timm_reduce')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.api import reduce
    from ..persistence.serialization import save_pretrained
    from ..summary import format_summary, summary

    model = load_model(args.model, args.pretrained, args.checkpoint, parse_kv(args.model_kwargs, 'model kwarg'))
    before = summary(model, macs=False)
    start = time.perf_counter()
    reduce(model, args.strategy, **parse_kv(args.options))
    elapsed = time.perf_counter() - start
    save_pretrained(model, args.output, dense=args.dense)
    after = summary(model)
    print(format_summary(after))
    print(f'\nunique params {before["unique_params"]:,} -> {after["unique_params"]:,}; '
          f'bytes {before["bytes"]:,} -> {after["bytes"]:,}; reduced in {elapsed:.2f}s; saved to {args.output}')
    return 0
