"""Top-1 / top-5 accuracy of a model on an image folder or tar that timm reads."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ReduceError

__all__ = ['EvalResult', 'evaluate', 'eval_loader', 'find_split', 'SPLIT_SYNONYMS']

_logger = logging.getLogger(__name__)

SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))


@dataclass
class EvalResult:
    top1: float
    top5: float
    images: int
    seconds: float


def find_split(root: str, split: str) -> str | None:
    """The folder or .tar of split `split` under `root`, by its name or a synonym (`validation` finds `val.tar`)."""
    names = [split, *next((group for group in SPLIT_SYNONYMS if split in group), ())]
    for name in dict.fromkeys(names):
        for candidate in (name, f'{name}.tar'):
            if os.path.exists(os.path.join(root, candidate)):
                return os.path.join(root, candidate)
    return None


def _data_root(root: str, split: str | None) -> str:
    """The image folder or .tar to read: `root` itself, or its `split` (default: a validation split when `root`
    holds one, as the DATA folder of train.py does)."""
    if not os.path.exists(root):
        raise ReduceError(f'Data path {root} does not exist (expected an image folder or a .tar of class folders).')
    if not os.path.isdir(root):
        return root
    found = find_split(root, split or 'validation')
    if split is not None and found is None:
        raise ReduceError(f'Split {split!r} not found in {root}: it holds {", ".join(sorted(os.listdir(root))[:10])}.')
    if found is not None:
        _logger.info(f'Reading split {found}.')
        return found
    tars = sorted(f for f in os.listdir(root) if f.endswith('.tar'))
    if tars:
        raise ReduceError(f'{root} holds tar files ({", ".join(tars[:5])}) but no validation split: pass one of them '
                          f'(--data {os.path.join(root, tars[0])}) or --split NAME.')
    return root


def eval_loader(model: nn.Module, root: str, batch_size: int = 128, workers: int = 2, limit: int | None = None,
                split: str | None = None):
    """A DataLoader over `root` (image folder or .tar, or a folder holding splits) with the model's eval transforms."""
    from timm.data import create_dataset, create_transform, resolve_model_data_config
    from timm.models import get_model_input_config

    root = _data_root(root, split)
    config = resolve_model_data_config(model)
    config['input_size'] = get_model_input_config(model)['input_size']
    dataset = create_dataset('', root=root, transform=create_transform(**config, is_training=False))
    if len(dataset) == 0:
        raise ReduceError(f'No images found in {root}.')
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader, progress: bool = False) -> EvalResult:
    """Top-1 and top-5 accuracy in percent over every (images, targets) batch of `loader`."""
    import time

    from tqdm import tqdm

    model.eval()
    correct1 = correct5 = total = 0
    start = time.perf_counter()
    for images, targets in tqdm(loader, desc='eval', disable=not progress, leave=False):
        logits = model(images)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top.eq(targets.view(-1, 1))
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        total += targets.numel()
    return EvalResult(100 * correct1 / total, 100 * correct5 / total, total, time.perf_counter() - start)
