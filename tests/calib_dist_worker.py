"""Run under `torchrun --nproc_per_node 2`: compress a tiny model on split batches, save each rank's result.

Usage: calib_dist_worker.py OUT_DIR STRATEGY [key=value ...]
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import timm_reduce
from timm_reduce.core.spec import parse_value

from calib_helpers import image_batches, tiny_vit


def main() -> None:
    out, strategy, *pairs = sys.argv[1:]
    options = {k: parse_value(v) for k, v in (p.split('=', 1) for p in pairs)}
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    model = timm_reduce.compress(tiny_vit(), strategy, data=image_batches(n=4), epochs=3, lr=2e-3, batches=4,
                                 **options)
    report = timm_reduce.calibration_report(model)
    masks = {}
    for name, module in model.named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf.dtype == torch.bool:
                masks[f'{name}.{buf_name}'] = buf.clone()
    torch.save({'state': model.state_dict(), 'masks': masks, 'report': report.to_dict()}, f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
