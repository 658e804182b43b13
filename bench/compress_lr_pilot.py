"""Pick the calibration learning rate for the accuracy benchmark: FiPS (GMP) at one budget, several learning rates,
compared by the calibration loss of the last epoch and the model-output MSE against the original on the
calibration images (no test data is used to choose).

Example:
    OMP_NUM_THREADS=1 python bench/compress_lr_pilot.py --model-dir MODEL --lrs 2e-4 1e-3 --budget 0.25
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import timm_reduce  # noqa: E402
from compress_accuracy import calibration_batches, load_model  # noqa: E402



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--model-dir', required=True)
    p.add_argument('--weights')
    p.add_argument('--data', default='/work/shared/data/cifar10')
    p.add_argument('--lrs', type=float, nargs='+', required=True)
    p.add_argument('--budget', type=float, default=0.25)
    p.add_argument('--group-size', type=int, default=3)
    p.add_argument('--calib-batches', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--image-cache', default='/tmp/timm_reduce_bench')
    p.add_argument('--out', required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    base = load_model(args.model_dir, args.weights)
    calib = calibration_batches(args, base)
    steps = args.epochs * args.calib_batches
    rows = []
    for lr in args.lrs:
        model = load_model(args.model_dir, args.weights)
        timm_reduce.compress(model, 'fips', data=calib, budget=args.budget, sparsity=0.75, group_size=args.group_size,
                             delta_t=max(1, steps // 10), epochs=args.epochs, batches=args.calib_batches, lr=lr,
                             seed=args.seed)
        r = timm_reduce.calibration_report(model)
        rows.append({'lr': lr, 'final_epoch_loss': r.epoch_loss[-1], 'output_mse_after': r.output_error_after,
                     'output_mse_before': r.output_error_before, 'command': 'python ' + ' '.join(sys.argv)})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
