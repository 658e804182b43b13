"""Table 3: inference throughput of reduced models relative to the original, next to the ceiling from MACs.

For each model shape (pretrained=False, 224 px), batch size and mode (eager / torch.compile) every variant is timed
in the same process, alternating with the original in every repeat; a ratio is original time / variant time of the
same repeat, the median over repeats is one pass, and the table shows the median of the passes with their min-max
spread. The ceiling is MACs(original) / MACs(variant) from `timm_reduce.summary`. The fp32 2048² matmul roof is
measured at the start and end of the run.

    python bench/speed.py --modes eager                    # deit_tiny + deit_small, batch 1 and 32
    python bench/speed.py --modes compile --name speed_compile
    python bench/speed.py --shapes deit_base_patch16_224 --variants shallow native_r2 --batches 32 --modes eager
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

# the repository root first: this checkout's timm_reduce, not another editable install
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from common import header, matmul_roof, md_table, median_spread, time_call, write_results  # noqa: E402

import timm_reduce  # noqa: E402


def _reduced(spec: str) -> Callable[[str], nn.Module]:
    def build(shape: str) -> nn.Module:
        return timm_reduce.reduce(timm.create_model(shape, pretrained=False), spec)
    return build


# variant -> (label, builder from a timm model name)
VARIANTS: dict[str, tuple[str, Callable[[str], nn.Module]]] = {
    'shallow': ('shallow keep=0.5', _reduced('shallow:keep=0.5')),
    'thin': ('thin mlp_ratio=2', _reduced('thin:mlp_ratio=2')),
    'native_r2': ('plain timm mlp_ratio=2', lambda shape: timm.create_model(shape, pretrained=False, mlp_ratio=2.0)),
    'grouped': ('grouped pairs', _reduced('grouped:group_size=2')),
    'fips': ('FiPS 50% budget, eval cache', _reduced('fips:budget=0.5,sparsifier=static')),
    'fips_mat': ('FiPS 50% budget, materialize()', lambda shape: timm_reduce.materialize(
        _reduced('fips:budget=0.5,sparsifier=static')(shape))),
    'morph': ('MorphReuse shape-shared', _reduced('morphreuse:variant=shape')),
    'morph_core': ('MorphReuse core (dim 128)', _reduced('morphreuse:variant=core')),
}
DEFAULT_VARIANTS = ['shallow', 'thin', 'native_r2', 'grouped', 'fips', 'morph', 'morph_core']


def prepare(model: nn.Module, mode: str, batch: int) -> tuple[Callable[[], Any], float]:
    """A no-arg callable running one forward pass, and the seconds spent compiling/warming it up."""
    model.eval()
    x = torch.randn(batch, 3, 224, 224)
    fn: Callable[[torch.Tensor], Any] = model
    if mode == 'compile':
        fn = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
        fn(x)
    warm = time.perf_counter() - start

    def run() -> Any:
        with torch.no_grad():
            return fn(x)
    return run, warm


def measure(shape: str, batch: int, mode: str, variants: list[str], repeats: int, passes: int, min_time: float,
            min_iters: int, models: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """Alternate original and variants; ratios per repeat, medians per pass."""
    runners: dict[str, Callable[[], Any]] = {}
    warmups: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in ['original', *variants]:
        try:
            runners[name], warmups[name] = prepare(models[name], mode, batch)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run (e.g. compile) is reported, not fatal
            errors[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
            print(f'  {shape} b{batch} {mode} {name}: FAILED {errors[name]}', flush=True)
    if 'original' not in runners:
        return [{'shape': shape, 'batch': batch, 'mode': mode, 'variant': v, 'error': errors['original']}
                for v in variants]
    secs: dict[str, list[list[float]]] = {n: [[] for _ in range(passes)] for n in runners}
    loads = []
    for p in range(passes):
        loads.append(os.getloadavg()[0])
        for r in range(repeats):
            order = [n for n in runners if n != 'original']
            order = order[r % max(len(order), 1):] + order[:r % max(len(order), 1)]  # rotate the variant order
            for name in order:
                secs['original'][p].append(time_call(runners['original'], min_time=min_time, min_iters=min_iters))
                secs[name][p].append(time_call(runners[name], min_time=min_time, min_iters=min_iters))
    rows = []
    n_var = max(len(runners) - 1, 1)
    for name in variants:
        row: dict[str, Any] = {'shape': shape, 'batch': batch, 'mode': mode, 'variant': name,
                               'label': VARIANTS[name][0]}
        if name not in runners:
            row['error'] = errors[name]
            rows.append(row)
            continue
        pass_ratios, var_ips, orig_ips = [], [], []
        for p in range(passes):
            # original was timed once before each variant measurement: pair it with this variant's repeats
            idx = list(runners).index(name) - 1
            orig = [secs['original'][p][r * n_var + ((idx - r) % n_var)] for r in range(repeats)]
            mine = secs[name][p]
            pass_ratios.append(statistics.median(o / m for o, m in zip(orig, mine)))
            var_ips.append(batch / statistics.median(mine))
            orig_ips.append(batch / statistics.median(orig))
        row.update({
            'ratio': median_spread(pass_ratios), 'pass_ratios': pass_ratios,
            'img_per_s': statistics.median(var_ips), 'orig_img_per_s': statistics.median(orig_ips),
            'warmup_s': warmups[name], 'orig_warmup_s': warmups['original'], 'load_average_per_pass': loads,
        })
        rows.append(row)
        print(f"  {shape} b{batch} {mode} {name:<10} {row['ratio']['median']:.3f}x "
              f"(passes {', '.join(f'{x:.3f}' for x in pass_ratios)}) {row['img_per_s']:.1f} img/s "
              f"vs {row['orig_img_per_s']:.1f}", flush=True)
    return rows


def markdown(info: dict[str, Any]) -> str:
    rows = []
    for r in info['rows']:
        ceiling = info['ceilings'][r['shape']].get(r['variant'])
        ceil = f'{ceiling:.2f}x' if ceiling else ''
        if 'error' in r:
            rows.append([r['shape'], r['batch'], r['mode'], VARIANTS[r['variant']][0], ceil, 'failed: ' + r['error'],
                         '', '', ''])
            continue
        ratio = r['ratio']
        rows.append([r['shape'], r['batch'], r['mode'], r['label'], ceil, f"**{ratio['median']:.2f}x**",
                     f"{ratio['min']:.2f}–{ratio['max']:.2f}", f"{r['img_per_s']:.1f} / {r['orig_img_per_s']:.1f}",
                     f"{min(r['load_average_per_pass']):.1f}–{max(r['load_average_per_pass']):.1f}"])
    roof = info['roof']
    text = (f"Throughput ratio reduced / original (higher = faster), {info['setup']['repeats']} alternating repeats "
            f"per pass, median of {info['setup']['passes']} passes (range = min–max of the pass medians). Ceiling = "
            f"MACs ratio. Matmul roof (fp32 2048²): {roof['start']['median']:.0f} GFLOP/s at start"
            + (f", {roof['end']['median']:.0f} GFLOP/s at end" if 'end' in roof else ' (run not finished)') + '.\n\n')
    table = md_table(['shape', 'batch', 'mode', 'variant', 'MACs ceiling', 'measured', 'range over passes',
                      'img/s variant / original', 'load avg'], rows)
    notes = '\n'.join(f'- {n}' for n in info.get('notes', []))
    return text + table + ('\n\n' + notes if notes else '') + '\n'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shapes', nargs='+', default=['deit_tiny_patch16_224', 'deit_small_patch16_224'])
    p.add_argument('--variants', nargs='+', default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument('--batches', type=int, nargs='+', default=[1, 32])
    p.add_argument('--modes', nargs='+', default=['eager', 'compile'], choices=['eager', 'compile'])
    p.add_argument('--repeats', type=int, default=3, help='alternating repeats per pass')
    p.add_argument('--passes', type=int, default=3)
    p.add_argument('--min-time', type=float, default=1.0, help='seconds per timed measurement, at least')
    p.add_argument('--min-iters', type=int, default=1, help='calls per timed measurement, at least')
    p.add_argument('--compile-variants', nargs='+', default=['shallow', 'native_r2', 'grouped', 'fips'],
                   choices=list(VARIANTS), help='variants timed with torch.compile (compiling is slow on 2 cores)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    p.add_argument('--results-dir', type=Path, default=None, help='default: bench/results')
    p.add_argument('--name', default='speed')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    info = header(args.name)
    info['setup'] = {k: getattr(args, k) for k in ('shapes', 'variants', 'compile_variants', 'batches', 'modes',
                                                   'repeats', 'passes', 'min_time', 'min_iters')}
    info['roof'] = {'start': matmul_roof()}
    print(f"# matmul roof {info['roof']['start']['median']:.0f} GFLOP/s", flush=True)
    info['rows'], info['ceilings'], info['macs'] = [], {}, {}
    for shape in args.shapes:
        models: dict[str, nn.Module] = {'original': timm.create_model(shape, pretrained=False)}
        for name in dict.fromkeys(args.variants + (args.compile_variants if 'compile' in args.modes else [])):
            models[name] = VARIANTS[name][1](shape)
        # FiPS: MACs of the materialised model; summary() of a FipsLinear model also counts the one-off U·V product
        macs = {name: timm_reduce.summary(timm_reduce.materialize(m) if name.startswith('fips') else m)['macs']
                for name, m in models.items()}
        info['macs'][shape] = macs
        info['ceilings'][shape] = {n: macs['original'] / macs[n] for n in models if n != 'original'}
        print(f"# {shape}: ceilings " + ', '.join(f'{n} {c:.2f}x' for n, c in info['ceilings'][shape].items()),
              flush=True)
        for mode in args.modes:
            for batch in args.batches:
                if mode == 'compile':
                    torch._dynamo.reset()
                variants = args.compile_variants if mode == 'compile' else args.variants
                info['rows'] += measure(shape, batch, mode, variants, args.repeats, args.passes, args.min_time,
                                        args.min_iters, models)
                write_results(args.name, info, markdown(info), args.results_dir)
    info['roof']['end'] = matmul_roof()
    write_results(args.name, info, markdown(info), args.results_dir)
    print(markdown(info))


if __name__ == '__main__':
    main()
