"""`timm-reduce info MODEL_OR_DIR`: parameters, bytes, MACs and the per-block table."""
from __future__ import annotations

import argparse
import json

from ._common import load_model, parse_kv


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('info', help='summarise a timm model or a saved (reduced) model folder')
    p.add_argument('model', help='timm model name or a folder written by save_pretrained')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help='timm model kwargs')
    p.add_argument('--no-blocks', action='store_true', help='omit the per-block table')
    p.add_argument('--json', action='store_true', help='print the summary as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..summary import format_summary, summary

    model = load_model(args.model, model_kwargs=parse_kv(args.model_kwargs, 'model kwarg'))
    info = summary(model)
    print(json.dumps(info, indent=2) if args.json else format_summary(info, blocks=not args.no_blocks))
    return 0
