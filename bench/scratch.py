"""From-scratch check of the seed claim "GroupedMLP and ShallowMLP vs baseline with the same budget of epochs".

Trains a small ViT on real CIFAR-10 JPEGs with the project's train.py, once per strategy and seed, with one recipe
(only the --reduction-spec differs), evaluates on all 10,000 test images and reports mean and spread per strategy.
Runs go one after the other (strategies interleaved per seed) and the result files are rewritten after every run,
so an interrupted benchmark keeps what finished; a rerun skips runs already in the result file with the same recipe.

    python bench/scratch.py --dim 96 --steps-per-epoch 80 --epochs 1 --seeds 0 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# the repository root first: this checkout's timm_reduce, not another editable install
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from common import DATA, RESULTS, ROOT, header, md_preamble, md_table, write_results  # noqa: E402

# strategy -> --reduction-spec (None: plain timm); the seed paper's from-scratch settings
STRATEGIES: dict[str, str | None] = {
    'baseline': None,
    'grouped': 'grouped:group_size=2,init=scale',      # paper: shared fc1 w/b and fc2 w scaled by 1/sqrt(2)
    'shallow': 'shallow:keep=0.5,importance=first',    # paper: first half of the hidden units
}


def train_command(args: argparse.Namespace, strategy: str, seed: int, out_root: Path) -> list[str]:
    cmd = [
        sys.executable, str(ROOT / 'train.py'), str(args.data), '--train-split', 'train.tar', '--val-split', 'val.tar',
        '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', f'patch_size={args.patch}',
        f'embed_dim={args.dim}', f'depth={args.depth}', f'num_heads={args.heads}', 'mlp_ratio=4', '--num-classes', '10',
        '--device', 'cpu', '--workers', '1', '-b', str(args.batch_size), '-vb', '500', '--opt', 'adamw',
        '--lr', str(args.lr), '--weight-decay', '0.05', '--clip-grad', '1.0', '--sched', 'cosine', '--sched-on-updates',
        '--epochs', str(args.epochs), '--warmup-epochs', str(args.warmup_epochs), '--warmup-lr', '1e-5',
        '--min-lr', '1e-5', '--smoothing', '0.1', '--scale', '0.6', '1.0', '--hflip', '0.5', '--color-jitter', '0',
        '--crop-pct', '1.0', '--mean', '0.4914', '0.4822', '0.4465', '--std', '0.2470', '0.2435', '0.2616',
        '--seed', str(seed), '--log-interval', '20', '--checkpoint-hist', '1',
        '--output', str(out_root), '--experiment', f'{strategy}-s{seed}',
    ]
    if args.steps_per_epoch:
        cmd += ['--max-steps-per-epoch', str(args.steps_per_epoch)]
    if STRATEGIES[strategy] is not None:
        cmd += ['--reduction-spec', STRATEGIES[strategy]]
    return cmd


def model_counts(model_dir: Path) -> dict[str, int]:
    import timm
    import timm_reduce

    model = timm.create_model(f'local-dir:{model_dir}', pretrained=True)
    info = timm_reduce.summary(model, macs=False)
    return {k: info[k] for k in ('params', 'unique_params', 'params_before', 'mlp_params', 'mlp_params_before')}


def run_one(args: argparse.Namespace, strategy: str, seed: int, out_root: Path) -> dict[str, Any]:
    cmd = train_command(args, strategy, seed, out_root)
    run_dir = out_root / f'{strategy}-s{seed}'
    if run_dir.exists():
        subprocess.run(['rm', '-rf', str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    print(f'[{time.strftime("%H:%M:%S")}] {strategy} seed {seed}: {" ".join(cmd[1:])}', flush=True)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    with open(out_root / f'{strategy}-s{seed}.log', 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f'train.py failed ({proc.returncode}); see {out_root / f"{strategy}-s{seed}.log"}')
    with open(run_dir / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    result = {
        'strategy': strategy, 'spec': STRATEGIES[strategy], 'seed': seed, 'wall_seconds': round(wall, 1),
        'final_top1': float(last['eval_top1']), 'final_top5': float(last['eval_top5']),
        'final_eval_loss': float(last['eval_loss']), 'epochs': len(rows),
        'command': ' '.join(['python', 'train.py', *cmd[2:]]),
        **model_counts(run_dir / 'model'),
    }
    print(f'[{time.strftime("%H:%M:%S")}] -> top-1 {result["final_top1"]:.2f}% in {wall:.0f}s', flush=True)
    return result


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for strategy in STRATEGIES:
        mine = [r for r in runs if r['strategy'] == strategy]
        if not mine:
            continue
        top1 = [r['final_top1'] for r in mine]
        rows.append({
            'strategy': strategy, 'spec': STRATEGIES[strategy] or '(none)', 'runs': len(mine),
            'seeds': [r['seed'] for r in mine], 'top1': top1, 'mean_top1': statistics.mean(top1),
            'spread_top1': max(top1) - min(top1), 'unique_params': mine[0]['unique_params'],
            'params_before': mine[0]['params_before'], 'mlp_params': mine[0]['mlp_params'],
            'mean_wall_seconds': statistics.mean(r['wall_seconds'] for r in mine),
        })
    return rows


def markdown(info: dict[str, Any]) -> str:
    # relative to the baseline run (a uniform shallow model reloads as plain timm and forgets its params_before)
    ref = {r['strategy']: r for r in info['summary']}.get('baseline', {}).get('unique_params')
    rows = [[r['strategy'], f"`{r['spec']}`",
             f"{r['unique_params']:,}" + (f" ({r['unique_params'] / ref:.1%})" if ref else ''),
             f"{r['mlp_params']:,}", r['runs'], ', '.join(f'{t:.2f}' for t in r['top1']),
             f"{r['mean_top1']:.2f} ± {r['spread_top1'] / 2:.2f}", f"{r['mean_wall_seconds']:.0f}"]
            for r in info['summary']]
    columns = ['strategy', 'reduction', 'unique params (vs baseline)', 'MLP params', 'runs', 'top-1 per seed (%)',
               'mean ± half-range (%)', 'wall s/run']
    table = md_table(columns, rows)
    s = info['setup']
    text = (f"Small ViT (img 32, patch {s.get('patch', 4)}, dim {s['dim']}, depth {s['depth']}, {s['heads']} heads, "
            f"mlp_ratio 4) trained from scratch on CIFAR-10 with train.py: {s['epochs']} epoch(s) of "
            f"{s['steps_per_epoch'] or 'all'} steps × batch {s['batch_size']}, AdamW lr {s['lr']}, cosine; "
            f"top-1 on all 10,000 test images after the last epoch. Per-run commands are in the JSON file."
            + (f" {s['jobs']} run(s) at a time, OMP_NUM_THREADS={s['threads']}." if 'jobs' in s else '') + "\n\n")
    return text + table + '\n\n' + info.get('verdict', '') + '\n'


def verdict(summary: list[dict[str, Any]]) -> str:
    by = {r['strategy']: r for r in summary}
    if not all(k in by for k in STRATEGIES):
        return 'Incomplete: not every strategy has finished runs.'
    g, s, b = (by[k]['mean_top1'] for k in ('grouped', 'shallow', 'baseline'))
    noise = max(by[k]['spread_top1'] for k in STRATEGIES)
    holds = g >= s >= b
    return (f"Seed ordering grouped ≥ shallow ≥ baseline: {'holds' if holds else 'does not hold'} here "
            f"(grouped {g:.2f}, shallow {s:.2f}, baseline {b:.2f}; largest seed-to-seed range {noise:.2f} points"
            f"{', so differences below that are within noise' if noise else ''}).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', type=Path, default=DATA)
    p.add_argument('--patch', type=int, default=4)
    p.add_argument('--dim', type=int, default=96)
    p.add_argument('--depth', type=int, default=6)
    p.add_argument('--heads', type=int, default=3)
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--steps-per-epoch', type=int, default=80, help='0 = the full 50,000-image train set')
    p.add_argument('--warmup-epochs', type=float, default=0.1)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--strategies', nargs='+', default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument('--runs-dir', type=Path, default=ROOT / 'bench' / 'runs' / 'scratch')
    p.add_argument('--name', default='scratch')
    p.add_argument('--threads', type=int, default=None,
                   help='OMP_NUM_THREADS of each training process (1 is far faster on a shared machine)')
    p.add_argument('--jobs', type=int, default=1, help='training runs at once (e.g. 2 single-threaded runs)')
    p.add_argument('--fresh', action='store_true', help='rerun every run, even those already in the result file')
    p.add_argument('--table-only', action='store_true', help='rewrite the .md of the existing result file, run nothing')
    args = p.parse_args()
    if args.table_only:
        info = json.loads((RESULTS / f'{args.name}.json').read_text())
        (RESULTS / f'{args.name}.md').write_text(f'### {args.name}\n\n' + md_preamble(info) + '\n' + markdown(info))
        print(markdown(info))
        return

    info = header(args.name)
    setup = {k: getattr(args, k) for k in ('dim', 'depth', 'heads', 'epochs', 'steps_per_epoch', 'warmup_epochs',
                                           'batch_size', 'lr')}
    if args.patch != 4:  # recorded only when not the default, so older result files still match
        setup['patch'] = args.patch
    if args.threads or args.jobs != 1:
        setup.update(threads=args.threads, jobs=args.jobs)
    info['setup'] = setup
    old_path = RESULTS / f'{args.name}.json'
    runs: list[dict[str, Any]] = []
    if old_path.exists() and not args.fresh:
        old = json.loads(old_path.read_text())
        if old.get('setup') == setup:
            runs = old.get('runs', [])
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in args.seeds:
        for strategy in args.strategies:
            if any(r['strategy'] == strategy and r['seed'] == seed for r in runs):
                print(f'{strategy} seed {seed}: already in {old_path.name}, skipped')
            else:
                todo.append((strategy, seed))
    lock = threading.Lock()

    def one(job: tuple[str, int]) -> None:
        result = run_one(args, job[0], job[1], args.runs_dir)
        with lock:  # save as runs finish
            runs.append(result)
            info['runs'] = runs
            info['summary'] = aggregate(runs)
            info['verdict'] = verdict(info['summary'])
            write_results(args.name, info, markdown(info))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one, job) for job in todo]:
            future.result()
    info['runs'] = runs
    info['summary'] = aggregate(runs)
    info['verdict'] = verdict(info['summary'])
    write_results(args.name, info, markdown(info))
    print(markdown(info))


if __name__ == '__main__':
    main()
