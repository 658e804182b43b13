"""Accuracy vs. MLP budget on the CIFAR-10 benchmark ViT: FiPS (GMP, RigL, static, dense factors) against per-layer
truncated SVD, unstructured magnitude pruning, ShallowMLP (first-k, magnitude) and GroupedMLP at equal stored MLP
weight parameters, every method refit by the same block-wise calibration (`timm_reduce.compress`).

Also measures calibration time per epoch, the loop's FLOP rate against a matmul roof measured in the same run, and
the peak resident memory of one calibration against the engine's formula.

Example:
    python bench/compress_accuracy.py --model-dir /work/wt-train/bench/models/cifar10_vit \
        --data /work/shared/data/cifar10 --calib-batches 8 --batch-size 64 --epochs 4
Results go to bench/results/compress_accuracy.json (one record per run, written as they finish) and
bench/results/compress_accuracy.md (`--table-only A.json B.json` merges the results of parallel runs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import timm
import timm.data
import timm_reduce
from timm_reduce.calibration import calibration_report
from timm_reduce.core.discovery import find_mlp_sites
from timm_reduce.core.registry import register_strategy
from timm_reduce.summary import model_input_size

from common import reset_peak_rss, status_kib

RESULTS = Path(__file__).parent / 'results'


# ----------------------------------------------------------------------------------------- baseline strategies
class LowRankLinear(nn.Module):
    """y = B (A x) + b: a rank-r factorisation of a Linear, stored as its two factors.

    Without `output_moment` the truncated SVD of W; with E[y yᵀ] of the layer's output y = W x (data-aware) the
    rank-r W' minimising E‖(W - W') x‖²: W' = U_r U_rᵀ W with U_r the top eigenvectors of E[y yᵀ] (a PCA of the
    outputs)."""

    def __init__(self, linear: nn.Linear, rank: int, output_moment: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().double()
        if output_moment is None or float(output_moment.trace()) <= 0:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[:rank].sqrt()
            a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None]
        else:
            _, vectors = torch.linalg.eigh(output_moment.double())
            b = vectors.flip(1)[:, :rank]
            a = b.T @ w
        self.a = nn.Parameter(a.float())  # (r, in)
        self.b = nn.Parameter(b.float())  # (out, r)
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.a), self.b, self.bias)


@dataclass
class SvdConfig:
    """budget: fraction of each MLP weight matrix's parameters kept as r * (in + out)."""
    budget: float = 0.25


@register_strategy('bench_svd', SvdConfig, uses_statistics=True,
                   description='per-layer truncated SVD (benchmark baseline; data-aware with statistics)')
def _apply_svd(model: nn.Module, sites: list, config: SvdConfig, statistics: dict | None = None) -> None:
    for site in sites:
        stats = statistics[site.path] if statistics is not None else None
        for name in ('fc1', 'fc2'):
            layer = getattr(site.mlp, name)
            rank = max(1, math.floor(config.budget * layer.in_features * layer.out_features
                                     / (layer.in_features + layer.out_features)))
            moment = None
            if stats is not None and stats.input_moment is not None:
                w = layer.weight.detach().double()
                moment = w @ stats.input_moment @ w.T if name == 'fc1' else stats.output_moment
            setattr(site.mlp, name, LowRankLinear(layer, rank, moment))


@dataclass
class MagnitudeConfig:
    """budget: fraction of all MLP weights kept (one global magnitude threshold); masks are fixed."""
    budget: float = 0.25


@register_strategy('bench_magnitude', MagnitudeConfig, description='unstructured global magnitude pruning (baseline)',
                   calibration_hooks=lambda model, config: _MaskHooks(model))
def _apply_magnitude(model: nn.Module, sites: list, config: MagnitudeConfig) -> None:
    layers = [getattr(s.mlp, n) for s in sites for n in ('fc1', 'fc2')]
    scores = torch.cat([layer.weight.detach().abs().flatten() for layer in layers])
    keep = math.floor(config.budget * scores.numel())
    threshold = torch.topk(scores, keep).values.min()
    for layer in layers:
        mask = layer.weight.detach().abs() >= threshold
        layer.register_buffer('mask', mask)
        with torch.no_grad():
            layer.weight.mul_(mask)


class _MaskHooks:
    """Fixed masks: masked weights get no gradient, and stay zero with zero optimizer moments."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {f'{s.path}.{n}': getattr(s.mlp, n) for s in find_mlp_sites(model) for n in ('fc1', 'fc2')}
        self.optimizer = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        self.optimizer = optimizer

    def after_backward(self, step: int) -> None:
        for layer in self.layers.values():
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(layer.mask)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        for layer in self.layers.values():
            layer.weight.mul_(layer.mask)
            for value in self.optimizer.state.get(layer.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == layer.mask.shape:
                    value.mul_(layer.mask)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def masks(self) -> dict[str, torch.Tensor]:
        return {k: layer.mask for k, layer in self.layers.items()}


# ----------------------------------------------------------------------------------------------- methods
def method_spec(method: str, budget: float, group_size: int, total_steps: int) -> tuple[str, dict[str, Any]] | None:
    """(strategy, options) of a method at an MLP budget, or None when the method cannot hit the budget."""
    delta_t = max(1, total_steps // 10)
    fips = dict(budget=budget, group_size=group_size, delta_t=delta_t)
    if method == 'fips_gmp':
        return 'fips', {**fips, 'sparsity': 0.75, 'sparsifier': 'gmp'}
    if method == 'fips_rigl':
        return 'fips', {**fips, 'sparsity': 0.75, 'sparsifier': 'rigl'}
    if method == 'fips_static':
        return 'fips', {**fips, 'sparsity': 0.75, 'sparsifier': 'static'}
    if method == 'fips_dense':
        return 'fips', {**fips, 'sparsifier': 'dense'}
    if method == 'svd':  # from the weights, as measured before compress() had init_from
        return 'bench_svd', {'budget': budget, 'init_from': 'weights'}
    if method == 'svd_data':  # from activation statistics of the calibration images (PCA of each layer's output)
        return 'bench_svd', {'budget': budget, 'init_from': 'activations'}
    if method == 'magnitude':
        return 'bench_magnitude', {'budget': budget}
    if method == 'shallow_first':
        return 'shallow', {'keep': budget, 'importance': 'first'}
    if method == 'shallow_magnitude':
        return 'shallow', {'keep': budget, 'importance': 'magnitude'}
    if method in ('grouped', 'morph_scalar', 'morph_channel'):
        size = round(1 / budget)
        if not (abs(1 / size - budget) < 1e-9 and size <= 6 and 6 % size == 0):
            return None  # sharing whole layers only reaches 1/k of the MLP weights on 6 blocks
        if method == 'grouped':
            return 'grouped', {'group_size': size}
        return 'morphreuse', {'scope': 'group', 'group_size': size, 'scale': method.split('_')[1]}
    if method == 'morph_core':
        # per-block projections d x c twice + one small core: c = budget x hidden width of the benchmark ViT (512)
        return 'morphreuse', {'variant': 'core', 'core_dim': max(1, round(budget * MLP_HIDDEN))}
    raise ValueError(method)


MLP_HIDDEN = 512  # the benchmark ViT's MLP hidden width (embed dim 128, mlp_ratio 4)


def stored_mlp_weights(model: nn.Module) -> int:
    """Stored MLP weight parameters: non-zeros of masked weights, all entries of the others; shared tensors once."""
    from timm_reduce.core.sharing import tensor_identity

    counts: dict[tuple, int] = {}
    for site in find_mlp_sites(model):
        for module in site.mlp.modules():
            mask = getattr(module, 'mask', None)
            for name, p in module.named_parameters(recurse=False):
                if name == 'bias' or p.ndim < 2:
                    continue
                masked = isinstance(mask, torch.Tensor) and mask.shape == p.shape
                counts[tensor_identity(p)] = int(mask.sum()) if masked else p.numel()
    return sum(counts.values())


# -------------------------------------------------------------------------------------------------- data
def calibration_batches(args: argparse.Namespace, model: nn.Module) -> list[torch.Tensor]:
    """A seeded random `calib_batches x batch_size` subset of the training images, in batches."""
    root = str(Path(args.data) / 'train.tar')
    total = len(timm.data.create_dataset('', root=root))
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(total, generator=gen)[:args.calib_batches * args.batch_size].tolist()
    return list(load_images(root, model, idx, Path(args.image_cache))[0].split(args.batch_size))


def load_images(root: str, model: nn.Module, indices: list[int] | None, cache_dir: Path | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `root` (all, or `indices`) through the model's eval transforms, with their targets.

    With `cache_dir`, the tensors are kept there under a name derived from the data and the transform settings.
    """
    config = timm.data.resolve_data_config(model=model)
    config['input_size'] = model_input_size(model)
    key = hashlib.sha256(json.dumps([root, indices, sorted(config.items())], default=str).encode()).hexdigest()[:16]
    cache = cache_dir / f'images_{key}.pt' if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return torch.load(cache)
    dataset = timm.data.create_dataset('', root=root)
    dataset.transform = timm.data.create_transform(**config, is_training=False)
    indices = list(range(len(dataset))) if indices is None else indices
    items = [dataset[i] for i in indices]
    images = torch.stack([x for x, _ in items])
    targets = torch.tensor([int(y) for _, y in items])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f'.{os.getpid()}.tmp')
        torch.save((images, targets), tmp)
        os.replace(tmp, cache)
    return images, targets


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += (model(images[i:i + batch]).argmax(-1) == targets[i:i + batch]).sum().item()
    return 100.0 * correct / len(images)


def matmul_roof(size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a square fp32 matmul (median of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    rates = []
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        rates.append(2 * size ** 3 / (time.perf_counter() - tic) / 1e9)
    return statistics.median(rates)


# -------------------------------------------------------------------------------------------------- main
_WEIGHTS: dict[str, torch.Tensor] = {}


def load_model(model_dir: str, weights: str | None = None) -> nn.Module:
    """The benchmark model from a save_pretrained folder; `weights` (a timm training checkpoint) replaces them."""
    model = timm.create_model(f'local-dir:{Path(model_dir).resolve()}', pretrained=True)
    if weights:
        if weights not in _WEIGHTS:
            state = torch.load(weights, map_location='cpu', weights_only=False)  # a local, trusted timm checkpoint
            _WEIGHTS[weights] = state.get('state_dict', state)
        model.load_state_dict(_WEIGHTS[weights], strict=True)
    return model.eval()


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out_json = Path(args.out)
    records = json.loads(out_json.read_text()) if out_json.is_file() and args.resume else []
    done = {(r['method'], r['budget']) for r in records}
    base = load_model(args.model_dir, args.weights)
    calib = calibration_batches(args, base)
    val_images, val_targets = load_images(str(Path(args.data) / 'val.tar'), base, None, Path(args.image_cache))
    if args.val_limit:
        val_images, val_targets = val_images[:args.val_limit], val_targets[:args.val_limit]
    machine = {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(), 'threads': args.threads,
               'torch': torch.__version__, 'timm': timm.__version__, 'load_average_at_start': os.getloadavg()}
    command = 'python ' + ' '.join(sys.argv)
    model_source = {'model_dir': str(args.model_dir), 'weights': args.weights}
    print(f'machine {machine}\ncommand {command}', flush=True)
    mlp_weights = sum(getattr(s.mlp, n).weight.numel() for s in find_mlp_sites(base) for n in ('fc1', 'fc2'))

    def save(record: dict[str, Any]) -> None:
        records.append(record)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(records, indent=1))
        write_table(records, out_json.with_suffix('.md'))

    common = {'calib_images': args.calib_batches * args.batch_size, 'batch_size': args.batch_size, 'epochs': args.epochs, 'lr': args.lr,
              'val_images': len(val_images), 'machine': machine, 'command': command, 'model': model_source}
    if ('original', 1.0) not in done and not args.no_original:
        tic = time.perf_counter()
        acc = top1(base, val_images, val_targets)
        save({'method': 'original', 'budget': 1.0, 'top1': acc, 'stored_mlp_weights': mlp_weights,
              'bytes': timm_reduce.summary(base, macs=False)['bytes'],
              'eval_seconds': time.perf_counter() - tic, **common})
        print(f'original: {acc:.2f}%', flush=True)
    steps = args.epochs * args.calib_batches
    for budget in args.budgets:
        for method in args.methods:
            if (method, budget) in done:
                continue
            spec = method_spec(method, budget, args.group_size, steps)
            if spec is None:
                continue
            strategy, options = spec
            model = load_model(args.model_dir, args.weights)
            if args.no_calibrate:
                if method in ('fips_gmp', 'fips_rigl', 'svd_data'):  # they run during / need calibration data
                    continue
                options = {k: v for k, v in options.items() if k != 'init_from'}  # a compress() option
                timm_reduce.reduce(model, strategy, **options)
                acc = top1(model, val_images, val_targets)
                stored = stored_mlp_weights(model)
                save({'method': method, 'budget': budget, 'strategy': strategy, 'options': options, 'top1': acc,
                      'calibrated': False, 'stored_mlp_weights': stored, 'stored_fraction': stored / mlp_weights,
                      **common})
                print(f'{method:<18} {budget:>5.0%} top1 {acc:6.2f}% without calibration', flush=True)
                continue
            roof_before = matmul_roof()
            rss_before = status_kib('VmRSS')
            peak_ok = reset_peak_rss()
            tic = time.perf_counter()
            timm_reduce.compress(model, strategy, data=calib, epochs=args.epochs, batches=args.calib_batches,
                                 lr=args.lr, seed=args.seed, cache=args.cache, count_flops=True, evaluate=False,
                                 **options)
            seconds = time.perf_counter() - tic
            peak = (status_kib('VmHWM') - rss_before) * 1024 if peak_ok else None
            roof = statistics.median([roof_before, matmul_roof()])
            report = calibration_report(model)
            epoch_time = statistics.median(report.epoch_time)
            flop_rate = report.step_flops * report.steps_per_epoch / epoch_time / 1e9
            acc = top1(model, val_images, val_targets)
            stored = stored_mlp_weights(model)
            record = {
                'method': method, 'budget': budget, 'strategy': strategy, 'options': options, 'top1': acc,
                'stored_mlp_weights': stored, 'stored_fraction': stored / mlp_weights,
                'bytes': timm_reduce.summary(model, macs=False)['bytes'],
                'compress_seconds': seconds, 'epoch_seconds': epoch_time, 'epoch_loss': report.epoch_loss,
                'step_gflop': report.step_flops / 1e9, 'loop_gflops': flop_rate, 'matmul_roof_gflops': roof,
                'roof_fraction': flop_rate / roof, 'peak_rss_delta_bytes': peak,
                'memory_estimate': report.memory_estimate, **common}
            save(record)
            print(f'{method:<18} {budget:>5.0%} top1 {acc:6.2f}%  stored {stored / mlp_weights:6.1%}  '
                  f'epoch {epoch_time:5.1f}s  {flop_rate:5.1f} GFLOP/s = {flop_rate / roof:.0%} of roof {roof:.0f}  '
                  f'peak +{(peak or 0) / 2 ** 20:.0f} MiB (est. {report.memory_estimate["total"] / 2 ** 20:.0f})',
                  flush=True)


METHOD_NAMES = {
    'fips_gmp': 'FiPS (GMP)', 'fips_rigl': 'FiPS (RigL)', 'fips_static': 'FiPS (static)',
    'fips_dense': 'FiPS (dense factors)', 'svd': 'per-layer truncated SVD',
    'svd_data': 'per-layer truncated SVD, data-aware (PCA of outputs)', 'magnitude': 'magnitude pruning (global)',
    'shallow_first': 'ShallowMLP (first-k)', 'shallow_magnitude': 'ShallowMLP (magnitude)',
    'grouped': 'GroupedMLP (mean init)',
    'morph_scalar': 'MorphReuse shape, scalar scales', 'morph_channel': 'MorphReuse shape, channel scales',
    'morph_core': 'MorphReuse core (c = budget x 512)',
}


def write_table(records: list[dict[str, Any]], path: Path) -> None:
    budgets = sorted({r['budget'] for r in records if r['method'] != 'original'})
    original = next((r for r in records if r['method'] == 'original'), None)
    uncalibrated = [r for r in records if r.get('calibrated') is False]
    records = [r for r in records if r.get('calibrated') is not False]
    lines = ['| method (calibrated) | ' + ' | '.join(f'{b:.0%}' for b in budgets) + ' | reduce only: '
             + ' / '.join(f'{b:.0%}' for b in budgets) + ' |', '|---' * (len(budgets) + 2) + '|']
    for method, name in METHOD_NAMES.items():
        row = {r['budget']: r for r in records if r['method'] == method}
        plain = {r['budget']: r for r in uncalibrated if r['method'] == method}
        if row or plain:
            lines.append(f'| {name} | ' + ' | '.join(f"{row[b]['top1']:.2f}" if b in row else '–' for b in budgets)
                         + ' | ' + ' / '.join(f"{plain[b]['top1']:.2f}" if b in plain else '–' for b in budgets)
                         + ' |')
    if original:
        lines.append(f"| original model (100%) | {original['top1']:.2f}" + ' |' * (len(budgets) + 1))
    order = list(METHOD_NAMES)
    runs = sorted((r for r in records if r['method'] != 'original'),
                  key=lambda r: (order.index(r['method']), r['budget']))
    if runs:
        r0 = runs[0]
        lines += ['', f"Top-1 (%) on {r0['val_images']:,} CIFAR-10 test images (no fine-tuning); "
                      f"model {r0.get('model')}; "
                      f"calibration: {r0['calib_images']} "
                      f"train images ({r0['batch_size']} per batch), {r0['epochs']} epochs, lr {r0['lr']}.", '',
                  '| method | budget | stored MLP weights | bytes at rest | epoch (s) | loop GFLOP/s | roof GFLOP/s | '
                  'of roof |', '|---' * 8 + '|']
        for r in runs:
            size = f"{r['bytes'] / original['bytes']:.1%}" if original and 'bytes' in original else f"{r['bytes']:,}"
            lines.append(f"| {METHOD_NAMES[r['method']]} | {r['budget']:.0%} | {r['stored_fraction']:.1%} | {size} | "
                         f"{r['epoch_seconds']:.1f} | {r['loop_gflops']:.1f} | {r['matmul_roof_gflops']:.0f} | "
                         f"{r['roof_fraction']:.0%} |")
        lines += ['', 'Bytes at rest: the whole saved model (model.safetensors tensors) relative to the original. '
                      'Loop GFLOP/s: FLOPs of one calibration step (FlopCounterMode) x steps / epoch time; roof: a '
                      '1024x1024 fp32 matmul on the same threads, measured before and after each run.', '',
                  f"Command: `{r0['command']}`", f"Machine: {r0['machine']}"]
    path.write_text('\n'.join(lines) + '\n')


def probe_memory(args: argparse.Namespace) -> None:
    """One calibration epoch in this fresh process: peak resident memory growth vs. the engine's formula (JSON)."""
    torch.set_num_threads(args.threads)
    method, budget = args.probe_memory[0], float(args.probe_memory[1])
    model = load_model(args.model_dir, args.weights)
    calib = calibration_batches(args, model)
    strategy, options = method_spec(method, budget, args.group_size, args.calib_batches)
    # warm-up on one batch: library code pages and kernel caches touched once are not calibration memory
    timm_reduce.compress(load_model(args.model_dir, args.weights), strategy, data=calib[:1], epochs=1, batches=1,
                         cache=args.cache, evaluate=False, **options)
    rss = status_kib('VmRSS')
    if not reset_peak_rss():
        raise SystemExit('cannot reset the peak RSS (/proc/self/clear_refs)')
    timm_reduce.compress(model, strategy, data=calib, epochs=1, batches=args.calib_batches, lr=args.lr,
                         cache=args.cache, evaluate=False, **options)
    peak = (status_kib('VmHWM') - rss) * 1024
    estimate = calibration_report(model).memory_estimate
    base = load_model(args.model_dir, args.weights)
    teacher = sum(p.numel() * p.element_size() for p in base.parameters())
    print(json.dumps({'method': method, 'budget': budget, 'cache': args.cache, 'batch_size': args.batch_size,
                      'batches': args.calib_batches, 'peak_rss_growth_bytes': peak, 'formula': estimate,
                      'teacher_copy_bytes': teacher, 'command': 'python ' + ' '.join(sys.argv)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model-dir', required=True)
    parser.add_argument('--weights', help='a timm training checkpoint (.pth.tar) to load into --model-dir\'s model')
    parser.add_argument('--data', default='/work/shared/data/cifar10')
    parser.add_argument('--calib-batches', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--lr', type=float, default=5e-4)
    parser.add_argument('--cache', default='none')
    parser.add_argument('--group-size', type=int, default=3, help='FiPS blocks per shared basis')
    parser.add_argument('--budgets', type=float, nargs='+', default=[0.25, 0.5, 0.1, 0.4])
    parser.add_argument('--methods', nargs='+', default=list(METHOD_NAMES))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1 is fastest on a loaded machine)')
    parser.add_argument('--val-limit', type=int, default=0, help='evaluate on the first N test images (0 = all)')
    parser.add_argument('--image-cache', default='/tmp/timm_reduce_bench', help='folder caching decoded images')
    parser.add_argument('--out', default=str(RESULTS / 'compress_accuracy.json'))
    parser.add_argument('--no-calibrate', action='store_true',
                        help='reduce only (no calibration): what the calibration adds; FiPS GMP/RigL are skipped')
    parser.add_argument('--no-original', action='store_true', help='do not evaluate the original model')
    parser.add_argument('--resume', action='store_true', help='skip (method, budget) pairs already in --out')
    parser.add_argument('--probe-memory', nargs=2, metavar=('METHOD', 'BUDGET'),
                        help='measure one calibration epoch\'s peak memory in this process and print JSON')
    parser.add_argument('--table-only', nargs='*', metavar='JSON',
                        help='merge these result files (later ones replace the same runs of earlier ones) into --out '
                             'and its Markdown table, without running')
    args = parser.parse_args()
    if args.table_only is not None:
        merged: dict[tuple, dict] = {}  # a later file's run of the same (method, budget, calibrated) replaces it
        for f in args.table_only:
            for r in json.loads(Path(f).read_text()):
                merged.pop((r['method'], r['budget'], r.get('calibrated', True)), None)
                merged[(r['method'], r['budget'], r.get('calibrated', True))] = r
        records = list(merged.values())
        Path(args.out).write_text(json.dumps(records, indent=1))
        write_table(records, Path(args.out).with_suffix('.md'))
        return
    if args.probe_memory:
        probe_memory(args)
        return
    run(args)


if __name__ == '__main__':
    main()
