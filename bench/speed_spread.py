#!/usr/bin/env python3
"""Run-to-run spread of `bench/speed.py`: merge the result files of separate runs of the same command into one table
(per cell: each run's median ratio, their median, and the largest deviation from it).

    python bench/speed_spread.py --name speed_spread speed speed_run2 speed_run3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, md_table  # noqa: E402


def merge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (shape, batch, mode, variant) present in every run, in the first run's order."""
    keyed = [{(r['shape'], r['batch'], r['mode'], r['variant']): r for r in run['rows']} for run in runs]
    rows = []
    for key, first in keyed[0].items():
        if not all(key in k for k in keyed):
            continue
        ratios = [k[key]['ratio']['median'] for k in keyed]
        med = statistics.median(ratios)
        rows.append({'shape': key[0], 'batch': key[1], 'mode': key[2], 'variant': key[3], 'label': first['label'],
                     'run_ratios': ratios, 'median': med, 'max_rel_dev': max(abs(r / med - 1) for r in ratios)})
    return rows


def markdown(names: list[str], runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    devs = sorted(r['max_rel_dev'] for r in rows)
    within = {p: sum(d <= p / 100 for d in devs) for p in (2, 4, 7)}
    runs_text = '; '.join(f"`{n}`: commit {r['machine']['commit']}, {r['machine']['date_utc']} UTC, "
                          f"load {r['machine']['load_average_start'][0]:.2f}→{r['load_average_end'][0]:.2f}"
                          for n, r in zip(names, runs))
    table = md_table(
        ['shape', 'batch', 'mode', 'variant', 'ceiling'] + [f'run {i + 1}' for i in range(len(runs))]
        + ['median of runs', 'max deviation'],
        [[r['shape'], r['batch'], r['mode'], r['label'], f"{runs[0]['ceilings'][r['shape']][r['variant']]:.2f}x"]
         + [f'{x:.2f}x' for x in r['run_ratios']] + [f"**{r['median']:.2f}x**", f"±{r['max_rel_dev']:.0%}"]
         for r in rows])
    return (f"Run-to-run spread of {len(runs)} separate runs of the same command ({runs[0]['command']} with "
            f"`--name` changed). Each run's ratio is its median of {runs[0]['setup']['passes']} passes. Runs: "
            f"{runs_text}.\n\n{table}\n\n"
            f"{within[2]} of {len(rows)} cells within ±2% of the median of runs, {within[4]} within ±4%, "
            f"{within[7]} within ±7%; largest deviation ±{devs[-1]:.0%}.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', help='result names in bench/results (without .json)')
    p.add_argument('--name', default='speed_spread')
    args = p.parse_args()
    if len(args.runs) < 2:
        p.error('give at least two runs')
    runs = []
    for name in args.runs:
        path = RESULTS / f'{name}.json'
        if not path.is_file():
            p.error(f'{path} does not exist; run bench/speed.py --name {name} first')
        runs.append(json.loads(path.read_text()))
    rows = merge(runs)
    if not rows:
        p.error('the runs have no (shape, batch, mode, variant) cell in common')
    text = markdown(args.runs, runs, rows)
    (RESULTS / f'{args.name}.json').write_text(json.dumps({'runs': args.runs, 'rows': rows}, indent=1) + '\n')
    (RESULTS / f'{args.name}.md').write_text(f'### {args.name}\n\n{text}')
    print(text)


if __name__ == '__main__':
    main()
