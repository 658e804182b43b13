"""`timm-reduce demo`: reduce a small ViT trained on real digits, with no download."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('demo', help='one-minute tour: train a tiny ViT on digits, reduce it every way')
    p.add_argument('--epochs', type=int, default=30, help='training epochs of the small ViT')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed)
    return 0
