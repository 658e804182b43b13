"""PNG plots from bench/results/*.json: accuracy vs stored MLP parameters, bytes at rest, speed ratio vs ceiling.

Only plots what the result files hold; a missing result file skips its plot (and says so).

    python bench/plots.py
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import common  # noqa: E402

RESULTS = common.RESULTS

ACCURACY_NAMES = {
    'fips_gmp': 'FiPS (GMP)', 'fips_rigl': 'FiPS (RigL)', 'fips_static': 'FiPS (static)',
    'fips_dense': 'FiPS (dense factors)', 'svd': 'per-layer truncated SVD', 'magnitude': 'magnitude pruning',
    'shallow_first': 'ShallowMLP (first-k)', 'shallow_magnitude': 'ShallowMLP (magnitude)',
    'grouped': 'GroupedMLP (pairs)',
}


def _load(name: str) -> Any | None:
    path = RESULTS / f'{name}.json'
    if not path.exists():
        print(f'skip: {path} does not exist')
        return None
    return json.loads(path.read_text())


def _save(fig: plt.Figure, name: str) -> None:
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)
    plt.close(fig)
    print(f'wrote {RESULTS / name}')


def plot_accuracy(records: list[dict[str, Any]]) -> None:
    """Top-1 vs stored MLP weights (fraction of the original's), one line per method; the original as a line."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    original = None
    for r in records:
        if r.get('calibrated') is False:  # reduce-only records: bench/nocalib.py plots those
            continue
        if r['method'] == 'original':
            original = r['top1']
        else:
            by_method[r['method']].append((100 * r['stored_fraction'], r['top1']))
    for method, points in by_method.items():
        points.sort()
        xs, ys = zip(*points)
        style = '-o' if method.startswith('fips') else '--s'
        ax.plot(xs, ys, style, label=ACCURACY_NAMES.get(method, method), markersize=4)
    if original is not None:
        ax.axhline(original, color='k', lw=1, ls=':', label=f'original ({original:.2f}%)')
    r0 = next((r for r in records if r['method'] != 'original'), records[0])
    ax.set_xlim(0, 105)
    ax.set_xlabel('stored MLP weights (% of the original model\'s)')
    ax.set_ylabel(f"top-1 on {r0.get('val_images', 10000):,} CIFAR-10 test images (%)")
    ax.set_title('Accuracy vs stored MLP parameters (benchmark ViT, calibrated, no fine-tuning)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    _save(fig, 'accuracy_vs_params.png')


def plot_nocalib(info: dict[str, Any]) -> None:
    """Top-1 right after reduce() vs stored MLP parameters, one marker per variant (FiPS budgets as a line)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    before = info['rows']['original']['stored_mlp_params']
    fips = sorted((100 * r['stored_mlp_params'] / before, r['top1']) for n, r in info['rows'].items()
                  if n.startswith('FiPS') and 'static' in n)
    if fips:
        ax.plot(*zip(*fips), '-o', label='FiPS, SVD init, 75% sparse (10/25/40/50%)')
    for name, r in info['rows'].items():
        if name == 'original':
            ax.axhline(r['top1'], color='k', lw=1, ls=':', label=f"original ({r['top1']:.2f}%)")
        elif not (name.startswith('FiPS') and 'static' in name):
            ax.plot([100 * r['stored_mlp_params'] / before], [r['top1']], 's', label=name)
    ax.set_xlim(0, 105)
    ax.set_xlabel("stored MLP parameters (% of the original model's)")
    ax.set_ylabel(f"top-1 on {info['images']:,} CIFAR-10 test images (%)")
    ax.set_title('Right after reduce(): no calibration, no fine-tuning (benchmark ViT)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower right')
    _save(fig, 'accuracy_nocalib.png')


def plot_scratch(info: dict[str, Any]) -> None:
    """From-scratch runs: top-1 per seed and mean vs unique parameters, per strategy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in info['summary']:
        x = row['unique_params'] / 1e3
        ax.scatter([x] * len(row['top1']), row['top1'], alpha=0.5)
        ax.errorbar([x], [row['mean_top1']], yerr=[[row['mean_top1'] - min(row['top1'])],
                                                   [max(row['top1']) - row['mean_top1']]],
                    fmt='D', capsize=4, label=f"{row['strategy']} ({row['mean_top1']:.2f}%)")
    s = info['setup']
    ax.set_xlabel('unique parameters (thousands)')
    ax.set_ylabel('top-1 on 10,000 CIFAR-10 test images (%)')
    steps = s['steps_per_epoch'] or 'all'
    ax.set_title(f"From scratch, same recipe ({s['epochs']} ep × {steps} steps × {s['batch_size']}), "
                 f"{len(info['runs']) // max(len(info['summary']), 1)} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, 'scratch_accuracy.png')


def plot_size(info: dict[str, Any]) -> None:
    """Bytes at rest per variant, as a horizontal bar chart with the fraction of the original."""
    rows = info['rows']
    names = list(rows)
    orig = rows['original']['bytes']
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.2))
    values = [rows[n]['bytes'] / 2 ** 20 for n in names]
    colors = ['#555' if n == 'original' else ('#2a7' if n.startswith('FiPS') else '#37c') for n in names]
    ax.barh(names, values, color=colors)
    for i, n in enumerate(names):
        ax.text(values[i], i, f" {rows[n]['bytes'] / orig:.0%}", va='center', fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('bytes at rest: model.safetensors + config.json (MiB)')
    ax.set_title(f"Size at rest — {info['model']}", fontsize=9)
    ax.set_xlim(0, max(values) * 1.15)
    _save(fig, 'size.png')


def plot_speed(infos: list[dict[str, Any]]) -> None:
    """Measured throughput ratio vs the MACs ceiling, one panel per (mode, batch); bars per shape and variant."""
    rows = [dict(r, ceiling=info['ceilings'][r['shape']].get(r['variant'])) for info in infos for r in info['rows']
            if 'ratio' in r]
    panels = sorted({(r['mode'], r['batch']) for r in rows}, key=lambda mb: (mb[0] != 'eager', mb[1]))
    if not panels:
        print('skip: no speed rows')
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.2), squeeze=False)
    for ax, (mode, batch) in zip(axes[0], panels):
        mine = [r for r in rows if r['mode'] == mode and r['batch'] == batch]
        labels = [f"{r['shape'].split('_')[1]} {r['variant']}" for r in mine]
        ys = range(len(mine))
        ax.barh(ys, [r['ratio']['median'] for r in mine], color='#37c', label='measured')
        ax.errorbar([r['ratio']['median'] for r in mine], list(ys),
                    xerr=[[r['ratio']['median'] - r['ratio']['min'] for r in mine],
                          [r['ratio']['max'] - r['ratio']['median'] for r in mine]], fmt='none', ecolor='k',
                    capsize=2, lw=0.8)
        ax.scatter([r['ceiling'] for r in mine], list(ys), marker='|', s=200, color='r', label='MACs ceiling',
                   zorder=3)
        ax.axvline(1.0, color='k', lw=0.8, ls=':')
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f'{mode}, batch {batch}', fontsize=9)
        ax.set_xlabel('throughput / original')
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper right', fontsize=8, ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save(fig, 'speed.png')


def main() -> None:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--results', type=Path, default=RESULTS, help='folder of the result files; PNGs go there too')
    RESULTS = p.parse_args().results
    accuracy = _load('compress_accuracy')
    if accuracy is None:  # the calib runner's two halves, before it merges them
        parts = [p for p in (_load('compress_accuracy_a'), _load('compress_accuracy_b')) if p]
        accuracy = [r for part in parts for r in part] or None
    if accuracy:
        plot_accuracy(accuracy)
    nocalib = _load('nocalib')
    if nocalib:
        plot_nocalib(nocalib)
    for name in ('scratch_epoch', 'scratch_long', 'scratch'):  # the largest from-scratch budget that finished
        scratch = _load(name)
        if scratch and len(scratch.get('runs', [])) == 6:
            plot_scratch(scratch)
            break
    size = _load('size')
    if size:
        plot_size(size)
    speeds = [s for s in (_load(n) for n in ('speed', 'speed_compile', 'speed_base')) if s]
    if speeds:
        plot_speed(speeds)


if __name__ == '__main__':
    main()
