"""`timm-reduce eval DIR --data PATH`: top-1 / top-5 on an image folder or tar."""
from __future__ import annotations

import argparse
import json
import sys

from ._common import is_saved_folder, load_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('eval', help='top-1/top-5 of a model on an image folder or .tar')
    p.add_argument('model', help='folder written by save_pretrained (or a timm model name)')
    p.add_argument('--data', required=True, help='image folder or .tar with one sub-folder per class, or a folder '
                                                  'holding splits (val.tar, val/, ...)')
    p.add_argument('--split', default=None, help='split to read inside --data (default: its validation split if any)')
    p.add_argument('--pretrained', action='store_true', help="with a timm model name: timm's pretrained weights")
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--limit', type=int, default=None, help='evaluate only the first N images')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import eval_loader, evaluate

    model = load_model(args.model, pretrained=args.pretrained)
    if not args.pretrained and not (is_saved_folder(args.model) or args.model.startswith(('local-dir:', 'hf-hub:'))):
        print(f'timm-reduce eval: warning: {args.model} is a bare architecture with random weights; pass a saved '
              f'folder, or --pretrained for timm\'s weights.', file=sys.stderr)
    loader = eval_loader(model, args.data, args.batch_size, args.workers, args.limit, args.split)
    result = evaluate(model, loader, progress=True)
    if args.json:
        print(json.dumps(vars(result)))
    else:
        print(f'top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  on {result.images:,} images '
              f'({result.images / result.seconds:.0f} img/s)')
    return 0
