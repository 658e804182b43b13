"""`timm-reduce demo`: a one-minute tour on real images that ship with scikit-learn (8x8 handwritten digits).

Trains a small ViT for a few seconds, reduces copies of it with each strategy, fine-tunes briefly where the strategy
needs it, saves and reloads every result, and prints one table: params, unique params, bytes at rest, accuracy, time.
Nothing is downloaded.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ReduceError

__all__ = ['run_demo', 'load_digits_tensors', 'DemoRow']

MODEL = 'vit_tiny_patch16_224'
MODEL_KWARGS = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                    pretrained_cfg_overlay=dict(mean=(0.3,), std=(0.4,)))  # the normalisation used below
# (label, strategy spec, how): 'reduce' only; 'calibrate' = compress() with 8 unlabeled batches of training
# images (block-wise, 10 epochs); 'finetune' = 2 labeled epochs after reducing; 'scratch' = train the reduced shape
PLAN = [
    ('shallow keep=0.5', 'shallow:keep=0.5', 'reduce'),
    ('shallow keep=0.5 + calibration', 'shallow:keep=0.5', 'calibrate'),
    ('grouped pairs', 'grouped:group_size=2', 'reduce'),
    ('grouped pairs + calibration', 'grouped:group_size=2', 'calibrate'),
    ('grouped pairs + 2 ep fine-tune', 'grouped:group_size=2', 'finetune'),
    ('fips 25% (static, no data)', 'fips:budget=0.25,group_size=2,sparsifier=static', 'reduce'),
    ('fips 25% + calibration (GMP)', 'fips:budget=0.25,group_size=2,sparsifier=gmp,delta_t=8', 'calibrate'),
    ('morphreuse shape, all blocks', 'morphreuse:scale=channel', 'reduce'),
    ('morphreuse shape + calibration', 'morphreuse:scale=channel', 'calibrate'),
    ('thin mlp_ratio=2 (scratch)', 'thin:mlp_ratio=2', 'scratch'),
]


@dataclass
class DemoRow:
    name: str
    params: int
    unique_params: int
    stored_params: int
    file_bytes: int
    top1: float
    seconds: float


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as normalised (N, 1, 8, 8) tensors, split 80/20 per class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ReduceError("The demo needs scikit-learn: pip install 'timm_reduce[demo]'") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_val = len(y) // 5
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
           desc: str = 'train') -> None:
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit='epoch', leave=False):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


def _saved_and_reloaded(model: nn.Module, x: torch.Tensor) -> int:
    """Save, reload through timm's local-dir loader, check outputs are identical; returns the weights file's bytes."""
    import timm

    from .persistence.serialization import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        size = (Path(tmp) / 'model.safetensors').stat().st_size
        loaded = timm.create_model(f'local-dir:{tmp}', pretrained=True).eval()
        model.eval()
        with torch.no_grad():
            if not torch.equal(model(x), loaded(x)):
                raise RuntimeError('Round trip through save_pretrained/local-dir changed the outputs.')
    return size


def run_demo(epochs: int = 30, seed: int = 0, print_fn=print) -> list[DemoRow]:
    """Run the tour and print the table; returns its rows.

    Runs on one intra-op thread: the model is tiny, and on a busy machine a 2-thread process stalls at its own
    thread barriers (seen here: minutes instead of seconds).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(epochs, seed, print_fn)
    finally:
        torch.set_num_threads(threads)


def _run_demo(epochs: int, seed: int, print_fn) -> list[DemoRow]:
    import timm

    from .core.api import reduce
    from .calibration import compress
    from .summary import summary

    torch.manual_seed(seed)
    xt, yt, xv, yv = load_digits_tensors(seed)
    print_fn(f'Digits: {len(yt)} train / {len(yv)} val images (8x8, from scikit-learn). '
             f'Training a {MODEL_KWARGS["depth"]}-block ViT (dim {MODEL_KWARGS["embed_dim"]}) for {epochs} epochs...')
    rows = []

    def row(name: str, model: nn.Module, seconds: float) -> None:
        info = summary(model, macs=False)
        rows.append(DemoRow(name, info['params'], info['unique_params'], info['stored_params'],
                            _saved_and_reloaded(model, xv[:8]),
                            _accuracy(model, xv, yv), seconds))

    start = time.perf_counter()
    base = timm.create_model(MODEL, **MODEL_KWARGS)
    _train(base, xt, yt, epochs, 3e-3, seed, 'original')
    row('original', base, time.perf_counter() - start)
    calib_data = list(xt[:512].split(64))  # unlabeled images: calibration never sees a label
    for name, spec, how in PLAN:
        start = time.perf_counter()
        if how == 'scratch':
            torch.manual_seed(seed)
            model = timm.create_model('timm_reduce', base=MODEL, reduce=spec, **MODEL_KWARGS)
            _train(model, xt, yt, epochs, 3e-3, seed, name)
        elif how == 'calibrate':
            model = compress(copy.deepcopy(base), spec, data=calib_data, epochs=10, lr=3e-3, seed=seed)
        else:
            model = reduce(copy.deepcopy(base), spec)
            if how == 'finetune':
                _train(model, xt, yt, 2, 5e-4, seed, name)
        row(name, model, time.perf_counter() - start)
    print_fn(format_table(rows))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    ref = rows[0]
    lines = [f"{'model':<32} {'params':>9} {'stored':>9} {'vs orig':>8} {'bytes':>9} {'vs orig':>8} {'top-1':>7} "
             f"{'time':>6}"]
    for r in rows:
        lines.append(f'{r.name:<32} {r.params:>9,} {r.stored_params:>9,} {r.stored_params / ref.stored_params:>8.1%} '
                     f'{r.file_bytes:>9,} {r.file_bytes / ref.file_bytes:>8.1%} {r.top1:>6.2f}% {r.seconds:>5.1f}s')
    lines.append('params: as used by the forward pass; stored: unique parameters, sparse factors by their non-zeros; '
                 'bytes: model.safetensors; top-1 on the held-out digits; time: training (original, thin) or reduce '
                 '+ calibration / fine-tune. Every model was saved, reloaded with '
                 "timm.create_model('local-dir:...') and checked for identical outputs.")
    return '\n'.join(lines)
