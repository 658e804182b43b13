"""Accuracy right after `reduce()` (no calibration, no fine-tuning) of every strategy on the CIFAR-10 benchmark ViT.

The lower bound of what each strategy keeps from a trained model by itself (the calibrated table is
bench/compress_accuracy.py on branch calib). Top-1 on all 10,000 test images, with the preprocessing the model's
config.json names; the decoded test set is kept in memory and reused for every variant.

    python bench/nocalib.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

# the repository root first: this checkout's timm_reduce, not another editable install
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from common import BENCH_MODEL, DATA, header, md_table, stored_mlp_params, write_results  # noqa: E402

import timm_reduce  # noqa: E402

VARIANTS: dict[str, str | None] = {
    'original': None,
    'shallow keep=0.5 (magnitude)': 'shallow:keep=0.5',
    'shallow keep=0.5 (first-k)': 'shallow:keep=0.5,importance=first',
    'grouped pairs (mean)': 'grouped:group_size=2',
    'FiPS 10% (SVD init, static 75% sparse)': 'fips:budget=0.1,sparsifier=static',
    'FiPS 25% (SVD init, static 75% sparse)': 'fips:budget=0.25,sparsifier=static',
    'FiPS 40% (SVD init, static 75% sparse)': 'fips:budget=0.4,sparsifier=static',
    'FiPS 50% (SVD init, static 75% sparse)': 'fips:budget=0.5,sparsifier=static',
    'FiPS 50% (SVD init, dense factors)': 'fips:budget=0.5,sparsifier=dense',
    'MorphReuse shape-shared (mean, lstsq scales)': 'morphreuse:variant=shape',
}


def load_test_set(model: torch.nn.Module, data: Path, batch_size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = resolve_data_config(model=model)
    dataset = create_dataset('', root=str(data / 'val.tar'), is_training=False, search_split=False)
    loader = create_loader(dataset, input_size=config['input_size'], batch_size=batch_size, use_prefetcher=False,
                           interpolation=config['interpolation'], mean=config['mean'], std=config['std'],
                           crop_pct=config['crop_pct'], crop_mode=config['crop_mode'], num_workers=1)
    return [(x.clone(), y.clone()) for x, y in loader]


@torch.no_grad()
def top1(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    model.eval()
    correct = count = 0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum().item()
        count += len(y)
    return 100 * correct / count, count


def markdown(info: dict[str, Any]) -> str:
    before = info['rows']['original']['stored_mlp_params']
    rows = [[name, f"`{r['spec']}`" if r['spec'] else '', f"{r['stored_mlp_params']:,} "
             f"({r['stored_mlp_params'] / before:.1%})", f"{r['top1']:.2f}"] for name, r in info['rows'].items()]
    return (f"Model: {info['model']}; top-1 on all {info['images']:,} CIFAR-10 test images right after "
            f"`timm_reduce.reduce()` (no calibration, no fine-tuning).\n\n"
            + md_table(['variant', 'spec', 'stored MLP params (vs original)', 'top-1 (%)'], rows) + '\n')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model-dir', type=Path, default=BENCH_MODEL)
    p.add_argument('--data', type=Path, default=DATA)
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--name', default='nocalib')
    args = p.parse_args()
    torch.manual_seed(0)
    info = header(args.name)
    info['model'] = str(args.model_dir)
    load = lambda: timm.create_model(f'local-dir:{args.model_dir.resolve()}', pretrained=True)  # noqa: E731
    batches = load_test_set(load(), args.data)
    info['rows'] = {}
    for name in ['original', *[v for v in args.variants if v != 'original']]:
        model = load()
        if VARIANTS[name] is not None:
            timm_reduce.reduce(model, VARIANTS[name])
        start = time.perf_counter()
        acc, info['images'] = top1(model, batches)
        info['rows'][name] = {'spec': VARIANTS[name], 'top1': acc,
                              'stored_mlp_params': stored_mlp_params(timm_reduce.summary(model, macs=False)),
                              'eval_seconds': round(time.perf_counter() - start, 1)}
        print(f"{name:<46} top-1 {acc:6.2f}%", flush=True)
    write_results(args.name, info, markdown(info))
    print(markdown(info))


if __name__ == '__main__':
    main()
