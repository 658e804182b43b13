"""The `timm-reduce` command. Subcommands live beside this module in `timm_reduce/cli/`, one module each
(`add_parser(subparsers)`), discovered here."""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from pathlib import Path

from ..version import __version__
from ..errors import ReduceError

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-reduce', description='Make timm vision transformers smaller: share, prune and decompose MLPs.')
    parser.add_argument('--version', action='version', version=f'timm_reduce {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true', help='log at INFO level')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name.startswith('_') or info.name == 'main':
            continue
        module = importlib.import_module(f'{__package__}.{info.name}')
        module.add_parser(sub)
    return parser


def _os_error_text(error: OSError) -> str:
    if error.strerror and error.filename:
        return f'{error.strerror}: {error.filename}'
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s %(message)s')
    try:
        return int(args.func(args) or 0)
    except ReduceError as e:
        print(f'timm-reduce {args.command}: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # read-only folder, disk full, a file where a folder is expected, ...
        print(f'timm-reduce {args.command}: error: {_os_error_text(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'timm-reduce {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
