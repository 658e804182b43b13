"""`timm-reduce compress`: reduce a timm model and calibrate it block-wise on a folder or tar of images."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ReduceError
from ._common import load_model, parse_kv

# CLI flags that are options of some strategies only: flag attribute -> option name
_STRATEGY_FLAGS = {'budget': 'budget', 'sparsity': 'sparsity', 'group_size': 'group_size', 'sparsifier': 'sparsifier'}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        'compress', help='reduce a model and calibrate it block-wise on images (e.g. FiPS)',
        description='Reduce a timm model with a strategy, then refit its MLPs so that every block reproduces the '
                    'original block on calibration images. Example: timm-reduce compress --model deit_base_patch16_224 '
                    '--pretrained --strategy fips --budget 0.25 --sparsity 0.75 --group-size 4 '
                    '--calib-data imagenet/train --output out/')
    src = p.add_argument_group('model')
    src.add_argument('--model', help='timm model name (optional when --checkpoint is a save_pretrained folder)')
    src.add_argument('--pretrained', action='store_true', help="load timm's pretrained weights for --model")
    src.add_argument('--checkpoint', help='a save_pretrained folder (config.json + weights) or a weights file')
    src.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                     help='timm create_model kwargs, e.g. img_size=32 num_classes=10')
    red = p.add_argument_group('reduction')
    red.add_argument('--strategy', required=True, help='strategy name (see `timm-reduce info`), e.g. fips')
    red.add_argument('--budget', type=float, help='fraction of the MLP weights kept (strategies with `budget`)')
    red.add_argument('--sparsity', type=float, help='final sparsity of the sparse factors (strategies with `sparsity`)')
    red.add_argument('--group-size', type=int, help='blocks per group (strategies with `group_size`)')
    red.add_argument('--sparsifier', help='sparsity schedule, e.g. gmp, rigl, static (strategies with `sparsifier`)')
    red.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', action='extend',
                     help='any other strategy or calibration option, e.g. --set beta=32 lr=2e-4 cache=bf16')
    cal = p.add_argument_group('calibration')
    cal.add_argument('--calib-data', required=True, help='image folder (class sub-folders) or .tar read by timm')
    cal.add_argument('--calib-batches', type=int, default=30, help='batches in the calibration set (default 30)')
    cal.add_argument('--batch-size', type=int, default=128, help='images per batch (default 128)')
    cal.add_argument('--epochs', type=int, default=20, help='calibration epochs (default 20)')
    cal.add_argument('--lr', type=float, default=None, help='peak learning rate (default: the engine default)')
    cal.add_argument('--seed', type=int, default=0, help='seed for the image subset and the calibration')
    cal.add_argument('--cache', choices=('auto', 'none', 'bf16', 'fp32'), default='auto',
                     help='keep teacher activations in memory instead of recomputing them (default auto: fp32 when '
                          'it fits --set cache_limit_gb=..., else bf16, else none)')
    cal.add_argument('--amp', choices=('bf16', 'fp16'), default=None,
                     help='mixed precision forwards (autocast; fp16 with loss scaling); default: none')
    cal.add_argument('--checkpoint-dir', help='write per-epoch checkpoints here and resume from them')
    cal.add_argument('--resume', choices=('auto', 'must', 'restart'), default='auto',
                     help='the checkpoint in --checkpoint-dir: auto (default) resumes a valid one and refuses a bad '
                          'one, must also refuses to start without one, restart ignores it and starts afresh')
    cal.add_argument('--workers', type=int, default=2, help='data loader workers (default 2)')
    cal.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    cal.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--output', required=True, help='folder for the compressed model (save_pretrained format)')
    p.set_defaults(func=run)


def _loader(model: nn.Module, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    import timm.data

    root = Path(args.calib_data)
    if not root.exists():
        raise ReduceError(f'--calib-data {root} does not exist (give an image folder or a .tar).')
    if args.batch_size < 1 or args.calib_batches < 1:
        raise ReduceError('--batch-size and --calib-batches must be >= 1.')
    dataset = timm.data.create_dataset('', root=str(root))
    from ..summary import model_input_size

    config = timm.data.resolve_data_config(model=model)
    config['input_size'] = model_input_size(model)  # the size the model was built for (img_size overrides)
    dataset.transform = timm.data.create_transform(**config, is_training=False)
    if len(dataset) == 0:
        raise ReduceError(f'--calib-data {root} holds no images.')
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed), drop_last=len(dataset) >= args.batch_size)


def _init_distributed(device: str) -> tuple[int, int]:
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.distributed.is_initialized():
        if device.startswith('cuda'):  # one GPU per rank; NCCL's barrier and collectives use the current device
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        torch.distributed.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def run(args: argparse.Namespace) -> int:
    from .. import save_pretrained, summary
    from ..calibration import CalibrationConfig, calibration_report, compress
    from ..core.registry import get_strategy
    from ..persistence.serialization import check_saveable

    strategy = get_strategy(args.strategy)
    options: dict[str, Any] = {}
    for attr, name in _STRATEGY_FLAGS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        if name not in strategy.option_names:
            flag = '--' + attr.replace('_', '-')
            raise ReduceError(f'{flag} does not apply to strategy {args.strategy!r}; its options are '
                              f'{", ".join(strategy.option_names)} (set them with --set key=value).')
        options[name] = value
    extra = parse_kv(args.set, '--set option')
    calib_names = set(CalibrationConfig.option_names())
    for key in extra:
        if key not in calib_names and key not in strategy.option_names:
            raise ReduceError(f'--set {key}=...: not an option of strategy {args.strategy!r} '
                              f'({", ".join(strategy.option_names)}) nor a calibration option '
                              f'({", ".join(sorted(calib_names - {"callback", "progress"}))}).')
    options.update(extra)
    options.update(epochs=args.epochs, batches=args.calib_batches, seed=args.seed, cache=args.cache,
                   progress=not args.no_progress)
    if args.lr is not None:
        options['lr'] = args.lr
    if args.checkpoint_dir:
        options['checkpoint_dir'] = args.checkpoint_dir
    options['resume'] = args.resume  # must / restart without --checkpoint-dir: refused by CalibrationConfig
    if args.amp:
        options['amp'] = args.amp

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world = _init_distributed(device)
    if device == 'cuda' and world > 1:
        device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
    model = load_model(args.model, args.pretrained, args.checkpoint,
                       parse_kv(args.model_kwargs, '--model-kwargs item')).to(device)
    check_saveable(model)  # the result is saved: refuse now, not after the calibration
    loader = _loader(model, args)
    before = summary(model, macs=False)
    tic = time.perf_counter()
    compress(model, args.strategy, data=loader, **options)
    elapsed = time.perf_counter() - tic
    report = calibration_report(model)
    if rank == 0:
        model.cpu()
        after = summary(model, macs=False)
        save_pretrained(model, args.output, metadata={'calibration': {
            'epochs': report.epochs_done, 'batches': report.batches, 'images': report.images,
            'epoch_loss': report.epoch_loss, 'seconds': round(elapsed, 2)}})
        print(report.format())
        print(f"params         {before['unique_params']:,} -> {after['unique_params']:,} "
              f"({after['unique_params'] / before['unique_params']:.1%})")
        print(f"MLP params     {before['mlp_params']:,} -> {after['mlp_params']:,} "
              f"({after['mlp_params'] / before['mlp_params']:.1%})")
        print(f"bytes at rest  {before['bytes']:,} -> {after['bytes']:,} ({after['bytes'] / before['bytes']:.1%})")
        print(f'time           {elapsed:.1f} s')
        print(f'saved to       {args.output}')
        (Path(args.output) / 'calibration_report.json').write_text(json.dumps(report.to_dict(), indent=2))
    if world > 1:
        torch.distributed.barrier()
    return 0
