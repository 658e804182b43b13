"""Ablation of issue 13 on a saved CIFAR-10 model: `recipe='paper'`, then each improvement added one at a time, then
all of them, for FiPS (5 / 10 / 25% MLP budget), ShallowMLP (keep = budget) and GroupedMLP (1 / group size), over
seeds and calibration set sizes. Top-1 on the CIFAR-10 test images and the time of every `compress` run.

Variants (calibration and strategy options on top of `recipe='paper'`; explicit options win over the recipe):
    paper      recipe='paper' + cache='none': GMP delta_t=50, RigL drop 0.3, weight decay 0.05, full before/after
               evaluation, teacher recomputed every step (the library before issue 13)
    +schedule  FiPS delta_t derived from the run (>= 20 updates before t_end), RigL drop_fraction 0.1 (FiPS only)
    +distill   `--distill-epochs` epochs of output-level distillation (KL to the original's logits, no labels)
    +speed     cache='auto' and eval_batches=4 (same weights as paper in fp32; time only)
    +student   inputs='student': each block fitted on the student's previous block output (item 3)
    +mix       inputs='mix': on the mean of the teacher's and the student's
    +init      init_from='activations': FiPS basis/factors and ShallowMLP importance from activation statistics (item 2)
    +alloc     allocation='sensitivity': FiPS ranks per group / ShallowMLP widths per block by measured sensitivity
    all        +schedule, +distill, +speed, +mix and +init together
    default    recipe='default': the library's defaults as they stand (no distillation unless it becomes one)
    default+distill  the defaults plus `--distill-epochs` epochs of distillation
    default-init     the defaults with init_from='weights' (what the data-aware init adds to the other defaults)
    default+alloc    the defaults with allocation='sensitivity' (item 5)
    default-alloc    the defaults with allocation='uniform' (the same as default+alloc's counterpart, whichever
                     allocation the defaults use)

Example (2 seeds, both calibration sizes, results in bench/results/compress_ablation.{json,md}):
    python bench/compress_ablation.py --model-dir bench/models/cifar10_vit --threads 2
    python bench/compress_ablation.py --quick          # a tiny grid in under a minute: a smoke check, not numbers
Runs already in the JSON are skipped (`--resume`), so an interrupted grid continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import timm.data
import timm_reduce
from timm_reduce.calibration import calibration_report
from timm_reduce.core.discovery import find_mlp_sites

from common import BENCH_MODEL, DATA, RESULTS, header, md_table, write_results
from compress_accuracy import load_images, load_model, stored_mlp_weights, top1

PAPER = {'recipe': 'paper', 'cache': 'none'}  # the paper's recipe as the library ran it before issue 13
ITEMS: dict[str, dict[str, Any]] = {  # issue 13's items that are options ('DISTILL': --distill-epochs)
    'schedule': {'delta_t': None, 'drop_fraction': 0.1},
    'distill': {'distill_epochs': 'DISTILL'},
    'speed': {'cache': 'auto', 'eval_batches': 4},
    'student': {'inputs': 'student'},
    'mix': {'inputs': 'mix'},
    'init': {'init_from': 'activations'},
    'alloc': {'allocation': 'sensitivity'},
}
# not part of 'all': 'student' lost to 'mix'; 'alloc' came after the 'all' results and is measured on the defaults
ALTERNATIVES = {'student', 'alloc'}
VARIANTS: dict[str, dict[str, Any]] = {
    'paper': PAPER,
    **{f'+{name}': {**PAPER, **options} for name, options in ITEMS.items()},
    'all': {k: v for name, options in (('paper', PAPER), *ITEMS.items()) if name not in ALTERNATIVES
            for k, v in options.items()},
    'default': {'recipe': 'default'},
    'default+distill': {'recipe': 'default', 'distill_epochs': 'DISTILL'},
    'default-init': {'recipe': 'default', 'init_from': 'weights'},
    'default+alloc': {'recipe': 'default', 'allocation': 'sensitivity'},
    'default-alloc': {'recipe': 'default', 'allocation': 'uniform'},
}
FIPS_ONLY = {'delta_t', 'drop_fraction'}  # options of FiPS: other strategies do not take them


def method_grid(args: argparse.Namespace) -> list[tuple[str, float, dict[str, Any]]]:
    """(strategy, nominal MLP budget, strategy options) of every method in the grid."""
    grid = []
    for strategy in args.strategies:
        if strategy == 'fips':
            grid += [('fips', b, {'budget': b, 'sparsifier': args.sparsifier,
                                  **({'group_size': args.group_size} if args.group_size else {})})
                     for b in args.budgets]
        elif strategy == 'shallow':
            grid += [('shallow', b, {'keep': b}) for b in args.budgets]
        elif strategy == 'grouped':
            grid += [('grouped', 1 / k, {'group_size': k}) for k in args.grouped_sizes]
        else:
            raise SystemExit(f'unknown strategy {strategy!r} (fips, shallow, grouped)')
    return grid


def variant_options(variant: str, strategy: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The options a variant adds for a strategy, or None when it equals 'paper' there (nothing to run)."""
    options = {k: (args.distill_epochs if v == 'DISTILL' else v) for k, v in VARIANTS[variant].items()}
    if strategy != 'fips':
        options = {k: v for k, v in options.items() if k not in FIPS_ONLY}
    if not timm_reduce.get_strategy(strategy).uses_statistics:
        options.pop('init_from', None)  # the strategy starts from its weights either way
    if 'allocation' not in timm_reduce.get_strategy(strategy).option_names:
        options.pop('allocation', None)
    if (variant != 'paper' and options == PAPER) or (variant != 'default' and options == VARIANTS['default']):
        return None  # the same run as 'paper' / 'default' for this strategy
    return options


def calibration_set(args: argparse.Namespace, model: torch.nn.Module, images: int, seed: int) -> list[torch.Tensor]:
    """A seeded random subset of `images` training images (the same for every variant of a seed), in batches."""
    root = str(Path(args.data) / 'train.tar')
    total = len(timm.data.create_dataset('', root=root))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:images].tolist()
    return list(load_images(root, model, order, Path(args.image_cache))[0].split(args.batch_size))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_json = out_dir / f'{args.name}.json'
    info = header(f'compress ablation ({args.name})')
    records: list[dict[str, Any]] = []
    if args.resume and out_json.is_file():
        records = json.loads(out_json.read_text())['runs']
    done = {(r['strategy'], r['budget'], r['variant'], r['calib_images'], r['seed']) for r in records}
    info.update(settings=dict(vars(args)), runs=records,
                variants={v: variant_options(v, 'fips', args) for v in args.variants})

    base = load_model(args.model_dir)
    val_root = str(Path(args.data) / 'val.tar')
    val_images, val_targets = load_images(val_root, base, list(range(args.val_limit)) if args.val_limit else None,
                                          Path(args.image_cache))
    tic = time.perf_counter()
    info['original'] = {'top1': top1(base, val_images, val_targets), 'val_images': len(val_images),
                        'eval_seconds': time.perf_counter() - tic}
    mlp_weights = sum(getattr(s.mlp, n).weight.numel() for s in find_mlp_sites(base) for n in ('fc1', 'fc2'))
    print(f"original: {info['original']['top1']:.2f}% on {len(val_images)} test images", flush=True)

    for images in args.calib_images:
        for seed in args.seeds:
            calib = None
            for strategy, budget, method_options in method_grid(args):
                for variant in args.variants:
                    options = variant_options(variant, strategy, args)
                    if options is None or (strategy, budget, variant, images, seed) in done:
                        continue
                    if calib is None:
                        calib = calibration_set(args, base, images, seed)
                    model = load_model(args.model_dir)
                    extra = {'lr': args.lr} if args.lr is not None else {}
                    tic = time.perf_counter()
                    timm_reduce.compress(model, strategy, data=calib, epochs=args.epochs, batches=len(calib),
                                         seed=seed, **extra, **method_options, **options)
                    seconds = time.perf_counter() - tic
                    report = calibration_report(model)
                    acc = top1(model, val_images, val_targets)
                    stored = stored_mlp_weights(model)
                    train = sum(report.epoch_time)
                    blockwise_steps = report.epochs_done * report.steps_per_epoch
                    record = {
                        'strategy': strategy, 'budget': budget, 'variant': variant, 'calib_images': images,
                        'seed': seed, 'options': {**method_options, **options}, 'top1': acc,
                        'delta_top1': acc - info['original']['top1'], 'stored_fraction': stored / mlp_weights,
                        'compress_seconds': seconds, 'train_seconds': train, 'train_fraction': train / seconds,
                        'seconds_per_blockwise_step': sum(report.epoch_time[:report.epochs_done]) / blockwise_steps,
                        'cache': report.cache, 'cache_reason': report.cache_reason, 'eval_batches': report.eval_batches,
                        'epoch_loss': report.epoch_loss, 'distill_loss': report.distill_loss,
                        'output_error_before': report.output_error_before,
                        'output_error_blockwise': report.output_error_blockwise,
                        'output_error_after': report.output_error_after,
                        'allocated': report.allocated,
                    }
                    records.append(record)
                    done.add((strategy, budget, variant, images, seed))
                    write_results(args.name, info, markdown(info), out_dir)
                    print(f'{strategy:<8} {budget:>6.1%} {variant:<10} {images:>5} img seed {seed}: top1 {acc:6.2f}% '
                          f'({record["delta_top1"]:+.2f}), stored {stored / mlp_weights:6.1%}, {seconds:6.1f} s '
                          f'({record["train_fraction"]:.0%} training)', flush=True)
    write_results(args.name, info, markdown(info), out_dir)
    print(f'wrote {out_json} and {out_json.with_suffix(".md")}')


def _cell(runs: list[dict[str, Any]], key: str, fmt: str) -> str:
    if not runs:
        return '–'
    values = [r[key] for r in runs]
    mean = statistics.fmean(values)
    spread = f' ± {(max(values) - min(values)) / 2:{fmt}}' if len(values) > 1 else ''
    return f'{mean:{fmt}}{spread}'


def markdown(info: dict[str, Any]) -> str:
    """Top-1 (mean ± half range over seeds), change against the original, and seconds per run."""
    runs, original = info['runs'], info['original']
    sizes = sorted({r['calib_images'] for r in runs})
    variants = [v for v in VARIANTS if any(r['variant'] == v for r in runs)]
    methods = sorted({(r['strategy'], r['budget']) for r in runs}, key=lambda m: (m[0], m[1]))
    columns = ['method', 'budget', 'variant'] + [f'{n} img: {c}' for n in sizes for c in ('top1', 'Δ', 's/run')]
    rows = []
    for strategy, budget in methods:
        for variant in variants:
            cells = []
            for n in sizes:
                sel = [r for r in runs if (r['strategy'], r['budget'], r['variant'], r['calib_images'])
                       == (strategy, budget, variant, n)]
                cells += [_cell(sel, 'top1', '.2f'), _cell(sel, 'delta_top1', '+.2f'), _cell(sel, 'compress_seconds',
                                                                                            '.1f')]
            if any(c != '–' for c in cells):
                rows.append([strategy, f'{budget:.0%}', variant, *cells])
    seeds = sorted({r['seed'] for r in runs})
    settings = info['settings']
    return '\n'.join([
        f"Original: {original['top1']:.2f}% top-1 on {original['val_images']:,} CIFAR-10 test images. "
        f"Seeds {seeds} (the seed picks the calibration images and the batch order); {settings['epochs']} block-wise "
        f"epochs, batches of {settings['batch_size']}, distillation {settings['distill_epochs']} epochs where a "
        f"variant adds it; {settings['threads']} thread(s). Top-1 and Δ: mean ± half the range over seeds; s/run: "
        f"wall time of `compress` (reduce + calibration + its evaluations).", '',
        md_table(columns, rows), '',
        'Variants (options passed to `compress`, FiPS; other strategies drop the FiPS-only ones): '
        + '; '.join(f'`{k}`: `{v}`' for k, v in info['variants'].items()), '',
        'Per run (stored fraction of the MLP weights, share of the time spent in training epochs, cache chosen):', '',
        md_table(['method', 'budget', 'variant', 'images', 'seed', 'top1', 'stored', 'training share', 'cache'],
                 [[r['strategy'], f"{r['budget']:.0%}", r['variant'], r['calib_images'], r['seed'],
                   f"{r['top1']:.2f}", f"{r['stored_fraction']:.1%}", f"{r['train_fraction']:.0%}", r['cache']]
                  for r in runs]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', default=str(BENCH_MODEL), help='a save_pretrained folder of a CIFAR-10 model')
    parser.add_argument('--data', default=str(DATA), help='folder with train.tar (calibration) and val.tar (accuracy)')
    parser.add_argument('--strategies', nargs='+', default=['fips', 'shallow', 'grouped'])
    parser.add_argument('--budgets', type=float, nargs='+', default=[0.05, 0.1, 0.25],
                        help='MLP budgets of fips, keep of shallow')
    parser.add_argument('--grouped-sizes', type=int, nargs='+', default=[2, 3], help='group sizes of grouped')
    parser.add_argument('--sparsifier', default='gmp', help='FiPS sparsifier (gmp, rigl, static)')
    parser.add_argument('--group-size', type=int, default=None, help='FiPS blocks per basis (default: the library)')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--calib-images', type=int, nargs='+', default=[1000, 3840])
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument('--epochs', type=int, default=20, help='block-wise epochs (the paper: 20)')
    parser.add_argument('--distill-epochs', type=int, default=10, help='distillation epochs of +distill and all')
    parser.add_argument('--lr', type=float, default=None, help='calibration lr (default: the library default)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads')
    parser.add_argument('--val-limit', type=int, default=0, help='the first N test images (0 = all 10,000)')
    parser.add_argument('--image-cache', default='/tmp/timm_reduce_bench', help='folder caching decoded images')
    parser.add_argument('--out-dir', default=str(RESULTS))
    parser.add_argument('--name', default='compress_ablation', help='result file name (JSON + Markdown)')
    parser.add_argument('--resume', action='store_true', help='skip runs already in the result file')
    parser.add_argument('--quick', action='store_true',
                        help='a tiny grid (fips 25%% and shallow 25%%, paper and all, 1 seed, 64 images, 1 epoch, '
                             '200 test images) written to a temporary folder: a smoke check, not a measurement')
    args = parser.parse_args()
    if args.quick:
        args.strategies, args.budgets, args.variants, args.seeds = ['fips', 'shallow'], [0.25], ['paper', 'all'], [0]
        args.calib_images, args.batch_size, args.epochs, args.distill_epochs = [64], 32, 1, 1
        args.val_limit, args.name = 200, 'compress_ablation_quick'
        if args.out_dir == str(RESULTS):
            args.out_dir = str(Path(tempfile.gettempdir()) / 'timm_reduce_bench' / 'ablation_quick')
    run(args)


if __name__ == '__main__':
    main()
