"""Run by torchrun in test_train_distributed: train with train.py's `run`, then save this rank's weights.

Usage: torchrun ... tests/ddp_worker.py OUT_DIR [train.py args]
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from timm.utils import setup_default_logging

from timm_reduce.core.sharing import alias_map
from timm_reduce.training import init_distributed
from train_utils import load_train_module

setup_default_logging()
train = load_train_module()
out = Path(sys.argv[1])
args, text = train.parse_args(sys.argv[2:])
info = init_distributed(args.device, args.dist_backend, args.dist_timeout)
model = train.run(args, text, info)
state = model.state_dict()
torch.save({'state': {k: v.clone() for k, v in state.items()}, 'aliases': alias_map(state)},
           out / f'rank{info.rank}.pt')
dist.destroy_process_group()
