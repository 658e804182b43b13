#!/usr/bin/env python3
"""Table 4, cost of compression on the deit_small / deit_base shapes: SVD init time, calibration time per epoch,
peak memory (measured and the engine's formula) and the calibration loop's FLOP rate vs a matmul roof.

No pretrained weights can be downloaded here, so the models are timm's randomly initialised DeiTs: the cost of
`timm_reduce.compress` depends on the shapes, not on the weights. Each (shape, spec, cache) runs in a fresh process
(so its peak resident memory is its own) on random images; the parent measures the fp32 matmul roof on the same
number of threads before and after every run. A full calibration epoch of the paper's set (30 x 128 = 3,840
images) takes ~10-60 min per shape on 2 CPU cores, so each run times `--epochs` epochs of `--batches` batches and
the table extrapolates the last (steady) epoch linearly in images; the first epoch includes one step under
FlopCounterMode and is not used for timing.

    python bench/compress_cost.py                      # both shapes, ~20 min on 2 cores
    python bench/compress_cost.py --shapes deit_small_patch16_224 --batches 1 --epochs 2 --batch-size 8   # smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import ROOT, header, matmul_roof, md_table, reset_peak_rss, status_kib, write_results  # noqa: E402

PAPER_EPOCH_IMAGES = 30 * 128  # FiPS paper: 30 batches of 128 ImageNet images
DEFAULT_RUNS = ['fips:budget=0.25@none', 'fips:budget=0.25@bf16', 'fips:budget=0.25,sparsifier=rigl@none']


def measure_one(shape: str, spec: str, cache: str, args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: reduce + calibrate one model; times, FLOPs and peak memory as a dict."""
    import copy

    import timm

    import timm_reduce

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(shape, pretrained=False)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    data = [torch.randn(args.batch_size, *size) for _ in range(args.batches)]
    # page in the forward/backward kernels once, so the peak below is calibration memory, not library code
    teacher.requires_grad_(True)
    teacher(data[0][:2]).sum().backward()
    teacher.zero_grad(set_to_none=True)
    teacher.requires_grad_(False)

    rss_start = status_kib('VmRSS') * 1024
    if not reset_peak_rss():
        raise SystemExit('cannot reset the peak RSS (/proc/self/clear_refs is not writable)')
    tic = time.perf_counter()
    timm_reduce.reduce(model, spec)
    init_seconds = time.perf_counter() - tic
    report = timm_reduce.calibrate(model, teacher, data, epochs=args.epochs, batches=args.batches, cache=cache,
                                   count_flops=True, evaluate=False)
    peak = status_kib('VmHWM') * 1024 - rss_start
    return {
        'shape': shape, 'spec': spec, 'cache': cache, 'batch_size': args.batch_size, 'batches': args.batches,
        'epochs': args.epochs, 'threads': args.threads, 'init_seconds': init_seconds,
        'epoch_seconds': report.epoch_time, 'step_flops': report.step_flops, 'steps_per_epoch': report.steps_per_epoch,
        'images_per_epoch': report.images, 'trainable_params': report.trainable_params,
        'model_bytes': sum(p.numel() * p.element_size() for p in teacher.parameters()),
        'rss_start_bytes': rss_start, 'peak_rss_growth_bytes': peak, 'memory_formula': report.memory_estimate,
        'epoch_loss': report.epoch_loss,
    }


def derive(r: dict[str, Any], roof: float) -> dict[str, Any]:
    """Steady-epoch time, extrapolations and the loop's FLOP rate from one raw run."""
    epoch = r['epoch_seconds'][-1]
    per_image = epoch / r['images_per_epoch']
    rate = r['step_flops'] * r['steps_per_epoch'] / epoch / 1e9
    return {'seconds_per_image': per_image, 'paper_epoch_seconds': per_image * PAPER_EPOCH_IMAGES,
            'loop_gflops': rate, 'roof_gflops': roof, 'roof_fraction': rate / roof}


def run_child(shape: str, spec: str, cache: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, '--one', shape, spec, cache, '--batch-size', str(args.batch_size),
           '--batches', str(args.batches), '--epochs', str(args.epochs), '--threads', str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'run failed: {" ".join(cmd)}\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        f, mib = r['memory_formula'], 2 ** 20
        rows.append([
            r['shape'], f"`{r['spec']}`", r['cache'], f"{r['init_seconds']:.1f}",
            f"{r['epoch_seconds'][-1]:.1f} ({r['images_per_epoch']} img)", f"{r['paper_epoch_seconds'] / 60:.1f}",
            f"{r['peak_rss_growth_bytes'] / mib:,.0f}", f"{(f['total'] - f['images']) / mib:,.0f}",
            f"{r['model_bytes'] / mib:,.0f}", f"{r['loop_gflops']:.1f}", f"{r['roof_gflops']:.0f}",
            f"{r['roof_fraction']:.0%}",
        ])
    return md_table(['shape', 'spec', 'cache', 'SVD init (s)', 'steady epoch (s)', 'min per 3,840-img epoch',
                     'peak RSS growth (MiB)', 'formula w/o images (MiB)', 'model fp32 (MiB)', 'loop GFLOP/s',
                     'roof GFLOP/s', 'of roof'], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--shapes', nargs='+', default=['deit_small_patch16_224', 'deit_base_patch16_224'])
    p.add_argument('--runs', nargs='+', default=DEFAULT_RUNS, metavar='SPEC@CACHE',
                   help='reduction spec and calibration cache (none, bf16, fp32) per run')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--batches', type=int, default=2, help='calibration batches per epoch')
    p.add_argument('--epochs', type=int, default=2, help='>= 2: the last epoch is timed')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--name', default='compress_cost')
    p.add_argument('--one', nargs=3, metavar=('SHAPE', 'SPEC', 'CACHE'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epochs < 2:
        p.error('--epochs must be >= 2 (the first epoch counts FLOPs and is not timed)')
    if args.one:
        print(json.dumps(measure_one(*args.one, args)))
        return
    for run in args.runs:
        spec, sep, cache = run.rpartition('@')
        if not sep or cache not in ('none', 'bf16', 'fp32'):
            p.error(f'--runs entries are SPEC@CACHE with CACHE one of none, bf16, fp32; got {run!r}')

    torch.set_num_threads(args.threads)
    info = header(args.name)
    info['settings'] = {k: getattr(args, k) for k in ('shapes', 'runs', 'batch_size', 'batches', 'epochs', 'threads')}
    records: list[dict[str, Any]] = []
    for shape in args.shapes:
        for run in args.runs:
            spec, _, cache = run.rpartition('@')
            before = matmul_roof()['median']
            raw = run_child(shape, spec, cache, args)
            after = matmul_roof()['median']
            record = {**raw, **derive(raw, statistics.mean([before, after])), 'roof_before': before,
                      'roof_after': after}
            records.append(record)
            print(f"{shape} {spec} cache={cache}: init {raw['init_seconds']:.1f}s, epoch {raw['epoch_seconds'][-1]:.1f}s"
                  f" ({record['paper_epoch_seconds'] / 60:.1f} min per 3,840 images), "
                  f"{record['loop_gflops']:.1f} GFLOP/s = {record['roof_fraction']:.0%} of roof, "
                  f"peak +{raw['peak_rss_growth_bytes'] / 2 ** 20:.0f} MiB", flush=True)
    info['records'] = records
    body = (f"Randomly initialised timm models (cost depends on shapes only), random images, {args.threads} torch "
            f"thread(s); per run {args.epochs} epochs of {args.batches} batch(es) x {args.batch_size} images, the last "
            "epoch timed and extrapolated linearly to the FiPS paper's 3,840-image calibration epoch. 'SVD init' = "
            "`timm_reduce.reduce(model, spec)`. Peak RSS growth: VmHWM after reduce + calibrate minus VmRSS before "
            "(models and images already in memory), vs the engine's formula without its images term. Loop GFLOP/s: "
            "FLOPs of one step (FlopCounterMode) x steps / steady epoch time; roof: fp32 2048² matmul on the same "
            "threads, mean of before and after the run.\n\n" + table(records))
    write_results(args.name, info, body)


if __name__ == '__main__':
    main()
