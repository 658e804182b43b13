"""Micro-benchmark: FiPS initialisation (Gram/eigh SVD per group, growth, initial pruning) on DeiT shapes.

Random weights (pretrained=False): the decomposition cost does not depend on the values. Also records the
bytes of the compact MLP storage against the dense fp32 MLP weights+biases at several budgets.

    python bench/fips_init.py            # writes bench/results/fips_init.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not another installed copy

import timm  # noqa: E402
import torch  # noqa: E402

import timm_reduce  # noqa: E402
from timm_reduce.strategies.fips import fips_layers  # noqa: E402
from timm_reduce.persistence.encoding import encode_state  # noqa: E402

MODELS = ('deit_small_patch16_224', 'deit_base_patch16_224')


def mlp_bytes(model: torch.nn.Module) -> int:
    """Bytes of every block-MLP tensor (weights, biases, FiPS bases/factors/bitmasks) in the saved form."""
    return sum(t.numel() * t.element_size() for k, t in encode_state(model).items() if '.mlp.' in k)


def run(name: str, budgets: list[float], sparsity: float, group_size: int, repeats: int,
        storage_dtype: str = 'float32') -> dict:
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False).eval()
    dense_bytes = mlp_bytes(base)
    dense_weights = sum(m.weight.numel() for n, m in base.named_modules() if '.mlp.fc' in n)
    rows = []
    for budget in budgets:
        times, cpu_times, loads = [], [], []
        for _ in range(repeats):
            model = timm.create_model(name, pretrained=False).eval()
            model.load_state_dict(base.state_dict())
            start, cpu_start = time.perf_counter(), time.process_time()
            timm_reduce.reduce(model, 'fips', budget=budget, sparsity=sparsity, group_size=group_size,
                               sparsifier='static', storage_dtype=storage_dtype)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            loads.append(os.getloadavg()[0])
        layers = fips_layers(model).values()
        bases = {id(m.basis): m.basis.weight.numel() for m in layers}
        stored = sum(bases.values()) + sum(m.active for m in layers)
        compact = mlp_bytes(model)
        rows.append({
            'budget': budget, 'rank': next(iter(layers)).rank, 'init_seconds': min(times), 'init_seconds_all': times,
            'init_cpu_seconds_all': cpu_times, 'load_average_1min': loads,
            'stored_params': stored, 'stored_fraction': stored / dense_weights,
            'mlp_bytes': compact, 'mlp_bytes_dense': dense_bytes, 'bytes_ratio': compact / dense_bytes,
        })
        print(f'{name} budget={budget:.2f} rank={rows[-1]["rank"]} init={min(times):.2f}s '
              f'(cpu {min(cpu_times):.2f}s, load {loads[times.index(min(times))]:.1f}) '
              f'stored={stored / dense_weights:.3f} bytes={compact / dense_bytes:.3f}x', flush=True)
    return {'model': name, 'sparsity': sparsity, 'group_size': group_size, 'storage_dtype': storage_dtype,
            'mlp_weight_params': dense_weights, 'rows': rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--budgets', nargs='+', type=float, default=[0.10, 0.25, 0.40, 0.50, 0.75])
    parser.add_argument('--sparsity', type=float, default=0.75)
    parser.add_argument('--group-size', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--storage-dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--output', default=str(Path(__file__).parent / 'results' / 'fips_init.json'))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {
        'command': ' '.join(['python', 'bench/fips_init.py', *sys.argv[1:]]),
        'torch': torch.__version__, 'timm': timm.__version__, 'threads': torch.get_num_threads(),
        'machine': platform.machine(), 'processor': platform.processor(),
        'runs': [run(m, args.budgets, args.sparsity, args.group_size, args.repeats, args.storage_dtype)
                 for m in args.models],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
