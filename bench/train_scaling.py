#!/usr/bin/env python3
"""Training images/s of `train.py` on 1 process vs `distributed_train.sh 2` (CPU, gloo), side by side.

Runs each configuration `--repeats` times, alternating, for `--steps` updates of `--batch-size` images per process
(same per-process batch: weak scaling), and reads `train_img_per_sec` (all ranks, data loading included, first
update excluded) from each run's summary.csv. Writes bench/results/train_scaling.json and prints a Markdown table.

    python bench/train_scaling.py ../shared/data/cifar10 --train-split train.tar
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=128',
         'depth=6', 'num_heads=4', 'mlp_ratio=4', '--num-classes', '10']


def _run(cmd: list[str], run_dir: Path, env_extra: dict[str, str]) -> float:
    env = {**os.environ, 'PYTHONPATH': str(REPO), **env_extra}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}')
    with open(run_dir / 'summary.csv') as f:
        return float(next(csv.DictReader(f))['train_img_per_sec'])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data_dir')
    p.add_argument('--train-split', default='train')
    p.add_argument('--steps', type=int, default=15, help='updates per run (the first is not timed)')
    p.add_argument('--batch-size', type=int, default=128, help='per process')
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--workers', type=int, default=1, help='data loading processes per training process')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'train_scaling.json'))
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix='train_scaling_'))
    common = [str(Path(args.data_dir).resolve()), '--train-split', args.train_split, '--val-split', '', *MODEL,
              '--device', 'cpu', '-b', str(args.batch_size), '--workers', str(args.workers), '--opt', 'adamw',
              '--lr', '1e-3', '--epochs', '1', '--warmup-epochs', '0', '--max-steps-per-epoch', str(args.steps),
              '--log-interval', '1000', '--output', str(tmp)]
    # torch's default is one thread per core; torchrun sets OMP_NUM_THREADS=1 per process. Both 1-process
    # settings are measured because on a shared machine a 2-thread process can stall on its own thread barrier.
    configs = {
        '1 process, 2 threads': ([sys.executable, 'train.py'], {'OMP_NUM_THREADS': '2'}),
        '1 process, 1 thread': ([sys.executable, 'train.py'], {'OMP_NUM_THREADS': '1'}),
        'distributed_train.sh 2 (1 thread each)': (['./distributed_train.sh', '2'], {}),
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    commands = {}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for i, (name, (launcher, env)) in enumerate(configs.items()):
            exp = f'r{r}_{i}'
            cmd = [*launcher, *common, '--experiment', exp]
            commands[name] = ' '.join([*(f'{k}={v}' for k, v in env.items()), shlex.join([*launcher, *common])])
            results[name].append(_run(cmd, tmp / exp, env))
            print(f'{name}: {results[name][-1]:.1f} img/s', flush=True)
    medians = {name: statistics.median(v) for name, v in results.items()}
    two = medians['distributed_train.sh 2 (1 thread each)']
    ratios = {f'2 processes / {name}': two / value for name, value in medians.items() if name.startswith('1 process')}
    report = {
        'benchmark': 'train.py images/s, 1 process vs distributed_train.sh 2 (CPU, gloo)',
        'command': shlex.join([sys.executable, *sys.argv]),
        'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'torch': torch.__version__,
                    'load_average_before': load_before, 'load_average_after': os.getloadavg()},
        'date_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'settings': {'steps': args.steps, 'batch_size_per_process': args.batch_size, 'repeats': args.repeats,
                     'workers': args.workers},
        'train_commands': commands,
        'img_per_sec': results,
        'median_img_per_sec': medians,
        'ratios': ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print('\n| launcher | images/s (median of %d) |\n|---|---|' % args.repeats)
    for name, value in medians.items():
        print(f'| {name} | {value:.1f} |')
    for name, value in ratios.items():
        print(f'{name}: {value:.2f}')
    print(f'-> {out}')


if __name__ == '__main__':
    main()
