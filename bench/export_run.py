#!/usr/bin/env python3
"""Export a train.py run's best checkpoint with `save_pretrained`, as train.py does at the end of a run.

    python bench/export_run.py RUN_DIR OUT_DIR

Rebuilds the (reduced) model from RUN_DIR/args.yaml, loads model_best.pth.tar (last.pth.tar without validation;
EMA weights if the run used --model-ema) and writes config.json + model.safetensors with the run's preprocessing.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

from timm_reduce.core.spec import parse_recipe
from timm_reduce.training import load_training_checkpoint

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dir', type=Path)
    p.add_argument('out_dir', type=Path)
    cli = p.parse_args()
    spec = importlib.util.spec_from_file_location('train', REPO / 'train.py')
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    args = argparse.Namespace(**yaml.safe_load((cli.run_dir / 'args.yaml').read_text()))
    args.pretrained = False  # the checkpoint's weights replace everything
    model = train.create_reduced_model(args, parse_recipe(args.reduction_recipe))
    best = cli.run_dir / 'model_best.pth.tar'
    checkpoint = best if best.is_file() else cli.run_dir / 'last.pth.tar'
    metric = load_training_checkpoint(checkpoint).get('metric')
    metadata = {f'val_{args.eval_metric}': metric} if metric is not None else {}
    data_config = train.model_data_config(args, model)
    train.export_model(model, checkpoint, cli.out_dir, ema=args.model_ema, data_config=data_config, metadata=metadata)


if __name__ == '__main__':
    sys.exit(main())
