"""The `timm-reduce` command line: `main.py` builds the parser; every other module here is one subcommand that
defines `add_parser(subparsers)` and sets `func=handler(args) -> int`."""
from .main import build_parser, main

__all__ = ['build_parser', 'main']
