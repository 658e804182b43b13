"""`timm-reduce export DIR --format onnx|torchscript`: export a saved model, checked against PyTorch."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ['add_parser']


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..persistence.export import EXPORT_FORMATS

    parser = subparsers.add_parser(
        'export', help='export a saved model to ONNX or TorchScript',
        description='Export the materialised (plain-layer) form of the model saved in DIR, then check the export '
                    'against the PyTorch model on random inputs (onnxruntime for ONNX) and report the largest '
                    'absolute output difference. The output file is written only if the check passes.')
    parser.add_argument('directory', metavar='DIR', help='folder written by save_pretrained / `timm-reduce compress`')
    parser.add_argument('--format', required=True, choices=EXPORT_FORMATS, help='export format')
    parser.add_argument('--output', default=None,
                        help='file to write (default: DIR/model.onnx or DIR/model.torchscript.pt)')
    parser.add_argument('--atol', type=float, default=1e-4, help='largest allowed output difference (default 1e-4)')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset version (default 17)')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..persistence.export import DEFAULT_FILENAMES, export_model
    from ..persistence.hub import load_folder

    model, _ = load_folder(args.directory)
    output = Path(args.output) if args.output else Path(args.directory) / DEFAULT_FILENAMES[args.format]
    result = export_model(model, output, args.format, atol=args.atol, opset=args.opset)
    graph = 'materialised model' if result.materialized else 'reduced model (it has no plain form)'
    print(f'exported {args.format} of the {graph} to {result.path}; max abs diff vs PyTorch '
          f'{result.max_abs_diff:.3g} (atol {result.atol:g}, input {list(result.input_shape)})')
    return 0
