#!/usr/bin/env python3
"""Train (reduced) timm image classifiers, on one process or under torchrun, CPU or GPU.

Accepts the flags of timm's train.py that users type, plus `--reduction-*`:

    python train.py DATA --model vit_small_patch16_224 --reduction-strategy grouped --reduction-mlp-ratio 0.707
    ./distributed_train.sh 2 DATA --model vit_base_patch16_224 --reduction-spec 'shallow:keep=0.5' --amp

Order of construction: model -> reduction -> --initial-checkpoint -> device -> optimizer -> --resume -> EMA ->
compile -> DDP. Outputs in OUTPUT/EXPERIMENT: timm checkpoints (last, model_best, checkpoint-N, recovery),
summary.csv, args.yaml (with the reduction recipe) and, at the end, `model/` written by `timm_reduce.save_pretrained`
from the best checkpoint (its EMA weights with --model-ema).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import timm
import timm_reduce
from timm.data import (
    AugMixDataset, FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config,
)
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, CheckpointSaver, NativeScaler, accuracy, dispatch_clip_grad, random_seed,
    reduce_tensor, setup_default_logging, update_summary,
)
from timm_reduce.persistence.entrypoint import build_reduced
from timm_reduce.errors import ReduceError
from timm_reduce.evaluate import SPLIT_SYNONYMS, find_split
from timm_reduce.persistence.serialization import load_reduced_state
from timm_reduce.summary import model_input_size
from timm_reduce.core.hooks import RecipeHooks, recipe_hooks
from timm_reduce.training import (
    DistInfo, KeyValueArgs, SharedEma, checkpoint_recipe, checkpoint_state, init_distributed, load_training_checkpoint,
    param_report, patch_timm_posterize, read_model_weights, recipe_from_flags, recipe_to_text,
)

_logger = logging.getLogger('train')


class AmpScaler(NativeScaler):
    """timm's NativeScaler (fp16 loss scaling, same checkpoint key) with a hook between unscaling and the step.

    timm's `NativeScaler.__call__` runs backward, clipping and `optimizer.step()` in one call and unscales only when
    clipping, which leaves no place for the strategies' `after_backward` hook (FiPS: zero the gradients of masked
    factor entries; RigL: read the dense gradient). Here the gradients are always unscaled first (as
    `GradScaler.step` would do anyway; the docs' recipe for working with unscaled gradients), then `before_step`,
    clipping and the scaler's step run on true gradients; a step whose gradients hold inf/NaN is still skipped.
    """

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: float | None = None,
                 clip_mode: str = 'norm', parameters: Any = None, create_graph: bool = False,
                 need_update: bool = True, before_step: Callable[[], None] | None = None) -> None:
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not need_update:
            return
        self._scaler.unscale_(optimizer)
        if before_step is not None:
            before_step()
        if clip_grad is not None:
            dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
        self._scaler.step(optimizer)
        self._scaler.update()


class TrainError(Exception):
    """A problem with the inputs of a run; main() prints the message and exits with status 2."""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of argument defaults')

    p = argparse.ArgumentParser(description='Train (reduced) timm models', parents=[config_parser])
    g = p.add_argument_group('Data')
    g.add_argument('data_dir', nargs='?', metavar='DIR', help='dataset root (folder or with tar splits)')
    g.add_argument('--data-dir', dest='data_dir_opt', metavar='DIR', help='dataset root (alternative to positional)')
    g.add_argument('--dataset', default='', help='timm dataset type, e.g. "" (folder/tar), torch/cifar10, hfds/...')
    g.add_argument('--train-split', default='train', help='train split (sub-folder or tar of DIR)')
    g.add_argument('--val-split', default='validation', help='validation split; "" to skip validation')
    g.add_argument('--dataset-download', action='store_true', help='let torch/ datasets download')
    g.add_argument('--class-map', default='', help='path to a class-to-index mapping file')
    g.add_argument('--input-img-mode', default=None, help='PIL image mode of inputs')

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='resnet50', help='timm model name')
    g.add_argument('--pretrained', action='store_true', help='start from timm pretrained weights')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH',
                   help='weights to start from, loaded after the reduction (training checkpoint, '
                        'safetensors or save_pretrained folder)')
    g.add_argument('--resume', default='', metavar='PATH',
                   help='resume a run: model, optimizer, epoch; the reduction is rebuilt from the checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore the optimizer state on --resume')
    g.add_argument('--num-classes', type=int, default=None, help='number of classes (default: the dataset\'s)')
    g.add_argument('--gp', default=None, help='global pool type')
    g.add_argument('--img-size', type=int, default=None, help='image size for data (model keeps its own)')
    g.add_argument('--in-chans', type=int, default=None, help='image input channels')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N', help='input dims C H W')
    g.add_argument('--crop-pct', type=float, default=None, help='validation center crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='pixel mean override')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='pixel std override')
    g.add_argument('--interpolation', default='', help='resize interpolation override')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueArgs, help='key=value kwargs for the model')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, help='validation batch size')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer step')
    g.add_argument('--grad-checkpointing', action='store_true', help='activation checkpointing')
    g.add_argument('--reentrant-ckpt', action='store_true', help='reentrant activation checkpointing')
    g.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')

    g = p.add_argument_group('Reduction (timm_reduce)')
    g.add_argument('--reduction-strategy', default=None,
                   help=f'strategy to apply; registered: {", ".join(timm_reduce.list_strategies())}')
    g.add_argument('--reduction-mlp-ratio', type=float, default=None,
                   help='the seed\'s per-strategy number: thin: mlp_ratio; shallow: fraction kept; '
                        'grouped: init scale (0.707 = 1/sqrt 2). No default')
    g.add_argument('--reduction-kwargs', nargs='*', default={}, action=KeyValueArgs,
                   help='further strategy options key=value, e.g. group_size=3 importance=first')
    g.add_argument('--reduction-spec', default=None,
                   help='whole recipe: spec text "grouped:group_size=2", JSON object/list, or a JSON file')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', help='optimizer (timm name)')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value (off by default)')
    g.add_argument('--clip-mode', default='norm', help='norm, value or agc')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay')
    g.add_argument('--opt-kwargs', dest='opt_args', nargs='*', default=None, action=KeyValueArgs,
                   help='extra optimizer kwargs key=value')

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine', help='scheduler (timm name)')
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule per update, not per epoch')
    g.add_argument('--lr', type=float, default=None, help='learning rate (default: --lr-base scaled by batch)')
    g.add_argument('--lr-base', type=float, default=0.1, help='lr at --lr-base-size global batch')
    g.add_argument('--lr-base-size', type=int, default=256, help='global batch size of --lr-base')
    g.add_argument('--lr-base-scale', default='', help='"linear" or "sqrt" (default: sqrt for adam-like opts)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, help='lr noise on/off epoch fractions')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, help='cycle length multiplier')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, help='lr decay per cycle')
    g.add_argument('--lr-cycle-limit', type=int, default=1, help='number of cycles')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of cosine/poly')
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='warmup start lr')
    g.add_argument('--min-lr', type=float, default=0, help='lower lr bound')
    g.add_argument('--epochs', type=int, default=300, help='epochs to train')
    g.add_argument('--start-epoch', type=int, default=None, help='epoch to start at (overrides --resume\'s)')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], help='multistep milestones')
    g.add_argument('--decay-epochs', type=float, default=90, help='epochs between step decays')
    g.add_argument('--warmup-epochs', type=float, default=5,
                   help='warmup epochs (fractions with --sched-on-updates)')
    g.add_argument('--warmup-prefix', action='store_true', help='warmup outside the decay schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at min lr after the schedule')
    g.add_argument('--patience-epochs', type=int, default=10, help='plateau patience')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, help='lr decay rate')

    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--train-crop-mode', default=None, help='training crop mode (rrc, rkrc, rkrr)')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar='S', help='RandomResizedCrop scale')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar='R', help='aspect range')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='color jitter factor')
    g.add_argument('--aa', default=None, help='AutoAugment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation count (0 = off)')
    g.add_argument('--aug-splits', type=int, default=0, help='augmentation splits (AugMix)')
    g.add_argument('--reprob', type=float, default=0., help='random erase probability')
    g.add_argument('--remode', default='pixel', help='random erase mode')
    g.add_argument('--recount', type=int, default=1, help='random erase count')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (on if > 0)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (on if > 0)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', default='batch', help='batch, pair or elem')
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup off from this epoch (0 = never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    g.add_argument('--drop-path', type=float, default=None, help='drop path rate')
    g.add_argument('--drop-block', type=float, default=None, help='drop block rate')

    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (evaluated and saved)')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    g.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warmup')
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on CPU (not evaluated)')

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--log-interval', type=int, default=50, help='batches between log lines')
    g.add_argument('--recovery-interval', type=int, default=0, help='batches between recovery checkpoints')
    g.add_argument('--checkpoint-hist', type=int, default=10, help='epoch checkpoints to keep')
    g.add_argument('-j', '--workers', type=int, default=4, help='data loading processes per training process')
    g.add_argument('--amp', action='store_true', help='mixed precision (float16 on CUDA, bfloat16 on CPU)')
    g.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16'], help='mixed precision dtype')
    g.add_argument('--pin-mem', action='store_true', help='pin host memory of batches')
    g.add_argument('--no-prefetcher', action='store_true', help='disable the GPU prefetcher')
    g.add_argument('--output', default='', metavar='PATH', help='output root (default ./output/train)')
    g.add_argument('--experiment', default='', help='run folder name under --output')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'], help='metric ranking checkpoints')
    g.add_argument('--device', default=None, help='cpu, cuda (default: cuda if available, else cpu)')
    g.add_argument('--dist-backend', default=None, help='process group backend (default nccl on GPU, gloo on CPU)')
    g.add_argument('--dist-timeout', type=float, default=600., help='seconds a collective waits for other ranks')
    g.add_argument('--max-steps-per-epoch', type=int, default=None, help='cut every epoch short (smoke tests)')
    return config_parser, p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, str]:
    """Command-line args, with defaults from `-c/--config` YAML; also returns them as YAML text."""
    config_parser, parser = _parser()
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    args = parser.parse_args(remaining)
    args.data_dir = args.data_dir or args.data_dir_opt
    return args, yaml.safe_dump(vars(args), default_flow_style=False)


# ----------------------------------------------------------------------------------------------- model building


def _check_model_name(name: str) -> None:
    if not timm.is_model(name) and ':' not in name:
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        hint = f' Similar names: {", ".join(close)}.' if close else ''
        raise TrainError(f'Unknown model {name!r}: it is not a registered timm model.{hint}')


def resolve_recipe(args: argparse.Namespace, resume_checkpoint: dict | None) -> list:
    """The recipe of this run: from the --reduction-* flags, or for --resume from the checkpoint."""
    asked = recipe_from_flags(args.reduction_strategy, args.reduction_mlp_ratio, args.reduction_kwargs,
                              args.reduction_spec)
    if resume_checkpoint is None:
        return asked
    recorded = checkpoint_recipe(resume_checkpoint)
    if recorded is None:
        raise TrainError(f'--resume {args.resume}: the checkpoint records no reduction recipe (not written by this '
                         'train.py); use --initial-checkpoint with the matching --reduction-* flags instead.')
    flags_given = any(v for v in (args.reduction_strategy, args.reduction_mlp_ratio is not None,
                                  args.reduction_kwargs, args.reduction_spec))
    if flags_given and [s.to_dict() for s in asked] != [s.to_dict() for s in recorded]:
        raise TrainError(f'--resume {args.resume} was trained with reduction {recipe_to_text(recorded)}, but the '
                         f'command line asks for {recipe_to_text(asked)}. A resumed run keeps its architecture: '
                         'drop the --reduction-* flags (the recipe is read from the checkpoint) or start a new run.')
    return recorded


def create_reduced_model(args: argparse.Namespace, recipe: list) -> nn.Module:
    """timm model `args.model` with `args.model_kwargs`, reduced by `recipe`."""
    kwargs: dict[str, Any] = dict(args.model_kwargs)
    for key, value in (('num_classes', args.num_classes), ('drop_rate', args.drop), ('global_pool', args.gp),
                       ('drop_path_rate', args.drop_path), ('drop_block_rate', args.drop_block),
                       ('in_chans', args.in_chans)):
        if value is not None:
            kwargs[key] = value
    if recipe:
        return build_reduced(args.model, recipe, pretrained=args.pretrained, **kwargs)
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)


def load_initial_checkpoint(model: nn.Module, path: str, recipe: list) -> None:
    """Load `path` into the (already reduced) model; a mismatch names the recipe the file was trained with."""
    state, recorded = read_model_weights(path)
    try:
        load_reduced_state(model, state, path)
    except ReduceError as e:
        hint = ''
        if recorded is not None and [s.to_dict() for s in recorded] != [s.to_dict() for s in recipe]:
            hint = (f' The checkpoint records reduction {recipe_to_text(recorded)} while this run uses '
                    f'{recipe_to_text(recipe)}: pass --reduction-spec \'{recipe_to_text(recorded)}\'.')
        raise TrainError(f'--initial-checkpoint does not fit the model: {e}{hint}') from e


# ----------------------------------------------------------------------------------------------- data


def _split_root(data_dir: str, dataset: str, split: str) -> tuple[str, str]:
    """(root, split) for create_dataset. A folder/tar split must exist under the data dir, under its name or, like
    timm, a synonym (`validation` finds `val/`), as a folder or a .tar (`train` finds `train.tar`)."""
    if dataset:  # torch/, hfds/, wds/ ... readers resolve splits themselves
        return data_dir, split
    found = find_split(data_dir, split)
    if found is not None:
        return found, split
    names = [split, *next((group for group in SPLIT_SYNONYMS if split in group), ())]
    listing = ', '.join(sorted(os.listdir(data_dir))[:10]) or '(empty)'
    raise TrainError(f'Split {split!r} not found in {data_dir} (looked for {", ".join(dict.fromkeys(names))}); it '
                     f'holds: {listing}. Pass --train-split / --val-split (--val-split "" skips validation).')


def create_loaders(args: argparse.Namespace, data_config: dict, dist_info: DistInfo, num_aug_splits: int,
                   collate_fn: Callable | None) -> tuple[Any, Any | None]:
    root, split = _split_root(args.data_dir, args.dataset, args.train_split)
    common = dict(class_map=args.class_map, download=args.dataset_download, input_img_mode=args.input_img_mode)
    train_ds = create_dataset(args.dataset, root=root, split=split, is_training=True, search_split=False,
                              batch_size=args.batch_size, seed=args.seed, **common)
    if num_aug_splits > 1:
        train_ds = AugMixDataset(train_ds, num_splits=num_aug_splits)
    loader_common = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=dist_info.distributed,
        pin_memory=args.pin_mem, device=dist_info.device, use_prefetcher=args.prefetcher,
        interpolation=data_config['interpolation'],
    )
    train_loader = create_loader(
        train_ds, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        num_aug_splits=num_aug_splits, collate_fn=collate_fn, **loader_common,
    )
    if not args.val_split:
        return train_loader, None
    root, split = _split_root(args.data_dir, args.dataset, args.val_split)
    val_ds = create_dataset(args.dataset, root=root, split=split, is_training=False, search_split=False,
                            batch_size=args.batch_size, **common)
    val_loader = create_loader(
        val_ds, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, crop_pct=data_config['crop_pct'], **loader_common,
    )
    return train_loader, val_loader


# ----------------------------------------------------------------------------------------------- loops


class _Throughput:
    """Images/s of all ranks, measured from the first update on (from the start until then)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] = (self.start, 0)

    def update(self, images: int) -> None:
        self.last = (time.perf_counter(), images)
        if self.first is None:
            self.first = self.last

    def rate(self) -> float:
        t0, n0 = self.first if self.first is not None and self.last[1] > self.first[1] else (self.start, 0)
        return (self.last[1] - n0) * self.world_size / max(self.last[0] - t0, 1e-9)


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args: argparse.Namespace,
        dist_info: DistInfo,
        *,
        lr_scheduler: Any,
        amp_autocast: Callable[[], Any],
        loss_scaler: AmpScaler | None,
        model_ema: SharedEma | None,
        ema_target: nn.Module,
        mixup_fn: Mixup | None,
        saver: CheckpointSaver | None,
        hooks: RecipeHooks | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns loss, lr and images/s.

    `hooks` (the strategies' sparsity hooks) see every optimizer step: masked factor entries get no update and
    the sparsity schedule advances with the global step.

    Images/s counts all ranks and includes data loading; the clock starts after the first update, so start-up
    (worker processes, first allocations) is left out when the epoch has more than one update.
    """
    accum = args.grad_accum_steps
    num_batches = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    losses = AverageMeter()
    model.train()
    optimizer.zero_grad()
    images, clock = 0, _Throughput(dist_info.world_size)
    for batch_idx, (inputs, target) in enumerate(loader):
        if batch_idx >= num_batches:
            break
        last_in_group = (batch_idx + 1) % accum == 0 or batch_idx + 1 == num_batches
        group_size = accum if (batch_idx // accum + 1) * accum <= num_batches else num_batches % accum
        if not args.prefetcher:
            inputs, target = inputs.to(dist_info.device), target.to(dist_info.device)
            if mixup_fn is not None:
                inputs, target = mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        sync = contextlib.nullcontext() if last_in_group or not dist_info.distributed else model.no_sync()
        with sync:
            with amp_autocast():
                loss = loss_fn(model(inputs), target)
            scaled = loss / group_size
            if loss_scaler is not None:  # unscale -> hooks -> clip -> step (skipped on inf/NaN gradients)
                before_step = None if hooks is None else (lambda: hooks.after_backward(num_updates))
                loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=last_in_group, before_step=before_step)
            else:
                scaled.backward()
                if last_in_group:
                    if hooks is not None:
                        hooks.after_backward(num_updates)
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
            if last_in_group and hooks is not None:
                hooks.after_step(num_updates)
        losses.update(loss.item(), inputs.shape[0])
        images += inputs.shape[0]
        if not last_in_group:
            continue
        optimizer.zero_grad()
        num_updates += 1
        clock.update(images)
        if model_ema is not None:
            model_ema.update(ema_target, step=num_updates)
        lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        if dist_info.primary and (batch_idx % args.log_interval == 0 or batch_idx + 1 == num_batches):
            lr = optimizer.param_groups[0]['lr']
            _logger.info(f'Train: {epoch} [{batch_idx + 1:>4d}/{num_batches}] loss {losses.val:.4f} '
                         f'({losses.avg:.4f}) lr {lr:.3e} {clock.rate():.1f} img/s')
        if saver is not None and args.recovery_interval and (batch_idx + 1) % args.recovery_interval == 0:
            saver.save_recovery(epoch, batch_idx=batch_idx)
    loss_avg = torch.tensor([losses.avg], device=dist_info.device)
    if dist_info.distributed:
        loss_avg = reduce_tensor(loss_avg, dist_info.world_size)
    return {'loss': loss_avg.item(), 'lr': optimizer.param_groups[0]['lr'],
            'img_per_sec': clock.rate()}


@torch.no_grad()
def validate(model: nn.Module, loader: Any, args: argparse.Namespace, dist_info: DistInfo,
             amp_autocast: Callable[[], Any], num_classes: int) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over the validation set, summed over ranks."""
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=dist_info.device)  # loss sum, top1, top5 hits, count
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='None of the inputs have requires_grad')  # checkpointing, no_grad
        for inputs, target in loader:
            if not args.prefetcher:
                inputs, target = inputs.to(dist_info.device), target.to(dist_info.device)
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(inputs).float()
            acc1, acck = accuracy(output, target, topk=(1, k))
            n = inputs.shape[0]
            totals += torch.tensor([loss_fn(output, target).item(), acc1.item() * n / 100, acck.item() * n / 100, n],
                                   dtype=torch.float64, device=dist_info.device)
    if dist_info.distributed:
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    return {'loss': loss / count, 'top1': 100 * top1 / count, 'top5': 100 * top5 / count}


# ----------------------------------------------------------------------------------------------- main


def _output_dir(args: argparse.Namespace) -> Path:
    name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_')])
    out = Path(args.output or './output/train') / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resolve_lr(args: argparse.Namespace, world_size: int) -> None:
    if args.lr is not None:
        return
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    ratio = global_batch / args.lr_base_size
    args.lr = args.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)
    _logger.info(f'lr {args.lr:.3e} = lr-base {args.lr_base} x ({scale} of {global_batch}/{args.lr_base_size}).')


def _amp(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], Any], AmpScaler | None]:
    if not args.amp:
        return contextlib.nullcontext, None
    dtype_name = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    dtype = getattr(torch, dtype_name)
    scaler = AmpScaler(device=device.type) if dtype == torch.float16 else None

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype)

    _logger.info(f'Mixed precision: {dtype_name} autocast on {device.type}{", loss scaling" if scaler else ""}.')
    return autocast, scaler


def run(args: argparse.Namespace, args_text: str, dist_info: DistInfo) -> nn.Module:
    """Build everything in the order reduced models need, train, and export the best model.

    Returns:
        The trained model (this rank's replica, unwrapped; not the EMA).
    """
    if not args.data_dir:
        raise TrainError('No data directory given: pass it as the first argument (or --data-dir).')
    if not args.dataset and os.path.isfile(args.data_dir):
        folder, name = os.path.split(os.path.abspath(args.data_dir))
        raise TrainError(f'DATA must be the folder that holds the splits, not a file: pass {folder} with '
                         f'--train-split {os.path.splitext(name)[0]} (and --val-split for validation).')
    if not args.dataset and not os.path.isdir(args.data_dir):
        raise TrainError(f'Data directory {args.data_dir} does not exist.')
    _check_model_name(args.model)
    if args.grad_accum_steps < 1:
        raise TrainError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}.')
    if args.aug_repeats and not dist_info.distributed:
        raise TrainError(f'--aug-repeats {args.aug_repeats:g} needs distributed training (timm\'s RepeatAugSampler '
                         'shards repeats over ranks): launch with distributed_train.sh, or drop --aug-repeats.')
    if args.reentrant_ckpt:
        timm.layers.set_reentrant_ckpt(True)
    args.prefetcher = not args.no_prefetcher and dist_info.device.type == 'cuda'

    resume_checkpoint = load_training_checkpoint(args.resume) if args.resume else None
    recipe = resolve_recipe(args, resume_checkpoint)
    args.reduction_recipe = [s.to_dict() for s in recipe]
    # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    random_seed(args.seed, 0)
    model = create_reduced_model(args, recipe)
    timm_reduce.persistence.serialization.check_saveable(model)  # model/ is saved at the end: refuse now
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args.initial_checkpoint, recipe)
    random_seed(args.seed, dist_info.rank)  # augmentation and mixup draws differ per rank
    counts = param_report(model)
    if dist_info.primary:
        _logger.info(f'Model {args.model}: reduction {recipe_to_text(recipe)}; params {counts["params_before"]:,} '
                     f'before reduction, {counts["params"]:,} after, {counts["unique_params"]:,} unique '
                     f'({counts["unique_params"] / counts["params_before"]:.1%} of before).')
    num_classes = model.num_classes if hasattr(model, 'num_classes') else args.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(dist_info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    data_config = model_data_config(args, model, verbose=dist_info.primary)

    _resolve_lr(args, dist_info.world_size)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    amp_autocast, loss_scaler = _amp(args, dist_info.device)

    start_epoch = 0
    if resume_checkpoint is not None:
        try:
            model.load_state_dict(checkpoint_state(resume_checkpoint), strict=True)
        except RuntimeError as e:
            raise TrainError(f'--resume {args.resume}: the weights do not fit the rebuilt model: {e}') from e
        if not args.no_resume_opt:
            optimizer.load_state_dict(resume_checkpoint['optimizer'])
            if loss_scaler is not None and loss_scaler.state_dict_key in resume_checkpoint:
                loss_scaler.load_state_dict(resume_checkpoint[loss_scaler.state_dict_key])
        start_epoch = resume_checkpoint['epoch'] + 1
        if dist_info.primary:
            _logger.info(f'Resumed {args.resume} at epoch {start_epoch}.')
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    model_ema = None
    if args.model_ema:
        model_ema = SharedEma(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                              device=torch.device('cpu') if args.model_ema_force_cpu else None)
        if resume_checkpoint is not None and 'state_dict_ema' in resume_checkpoint:
            model_ema.module.load_state_dict(checkpoint_state(resume_checkpoint, ema=True), strict=True)

    ema_target = model  # EMA follows the plain module, never the compiled or DDP wrapper
    train_model: nn.Module = model
    if dist_info.distributed:
        shared = counts['unique_params'] < counts['params']
        # reentrant checkpointing re-runs a shared module's forward inside backward: DDP needs a static graph
        static_graph = args.grad_checkpointing and timm.layers.use_reentrant_ckpt() and shared
        train_model = DistributedDataParallel(
            train_model, device_ids=[dist_info.local_rank] if dist_info.device.type == 'cuda' else None,
            static_graph=static_graph)
        if dist_info.primary:
            _logger.info(f'DDP over {dist_info.world_size} processes ({dist.get_backend()}), '
                         f'static_graph={static_graph}.')
    if args.torchcompile:  # compiling the DDP wrapper lets dynamo split graphs at DDP's buckets
        train_model = torch.compile(train_model, backend=args.torchcompile)

    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    collate_fn, mixup_fn = None, None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    if args.aa:
        patch_timm_posterize()
    train_loader, val_loader = create_loaders(args, data_config, dist_info, num_aug_splits, collate_fn)
    dataset_classes = len(getattr(getattr(train_loader.dataset, 'reader', None), 'class_to_idx', None) or {})
    if dataset_classes > num_classes:
        raise TrainError(f'The training data has {dataset_classes} classes but the model has {num_classes} outputs; '
                         f'pass --num-classes {dataset_classes}.')
    if mixup_active:
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(dist_info.device)

    batches = len(train_loader) if args.max_steps_per_epoch is None else min(len(train_loader),
                                                                               args.max_steps_per_epoch)
    updates_per_epoch = (batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    decreasing = args.eval_metric == 'loss'
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    hooks = recipe_hooks(model, recipe)  # FiPS: masks kept, sparsity schedule over the whole run
    hooks.setup(model, optimizer, num_epochs * updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver, output_dir = None, None
    if dist_info.primary:
        output_dir = _output_dir(args)
        saver = CheckpointSaver(model, optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
                                checkpoint_dir=str(output_dir), recovery_dir=str(output_dir), decreasing=decreasing,
                                max_history=args.checkpoint_hist)
        if resume_checkpoint is not None and Path(args.resume).resolve().parent == output_dir.resolve():
            saver.load_state_dict_from_checkpoint(args.resume)
        args_dict = yaml.safe_load(args_text)
        args_dict['reduction_recipe'] = args.reduction_recipe
        (output_dir / 'args.yaml').write_text(yaml.safe_dump(args_dict, default_flow_style=False))
        _logger.info(f'Output: {output_dir}; {num_epochs - start_epoch} epochs of {updates_per_epoch} updates, '
                     f'global batch {args.batch_size * dist_info.world_size * args.grad_accum_steps}.')

    best_metric = None
    for epoch in range(start_epoch, num_epochs):
        if dist_info.distributed and hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            if args.prefetcher and train_loader.mixup_enabled:
                train_loader.mixup_enabled = False
            elif mixup_fn is not None:
                mixup_fn.mixup_enabled = False
        train_metrics = train_one_epoch(
            epoch, train_model, train_loader, optimizer, train_loss_fn, args, dist_info, lr_scheduler=lr_scheduler,
            amp_autocast=amp_autocast, loss_scaler=loss_scaler, model_ema=model_ema, ema_target=ema_target,
            mixup_fn=mixup_fn, saver=saver, hooks=hooks)
        eval_metrics: dict[str, float] = {}
        if val_loader is not None:
            eval_metrics = validate(model, val_loader, args, dist_info, amp_autocast, num_classes)
            if model_ema is not None and not args.model_ema_force_cpu:
                ema_metrics = validate(model_ema.module, val_loader, args, dist_info, amp_autocast, num_classes)
                eval_metrics = {**ema_metrics, **{f'model_{k}': v for k, v in eval_metrics.items()}}
            if dist_info.primary:
                _logger.info(f'Eval {epoch}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()) +
                             (' (EMA weights; model_* = raw weights)' if model_ema is not None else ''))
        metric = eval_metrics.get(args.eval_metric)
        if saver is not None:
            update_summary(epoch, train_metrics, eval_metrics, filename=str(output_dir / 'summary.csv'),
                           lr=train_metrics['lr'], write_header=best_metric is None and epoch == start_epoch)
            best_metric, _ = saver.save_checkpoint(epoch, metric=metric)
        lr_scheduler.step(epoch + 1, metric)

    if saver is not None:  # the best checkpoint (the last without validation), EMA weights when used
        best = output_dir / ('model_best.pth.tar' if best_metric is not None else 'last.pth.tar')
        metric = {f'val_{args.eval_metric}': best_metric} if best_metric is not None else {}
        export_model(model_ema.module if model_ema is not None else model, best, output_dir / 'model',
                     ema=model_ema is not None, data_config=data_config, metadata=metric)
    if dist_info.distributed:
        dist.barrier()
    return model


_DATA_CFG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


def model_data_config(args: argparse.Namespace, model: nn.Module, verbose: bool = False) -> dict[str, Any]:
    """timm's data config for `model` and the data flags; the input size defaults to the model's own (after
    `--model-kwargs img_size=...`), not its pretrained_cfg's."""
    data_args = vars(args).copy()
    if args.input_size is None and args.img_size is None:
        data_args['input_size'] = model_input_size(model)
    return resolve_data_config(data_args, model=model, verbose=verbose)


def export_model(model: nn.Module, checkpoint_path: Path, out_dir: Path, *, ema: bool, data_config: dict[str, Any],
                 metadata: dict[str, Any]) -> Path:
    """save_pretrained the weights (EMA weights if `ema`) of a training checkpoint, loaded into `model`.

    config.json also records the preprocessing the model was trained with, so `resolve_data_config(model=...)` of
    the loaded model finds the right mean, std and crop.
    """
    checkpoint = load_training_checkpoint(checkpoint_path)
    model.load_state_dict(checkpoint_state(checkpoint, ema=ema), strict=True)
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != 'tag'}  # the base's weight tag is not ours
    model.pretrained_cfg = {**cfg, **{k: data_config[k] for k in _DATA_CFG_KEYS if k in data_config}}
    metadata = {'trained_with': 'train.py', **metadata, 'checkpoint': checkpoint_path.name,
                'epoch': checkpoint['epoch'], 'ema': ema}
    directory = timm_reduce.save_pretrained(model, out_dir, metadata=metadata)
    _logger.info(f'Saved {"EMA " if ema else ""}weights of {checkpoint_path.name} (epoch {checkpoint["epoch"]}) '
                 f'to {directory}.')
    return directory


def _is_collective_failure(error: RuntimeError) -> bool:
    """True for errors of the process group (peer gone, timeout), not for bugs raised as RuntimeError."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(s in text for s in ('gloo', 'NCCL', 'Connection', 'Timed out'))


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:  # leave an embedding application's (or pytest's) logging alone
        setup_default_logging()
    args, args_text = parse_args(argv)
    dist_info = None
    try:
        dist_info = init_distributed(args.device, args.dist_backend, args.dist_timeout)
        if dist_info.distributed:
            _logger.info(f'Process {dist_info.rank}/{dist_info.world_size} on {dist_info.device}.')
        run(args, args_text, dist_info)
    except (TrainError, ReduceError) as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('train.py: interrupted (the last saved checkpoint can be passed to --resume).', file=sys.stderr)
        return 130
    except RuntimeError as e:
        if dist_info is None or not dist_info.distributed or not _is_collective_failure(e):
            raise
        cause = str(e).splitlines()[0] if str(e) else ''
        print(f'train.py: rank {dist_info.rank}: a collective operation with the other ranks failed (a rank was '
              f'killed, crashed or did not answer within --dist-timeout {args.dist_timeout:g}s); stopping this '
              f'rank. Cause: {type(e).__name__}: {cause}', file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
