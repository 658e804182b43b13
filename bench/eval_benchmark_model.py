#!/usr/bin/env python3
"""Top-1/top-5 of a save_pretrained folder on an image folder or tar, with the preprocessing its config.json names.

    python bench/eval_benchmark_model.py bench/models/cifar10_vit ../shared/data/cifar10/val.tar

Independent of train.py: timm loads the folder (`local-dir:`), `resolve_data_config(model=...)` gives the eval
transform. Writes bench/results/benchmark_model_eval.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

import timm_reduce  # noqa: F401  (registers the timm_reduce entrypoint for reduced folders)

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model_dir')
    p.add_argument('data')
    p.add_argument('--batch-size', type=int, default=250)
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'benchmark_model_eval.json'))
    args = p.parse_args()
    model = timm.create_model(f'local-dir:{args.model_dir}', pretrained=True).eval()
    config = resolve_data_config(model=model)
    dataset = create_dataset('', root=args.data, is_training=False, search_split=False)
    loader = create_loader(dataset, input_size=config['input_size'], batch_size=args.batch_size, use_prefetcher=False,
                           interpolation=config['interpolation'], mean=config['mean'], std=config['std'],
                           crop_pct=config['crop_pct'], crop_mode=config['crop_mode'], num_workers=1)
    top1 = top5 = count = 0
    start = time.perf_counter()
    for images, target in loader:
        top = model(images).topk(5, dim=1).indices
        top1 += (top[:, 0] == target).sum().item()
        top5 += (top == target[:, None]).any(dim=1).sum().item()
        count += len(target)
    result = {'model_dir': args.model_dir, 'data': args.data, 'images': count, 'top1': 100 * top1 / count,
              'top5': 100 * top5 / count, 'data_config': {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in config.items()},
              'unique_params': timm_reduce.summary(model, macs=False)['unique_params'],
              'seconds': round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + '\n')
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
