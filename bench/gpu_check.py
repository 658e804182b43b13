#!/usr/bin/env python3
"""One GPU check of timm_reduce in at most 5 minutes: the `cuda` tests, then measurements on one GPU.

    bash bench/gpu_check.sh [OUT_DIR]        # on the GPU machine; about 4.5 minutes
    python bench/gpu_check.py --smoke        # tiny models, CPU allowed: exercises every code path, measures nothing

Sections, in this order, each checking the global deadline first (a section that would overrun is recorded as
"skipped: time budget"; results are rewritten after every section, so a kill still leaves what was done):

0. environment (torch, timm, GPU);
1. `pytest -m cuda tests/test_cuda.py` (pass/fail counts, log in OUT/pytest.log);
2a. inference images/s of the original and every strategy at batch 256 on the deit_small / deit_base shapes
    (pretrained=False, 1000 classes), bf16 autocast, eager: variants alternate in one process (3 passes, medians),
    ratios vs the original of the same pass;
2d. torch.compile (inductor) of the 2a models: the first (deit_small) model's variants next, while time for 2b and
    2c remains, the others (deit_base) after 2c as the deadline allows: compile seconds and compiled images/s,
    alternating like 2a;
2b. train.py images/s (its own meter: first update to last, includes data loading) of the original vs
    shallow / grouped / fips on deit_small, `--amp` (fp16 + loss scaling), on generated JPEGs;
2c. `compress(..., 'fips')` on the deit_base shape: 3,840 images (30 batches of 128, held on the host as a
    DataLoader gives them), 1 epoch: step time and peak GPU memory (fp32, then amp='bf16' and 'fp16' as time
    allows).

Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: the argument, else $OUT, else bench/results/gpu_check).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'bench')]

import timm  # noqa: E402
import timm_reduce  # noqa: E402
from common import machine  # noqa: E402

VARIANTS: dict[str, str | None] = {  # label -> reduction spec (None: the original)
    'original': None,
    'thin': 'thin:mlp_ratio=2',
    'shallow': 'shallow:keep=0.5',
    'grouped': 'grouped:group_size=2',
    'fips': 'fips:budget=0.25,sparsifier=static',  # reduce only (no calibration), final sparsity: a deployed shape
    'morphreuse': 'morphreuse:variant=shape',
}
COMPILE_ORDER = ['original', 'shallow', 'fips', 'grouped', 'thin', 'morphreuse']  # most telling first
TRAIN_VARIANTS = ['original', 'shallow', 'grouped', 'fips']
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


@dataclass
class Profile:
    """Sizes of one run: `full` for the GPU, `smoke` for seconds on any machine."""

    name: str
    models: dict[str, tuple[str, dict[str, Any]]]
    batch: int
    warmup: int
    iters: int
    passes: int
    img_size: int
    train_model: tuple[str, dict[str, Any]]
    train_images: int
    train_batch: int
    train_epochs: int
    calib_model: tuple[str, dict[str, Any]]
    calib_batches: int
    calib_batch: int
    compile_backend: str
    first_compile_guess_s: float
    test_timeout_s: float
    train_timeout_s: float


FULL = Profile(
    name='full', models={'deit_small': ('deit_small_patch16_224', {}), 'deit_base': ('deit_base_patch16_224', {})},
    batch=256, warmup=3, iters=10, passes=3, img_size=224, train_model=('deit_small_patch16_224', {}),
    train_images=2048, train_batch=128, train_epochs=2, calib_model=('deit_base_patch16_224', {}), calib_batches=30,
    calib_batch=128, compile_backend='inductor', first_compile_guess_s=30.0, test_timeout_s=110.0,
    train_timeout_s=90.0)
SMOKE = Profile(
    name='smoke', models={'tiny_vit': ('vit_tiny_patch16_224', TINY_VIT)}, batch=8, warmup=1, iters=2, passes=2,
    img_size=32, train_model=('vit_tiny_patch16_224', TINY_VIT), train_images=48, train_batch=8, train_epochs=2,
    calib_model=('vit_tiny_patch16_224', TINY_VIT), calib_batches=4, calib_batch=8, compile_backend='eager',
    first_compile_guess_s=10.0, test_timeout_s=120.0, train_timeout_s=120.0)


class Budget:
    """A global deadline: sections ask before they start whether their estimated time still fits."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


@dataclass
class Results:
    out: Path
    data: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        """Rewrite the JSON and the markdown (atomically) with everything measured so far."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (('gpu_check.json', json.dumps(self.data, indent=2, default=str)),
                           ('gpu_check.md', render_markdown(self.data))):
            tmp = self.out / f'.{name}.tmp'
            tmp.write_text(text + '\n')
            os.replace(tmp, self.out / name)


def log(msg: str) -> None:
    print(f'[gpu_check] {msg}', flush=True)


def skipped(budget: Budget, need: float) -> dict[str, Any]:
    return {'skipped': 'time budget', 'needed_s': round(need, 1), 'left_s': round(budget.left(), 1)}


# ----------------------------------------------------------------------------------------------------- 0: env
def environment(device: torch.device) -> dict[str, Any]:
    env = machine()
    env['device'] = str(device)
    env['cuda'] = torch.version.cuda
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=f'{props.major}.{props.minor}', gpus=torch.cuda.device_count())
    return env


# ----------------------------------------------------------------------------------------------------- 1: tests
def run_tests(out: Path, budget: Budget, profile: Profile) -> dict[str, Any]:
    limit = min(profile.test_timeout_s, budget.left() - 10)
    if limit < 20:
        return skipped(budget, 20)
    cmd = [sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', 'tests/test_cuda.py', '-p', 'no:cacheprovider']
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    tic = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        text, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = _text(e.stdout) + _text(e.stderr) + f'\n[gpu_check] pytest killed after {limit:.0f} s\n', 'timeout'
    (out / 'pytest.log').write_text(text)
    counts = {k: 0 for k in ('passed', 'failed', 'errors', 'skipped')}
    for n, word in re.findall(r'(\d+) (passed|failed|errors?|skipped)', text.strip().splitlines()[-1] if text else ''):
        counts['errors' if word.startswith('error') else word] = int(n)
    failures = re.findall(r'^(?:FAILED|ERROR) (\S+)', text, flags=re.M)
    return {'command': ' '.join(cmd), 'returncode': rc, **counts, 'failures': failures,
            'seconds': round(time.perf_counter() - tic, 1)}


def _text(value: Any) -> str:
    return value.decode(errors='replace') if isinstance(value, bytes) else (value or '')


# ----------------------------------------------------------------------------------------------------- 2a/2d
def build(name: str, kwargs: dict[str, Any], spec: str | None, device: torch.device) -> torch.nn.Module:
    """The model on `device` in eval mode, reduced there (so the strategies' device paths run too)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).to(device).eval()
    if spec:
        timm_reduce.reduce(model, spec)
    return model


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds_per_batch(run: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Wall time of `iters` calls, per call: CUDA events on a GPU (the queue is drained first), else perf_counter."""
    if device.type == 'cuda':
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    tic = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - tic) / iters


def forward_fn(model: Callable, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode(), (torch.autocast(x.device.type, dtype=dtype) if dtype else
                                      contextlib.nullcontext()):
            return model(x)
    return run


def side_by_side(runs: dict[str, Callable[[], Any]], profile: Profile, batch: int, device: torch.device,
                 budget: Budget) -> dict[str, dict[str, Any]]:
    """Images/s of every variant, alternating within each pass; median over passes, ratio to 'original' per pass."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for p in range(profile.passes):
        if p and not budget.allows(5):
            break
        for label, run in runs.items():
            rates[label].append(batch / seconds_per_batch(run, profile.iters, device))
    out: dict[str, dict[str, Any]] = {}
    for label, values in rates.items():
        row: dict[str, Any] = {'img_s': round(statistics.median(values), 1),
                               'img_s_passes': [round(v, 1) for v in values]}
        if 'original' in rates and label != 'original':
            row['ratio'] = round(statistics.median(v / o for v, o in zip(values, rates['original'])), 3)
        out[label] = row
    return out


def inference_eager(profile: Profile, device: torch.device, dtype: torch.dtype | None, budget: Budget,
                    models: dict[str, dict[str, torch.nn.Module]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, (name, kwargs) in profile.models.items():
        need = 10 if profile.name == 'smoke' else (15 if key == 'deit_small' else 30)
        if not budget.allows(need):
            result[key] = skipped(budget, need)
            continue
        tic = time.perf_counter()
        built: dict[str, torch.nn.Module] = {}
        info: dict[str, Any] = {}
        for label, spec in VARIANTS.items():
            try:
                built[label] = build(name, kwargs, spec, device)
                s = timm_reduce.summary(built[label], macs=False)
                info[label] = {'spec': spec, 'params': s['params'], 'unique_params': s['unique_params'],
                               'stored_params': s['stored_params']}
            except Exception as e:  # one broken strategy must not hide the others
                info[label] = {'spec': spec, 'error': f'{type(e).__name__}: {e}'}
                log(f'{key} {label}: build failed: {e}')
        models[key] = built
        x = torch.randn(profile.batch, 3, profile.img_size, profile.img_size, device=device)
        runs = {label: forward_fn(m, x, dtype) for label, m in built.items()}
        for run in runs.values():
            for _ in range(profile.warmup):
                run()
        sync(device)
        rows = side_by_side(runs, profile, profile.batch, device, budget)
        result[key] = {label: {**info[label], **rows.get(label, {})} for label in VARIANTS}
        result[key]['_seconds'] = round(time.perf_counter() - tic, 1)
        log(f'eager {key}: ' + ', '.join(f'{k} {v.get("img_s", "-")}' for k, v in rows.items()))
    return result


def inference_compiled(profile: Profile, device: torch.device, dtype: torch.dtype | None, budget: Budget,
                       models: dict[str, dict[str, torch.nn.Module]], results: Results, keys: list[str],
                       reserve: float = 0.0) -> dict[str, Any]:
    """Compile the variants of `keys` in COMPILE_ORDER while the estimated cost (slowest compile so far + 30%)
    still fits, leaving `reserve` seconds for the sections after this one."""
    import torch._dynamo

    for attr in ('recompile_limit', 'cache_size_limit', 'accumulated_recompile_limit', 'accumulated_cache_size_limit'):
        if hasattr(torch._dynamo.config, attr):  # many models share Block.forward: do not fall back to eager
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 256))
    result: dict[str, Any] = results.data.setdefault('inference_compile', {})
    slowest = results.data.setdefault('_slowest_compile_s', profile.first_compile_guess_s)
    for key in keys:
        built = models.get(key, {})
        x = torch.randn(profile.batch, 3, profile.img_size, profile.img_size, device=device)
        runs: dict[str, Callable[[], Any]] = {}
        rows: dict[str, Any] = {}
        measure_s = 8 if profile.name == 'full' else 2
        for label in COMPILE_ORDER:
            if label not in built:
                continue
            need = slowest * 1.3 + measure_s
            if not budget.allows(need + reserve):
                rows[label] = skipped(budget, need)
                continue
            compiled = torch.compile(built[label], backend=profile.compile_backend)
            run = forward_fn(compiled, x, dtype)
            try:
                sync(device)
                tic = time.perf_counter()
                run()
                sync(device)
                seconds = time.perf_counter() - tic
                for _ in range(profile.warmup):
                    run()
                sync(device)
            except Exception as e:
                rows[label] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
                log(f'compile {key} {label} failed: {e}')
                continue
            slowest = max(slowest if runs else 0.0, seconds)
            results.data['_slowest_compile_s'] = slowest
            runs[label] = run
            rows[label] = {'compile_s': round(seconds, 1)}
            log(f'compiled {key} {label} in {seconds:.1f} s ({budget.left():.0f} s left)')
            result[key] = rows
            results.save()
        if runs and budget.allows(measure_s / 2 + reserve):
            for label, row in side_by_side(runs, profile, profile.batch, device, budget).items():
                rows[label].update(row)
        result[key] = rows
        results.save()
    return result


# ----------------------------------------------------------------------------------------------------- 2b: train
def make_jpeg_folder(root: Path, images: int, size: int, classes: int = 8) -> Path:
    """`root/train/c<k>/<i>.jpg`: smooth random colour fields plus noise (decode cost like small photos)."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        low = rng.integers(0, 256, (max(size // 8, 2), max(size // 8, 2), 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
        folder = root / 'train' / f'c{i % classes}'
        Image.fromarray(arr.astype(np.uint8)).save(folder / f'{i}.jpg', quality=90)

    for k in range(classes):
        (root / 'train' / f'c{k}').mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(images)))
    return root


def train_throughput(profile: Profile, device: torch.device, out: Path, budget: Budget,
                     results: Results) -> dict[str, Any]:
    result: dict[str, Any] = results.data.setdefault('train', {})
    tic = time.perf_counter()
    data = make_jpeg_folder(Path(tempfile.mkdtemp(prefix='gpu_check_data_')), profile.train_images,
                            profile.img_size)
    result['_data'] = {'images': profile.train_images, 'size': profile.img_size, 'classes': 8,
                       'seconds_to_write': round(time.perf_counter() - tic, 1)}
    name, kwargs = profile.train_model
    workers = 0 if profile.name == 'smoke' else max(1, min(12, (os.cpu_count() or 2) - 2))
    base = [sys.executable, str(ROOT / 'train.py'), str(data), '--model', name, '--num-classes', '8',
            '-b', str(profile.train_batch), '--epochs', str(profile.train_epochs), '--opt', 'adamw', '--lr', '5e-4',
            '--warmup-epochs', '0', '--val-split', '', '--workers', str(workers), '--amp', '--log-interval', '10',
            '--checkpoint-hist', '1', '--seed', '0', '--device', device.type, '--output', str(out / 'train')]
    if device.type == 'cuda':
        base.append('--pin-mem')
    if kwargs:
        base += ['--model-kwargs', *(f'{k}={v}' for k, v in kwargs.items())]
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    slowest = 25.0 if profile.name == 'full' else 15.0
    for label in TRAIN_VARIANTS:
        need = slowest * 1.2
        if not budget.allows(need):
            result[label] = skipped(budget, need)
            continue
        spec = VARIANTS[label]
        cmd = base + ['--experiment', label] + (['--reduction-spec', spec] if spec else [])
        tic = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=min(profile.train_timeout_s, budget.left() - 5))
            text, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = _text(e.stdout) + _text(e.stderr), 'timeout'
        seconds = time.perf_counter() - tic
        slowest = max(slowest, seconds)
        (out / 'train' / f'{label}.log').parent.mkdir(parents=True, exist_ok=True)
        (out / 'train' / f'{label}.log').write_text(text)
        row: dict[str, Any] = {'spec': spec, 'returncode': rc, 'seconds': round(seconds, 1)}
        summary = out / 'train' / label / 'summary.csv'
        if rc == 0 and summary.is_file():
            with open(summary) as f:
                rates = [float(r['train_img_per_sec']) for r in csv.DictReader(f)]
            row.update(img_s_per_epoch=[round(r, 1) for r in rates], img_s=round(rates[-1], 1))
        else:
            row['error_tail'] = text[-1500:]
        row['amp'] = 'fp16 + loss scaling' if 'loss scaling' in text else ('bf16' if 'bfloat16' in text else '?')
        result[label] = row
        log(f'train {label}: {row.get("img_s", "failed")} img/s ({seconds:.0f} s)')
        results.save()
    orig = result.get('original', {}).get('img_s')
    for label in TRAIN_VARIANTS[1:]:
        if orig and 'img_s' in result.get(label, {}):
            result[label]['ratio'] = round(result[label]['img_s'] / orig, 3)
    return result


# ----------------------------------------------------------------------------------------------------- 2c: calib
def calibration(profile: Profile, device: torch.device, budget: Budget, results: Results) -> dict[str, Any]:
    result: dict[str, Any] = results.data.setdefault('calibration', {})
    name, kwargs = profile.calib_model
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (profile.calib_batch, 3, profile.img_size, profile.img_size)
    batches = [torch.randn(shape, generator=gen, device=device).cpu() for _ in range(profile.calib_batches)]
    amp_supported = 'amp' in timm_reduce.CalibrationConfig.option_names()
    precisions = [None, 'bf16', 'fp16'] if amp_supported else [None]
    need = 40.0 if profile.name == 'full' else 5.0
    for amp in precisions:
        label = amp or 'fp32'
        if not budget.allows(need):
            result[label] = skipped(budget, need)
            continue
        if device.type == 'cuda':  # the inference models of 2a stay resident: count from here
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device) if device.type == 'cuda' else 0
        model = build(name, kwargs, None, device)
        model_mem = (torch.cuda.memory_allocated(device) if device.type == 'cuda' else 0) - base_mem
        options = dict(budget=0.25, epochs=1, batches=profile.calib_batches, evaluate=False)
        if amp:
            options['amp'] = amp
        tic = time.perf_counter()
        try:
            timm_reduce.compress(model, 'fips', data=batches, **options)
        except Exception as e:
            result[label] = {'error': f'{type(e).__name__}: {str(e)[:500]}'}
            log(f'calibration {label} failed: {e}')
            continue
        sync(device)
        wall = time.perf_counter() - tic
        need = max(need, wall * 1.2)
        report = timm_reduce.calibration_report(model)
        epoch_s = report.epoch_time[0]
        row = {'model': name, 'amp': report.amp, 'images': report.images, 'batch': profile.calib_batch,
               'steps': report.steps_per_epoch,
               'step_s': round(epoch_s / report.steps_per_epoch, 4), 'epoch_s': round(epoch_s, 2),
               'wall_s': round(wall, 1), 'loss': report.epoch_loss,
               'estimate_gib': round(report.memory_estimate['total'] / 2 ** 30, 2),
               'estimate_images_gib': round(report.memory_estimate['images'] / 2 ** 30, 2),
               'images_held_on': 'host (as a DataLoader gives them)'}
        if device.type == 'cuda':
            row.update(peak_gib=round((torch.cuda.max_memory_allocated(device) - base_mem) / 2 ** 30, 2),
                       model_gib=round(model_mem / 2 ** 30, 2),
                       peak_note='max_memory_allocated during compress() minus what other sections held')
        result[label] = row
        log(f'calibration {label}: {row["step_s"]} s/step, peak {row.get("peak_gib", "-")} GiB')
        del model
        results.save()
    return result


# ----------------------------------------------------------------------------------------------------- report
def _cell(row: dict[str, Any] | None, value: str = 'img_s') -> str:
    if not row:
        return '–'
    if 'skipped' in row:
        return 'skipped (time)'
    if 'error' in row:
        return 'error'
    if value not in row:
        return '–'
    ratio = row.get('ratio')
    return f'{row[value]:,.0f}' + (f' ({ratio:.2f}x)' if ratio is not None else '')


def render_markdown(data: dict[str, Any]) -> str:
    env = data.get('env', {})
    lines = []
    if data.get('profile') == 'smoke':
        lines += ['# gpu_check SMOKE RUN — tiny models, not a measurement', '']
    lines += [f"# gpu_check: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch')}, "
              f"timm {env.get('timm')}, CUDA {env.get('cuda')}", '',
              f"commit {env.get('commit')}, {env.get('date_utc')} UTC, wall {data.get('wall_s', '?')} s", '']
    tests = data.get('tests')
    if tests:
        if 'skipped' in tests and isinstance(tests['skipped'], str):
            lines += ['tests: skipped (time budget)', '']
        else:
            lines += [f"tests (`-m cuda tests/test_cuda.py`): {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped ({tests['seconds']} s)"
                      + (f"; failures: {', '.join(tests['failures'])}" if tests['failures'] else ''), '']
    eager, compiled = data.get('inference_eager', {}), data.get('inference_compile', {})
    keys = [k for k in eager if not k.startswith('_')]
    if keys:
        cfg = data.get('inference_config', {})
        lines += [f"## Inference images/s, batch {cfg.get('batch')}, {cfg.get('precision')} (ratio vs original, "
                  f"same pass; median of {cfg.get('passes')} alternating passes)", '',
                  '| variant | ' + ' | '.join(f'{k} eager | {k} compile' for k in keys) + ' | compile s |',
                  '|---|' + '---|---|' * len(keys) + '---|']
        for label in VARIANTS:
            cells = []
            for k in keys:
                cells += [_cell(eager[k].get(label) if isinstance(eager[k], dict) else None),
                          _cell(compiled.get(k, {}).get(label))]
            comp = ' / '.join(str(compiled.get(k, {}).get(label, {}).get('compile_s', '–')) for k in keys)
            lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {comp} |')
        lines.append('')
    train = data.get('train', {})
    if any(k in train for k in TRAIN_VARIANTS):
        d = train.get('_data', {})
        cfg = data.get('train_config', {})
        lines += [f"## train.py images/s ({cfg.get('model')}, `--amp`, batch {cfg.get('batch')}, "
                  f"{cfg.get('epochs')} epochs of {d.get('images')} generated {d.get('size')} px JPEGs; last epoch, "
                  'includes data loading)', '', '| variant | img/s (ratio) | per epoch | AMP | run s |',
                  '|---|---|---|---|---|']
        for label in TRAIN_VARIANTS:
            row = train.get(label, {})
            lines.append(f"| {label} | {_cell(row)} | {row.get('img_s_per_epoch', '–')} | {row.get('amp', '–')} | "
                         f"{row.get('seconds', '–')} |")
        lines.append('')
    calib = data.get('calibration', {})
    if calib:
        lines += ['## Calibration: `compress(model, "fips", budget=0.25)`, 1 epoch, `evaluate=False`', '',
                  'peak GPU GiB: `max_memory_allocated` during the call (model, teacher copy, optimizer, activations) '
                  "minus what other sections held; formula: the engine's estimate, whose images term stays on the "
                  'host here.', '',
                  '| precision | model | images | step s | epoch s | wall s | peak GPU GiB | formula GiB (images) |',
                  '|---|---|---|---|---|---|---|---|']
        for label, row in calib.items():
            if 'skipped' in row or 'error' in row:
                lines.append(f"| {label} | {row.get('error', 'skipped (time)')} |  |  |  |  |  |  |")
                continue
            lines.append(f"| {label} | {row['model']} | {row['images']} | {row['step_s']} | {row['epoch_s']} | "
                         f"{row['wall_s']} | {row.get('peak_gib', '–')} | {row['estimate_gib']} "
                         f"({row.get('estimate_images_gib', '–')}) |")
        lines.append('')
    if data.get('errors'):
        lines += ['## Section errors', ''] + [f'- {e}' for e in data['errors']] + ['']
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out', nargs='?', default=None, help='output folder (default: $OUT, else bench/results/gpu_check)')
    p.add_argument('--smoke', action='store_true', help='tiny models and sizes, any device: a code-path check')
    p.add_argument('--budget', type=float, default=270.0, help='seconds for everything (default 270)')
    p.add_argument('--precision', choices=('bf16', 'fp32'), default=None,
                   help='inference precision (default: bf16 autocast on CUDA, fp32 on CPU)')
    p.add_argument('--skip-tests', action='store_true', help='do not run the cuda tests')
    args = p.parse_args(argv)
    budget = Budget(args.budget)
    out = Path(args.out or os.environ.get('OUT') or ROOT / 'bench' / 'results' / 'gpu_check')
    profile = SMOKE if args.smoke else FULL
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type != 'cuda' and not args.smoke:
        log('no CUDA device: run with --smoke for a code-path check on CPU')
        return 2
    precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    dtype = torch.bfloat16 if precision == 'bf16' else None
    results = Results(out, {'profile': profile.name, 'budget_s': args.budget, 'errors': []})
    if profile.name == 'smoke':
        results.data['note'] = 'SMOKE RUN: tiny models, a code-path check; the numbers are not measurements.'
    results.data['env'] = environment(device)
    results.data['inference_config'] = {'batch': profile.batch, 'precision': f'{precision} autocast' if dtype else
                                        'fp32 (TF32 off, torch default)', 'passes': profile.passes,
                                        'iters_per_pass': profile.iters, 'img_size': profile.img_size,
                                        'pretrained': False, 'compile_backend': profile.compile_backend}
    results.data['train_config'] = {'model': profile.train_model[0], 'batch': profile.train_batch,
                                    'epochs': profile.train_epochs}
    log(f"{profile.name} run on {results.data['env'].get('gpu', device)}; torch {torch.__version__}, "
        f'timm {timm.__version__}; writing {out}')
    results.save()
    models: dict[str, dict[str, torch.nn.Module]] = {}

    def section(key: str, fn: Callable[[], Any]) -> None:
        log(f'--- {key} ({budget.left():.0f} s left)')
        try:
            results.data[key] = fn()
        except Exception as e:  # record and go on: the other sections still tell something
            results.data['errors'].append(f'{key}: {type(e).__name__}: {e}')
            traceback.print_exc()
        results.data['wall_s'] = round(budget.elapsed(), 1)
        results.save()

    if not args.skip_tests:
        section('tests', lambda: run_tests(out, budget, profile))
    section('inference_eager', lambda: inference_eager(profile, device, dtype, budget, models))
    first, *rest = list(profile.models)
    # the first (small) model's compiles come before train.py and calibration, keeping time for those two
    reserve = 85.0 if profile.name == 'full' else 0.0
    section('inference_compile', lambda: inference_compiled(profile, device, dtype, budget, models, results, [first],
                                                            reserve))
    section('train', lambda: train_throughput(profile, device, out, budget, results))
    section('calibration', lambda: calibration(profile, device, budget, results))
    if rest:
        section('inference_compile', lambda: inference_compiled(profile, device, dtype, budget, models, results, rest))
    log(f'done in {budget.elapsed():.0f} s: {out / "gpu_check.md"}')
    print(render_markdown(results.data))
    return 0


if __name__ == '__main__':
    sys.exit(main())
