"""CUDA paths checked against the CPU result: every strategy's forward, FiPS calibration under fp16/bf16 autocast,
train.py steps with fp16 loss scaling, torch.compile, save on CUDA -> load on CPU.

Every test is marked `cuda` and skipped without a GPU (`python -m pytest -q -m cuda tests/test_cuda.py`;
bench/gpu_check.sh runs them first).

Tolerance of CUDA-vs-CPU forwards (fp32 both sides): TF32 is switched off for the test (matmul and cuDNN; on Ampere
and later TF32 rounds matmul inputs to 10 mantissa bits, ~1e-3 relative), so the two devices differ only in
summation order: ~1e-6 relative per op here (reductions of <= 128 terms). `rtol = atol = 1e-4` leaves a ~100x
margin, while a real fault (a wrong or unshared weight, a dropped mask, a stale cache) moves the tiny models' outputs
by more than 1e-2.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import timm
import torch
from torch import nn

import timm_reduce
from conftest import perturb_blocks, tiny, tiny_input
from train_utils import MODEL_KWARGS, REPO, TINY, make_image_folder, subprocess_env

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

RTOL = ATOL = 1e-4
SPECS = ['thin:mlp_ratio=2', 'shallow:keep=0.5', 'grouped:group_size=2', 'fips:budget=0.5,group_size=2',
         'morphreuse:variant=shape', 'morphreuse:variant=core']
FAMILIES = ['vit', 'swin']


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """fp32 means fp32: no TF32 in matmuls or convolutions (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _fips_layers(model: nn.Module) -> dict[str, nn.Module]:
    """FiPS layers, found by what they hold (a `factor` parameter and a bool `mask` buffer)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, 'factor', None), nn.Parameter)
            and getattr(m, 'mask', None) is not None and m.mask.dtype == torch.bool}


def _keep_count(numel: int, sparsity: float) -> int:
    """⌊N(1 - s)⌋, the number of factor entries global magnitude pruning keeps."""
    return math.floor(round(numel * (1.0 - sparsity), 6))


def _mlp_weights(model: nn.Module) -> int:
    return sum(p.numel() for s in timm_reduce.find_mlp_sites(model) for n, p in s.mlp.named_parameters()
               if n.endswith('weight') and p.ndim == 2)


def _unique_count(model: nn.Module) -> int:
    return sum(p.numel() for p in timm_reduce.unique_parameters(model))


@torch.no_grad()
def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.to(next(model.parameters()).device)).float().cpu()


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize('spec', SPECS)
@pytest.mark.parametrize('family', FAMILIES)
def test_forward_on_cuda_equals_cpu(family, spec):
    model = timm_reduce.reduce(perturb_blocks(tiny(family, drop_path_rate=0.0)), spec)  # train mode: no randomness
    x = tiny_input(model, batch=4)
    gpu = copy.deepcopy(model).cuda()
    assert _unique_count(gpu) == _unique_count(model)  # .cuda() keeps shared tensors shared
    for train_mode in (False, True):  # eval: FiPS cached dense weight; train: its low-rank path (no dropout here)
        model.train(train_mode), gpu.train(train_mode)
        torch.testing.assert_close(_out(gpu, x), _out(model, x), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f'{family} {spec} train={train_mode}: {m}')


# thin and the MorphReuse core build fresh random layers: only the reductions of existing weights compare
@pytest.mark.parametrize('spec', [s for s in SPECS if not s.startswith('thin') and 'core' not in s])
@pytest.mark.parametrize('family', FAMILIES)
def test_reduce_on_cuda_equals_reduce_on_cpu(family, spec):
    """The reductions themselves run on the GPU (importance, SVD via eigh, least squares, pruning) as `compress()` of
    a CUDA model does: same structure, same sharing, same masks, outputs within the fp32 tolerance."""
    model = perturb_blocks(tiny(family))
    x = tiny_input(model, batch=4)
    gpu = timm_reduce.reduce(copy.deepcopy(model).cuda(), spec)
    cpu = timm_reduce.reduce(model, spec)
    assert _unique_count(gpu) == _unique_count(cpu)
    masks = {n: m.mask for n, m in _fips_layers(cpu).items()}
    assert all(torch.equal(m.mask.cpu(), masks[n]) for n, m in _fips_layers(gpu).items())
    assert next(gpu.parameters()).device.type == 'cuda'
    torch.testing.assert_close(_out(gpu, x), _out(cpu, x), rtol=RTOL, atol=ATOL)


def test_fips_cached_weight_survives_autocast_on_cuda():
    """An eval forward under autocast must not leave a half-precision dense weight in the cache for fp32 calls."""
    model = timm_reduce.reduce(tiny('vit'), 'fips:budget=0.5,group_size=2').cuda().eval()
    x = tiny_input(model, batch=4).cuda()
    ref = _out(model, x)
    for dtype in (torch.float16, torch.bfloat16):
        model.train().eval()  # drops the cache: the autocast call below computes it
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
            model(x)
        assert torch.equal(_out(model, x), ref), dtype


def test_compiled_fips_on_cuda_equals_eager():
    """torch.compile (inductor) of a FiPS model, whose cached-weight lookup is a graph break per layer."""
    model = timm_reduce.reduce(tiny('vit'), 'fips:budget=0.5,group_size=2').cuda().eval()
    x = tiny_input(model, batch=4).cuda()
    compiled = torch.compile(model)
    torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------- calibration
def _batches(n: int = 4, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """CPU image batches, as a DataLoader gives them (the engine moves them to the model's device)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(n)]


FIPS = dict(budget=0.5, sparsity=0.5, group_size=2, delta_t=2, epochs=3, lr=2e-3, batches=4)


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
@pytest.mark.parametrize('sparsifier', ['gmp', 'rigl'])
def test_fips_compress_on_cuda_with_amp_keeps_masks(sparsifier, amp):
    teacher = perturb_blocks(tiny('vit'))
    weights_before = _mlp_weights(teacher)
    data = _batches()
    cpu = timm_reduce.compress(copy.deepcopy(teacher), 'fips', data=data, sparsifier=sparsifier, **FIPS)
    gpu = timm_reduce.compress(copy.deepcopy(teacher).cuda(), 'fips', data=data, sparsifier=sparsifier, amp=amp,
                               **FIPS)
    layers, cpu_layers = _fips_layers(gpu), _fips_layers(cpu)
    total = sum(m.mask.numel() for m in layers.values())
    active = sum(int(m.mask.sum()) for m in layers.values())
    assert active == _keep_count(total, FIPS['sparsity']) == sum(int(m.mask.sum()) for m in cpu_layers.values())
    bases = {id(m.basis): m.basis.weight.numel() for m in layers.values()}
    assert sum(bases.values()) + active <= FIPS['budget'] * weights_before  # stored MLP weights within the budget
    for name, m in layers.items():
        assert m.mask.device.type == 'cuda' and m.factor.shape == cpu_layers[name].factor.shape
        assert torch.count_nonzero(m.factor[~m.mask]) == 0, name
        assert torch.isfinite(m.factor).all() and m.factor.dtype == torch.float32, name
    # the CPU float32 run: mixed precision (and another device) change the result by rounding, which can tip a
    # few pruning choices (5% in the loss, 20% in the output error seen on CPU): same run, not the same numbers
    report, cpu_report = timm_reduce.calibration_report(gpu), timm_reduce.calibration_report(cpu)
    assert report.amp == amp and all(math.isfinite(v) for v in report.epoch_loss)
    assert report.epoch_loss == pytest.approx(cpu_report.epoch_loss, rel=0.15)
    assert report.output_error_after == pytest.approx(cpu_report.output_error_after, rel=0.5)


def test_compress_on_cuda_resumes_from_its_checkpoint(tmp_path):
    """The checkpoint is read with map_location=<the model's device>: its CPU RNG state must go back to the CPU."""
    opts = dict(budget=0.5, sparsity=0.5, group_size=2, sparsifier='gmp', delta_t=2, epochs=4, batches=4, lr=2e-3,
                seed=1)
    full = timm_reduce.compress(tiny('vit').cuda(), 'fips', data=_batches(), **opts)
    timm_reduce.compress(tiny('vit').cuda(), 'fips', data=_batches(), checkpoint_dir=tmp_path, stop_after=2, **opts)
    resumed = timm_reduce.compress(tiny('vit').cuda(), 'fips', data=_batches(), checkpoint_dir=tmp_path, **opts)
    assert timm_reduce.calibration_report(resumed).resumed_from == 2
    ref = full.state_dict()
    for key, value in resumed.state_dict().items():  # same kernels, same order: equal up to cuBLAS's choices
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_compress_on_cuda_leaves_the_callers_cuda_rng_alone():
    """CalibrationConfig.seed seeds the calibration; the caller's RNG (CPU and CUDA) is left as it was."""
    model, data = tiny('vit').cuda(), _batches(n=2)
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    timm_reduce.compress(model, 'grouped', data=data, epochs=1, batches=2, group_size=2)
    assert torch.equal(torch.cuda.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- train.py
@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('images'))


def _cuda_flags() -> list[str]:
    flags = list(TINY)
    flags[flags.index('--device') + 1] = 'cuda'
    return flags


@pytest.mark.parametrize('spec', ['fips:budget=0.5,group_size=2,sparsifier=rigl,delta_t=1', 'grouped:group_size=2'])
def test_train_py_fp16_amp_keeps_masks_and_sharing(data_dir, tmp_path, spec):
    cmd = [sys.executable, str(REPO / 'train.py'), str(data_dir), *_cuda_flags(), '--output', str(tmp_path),
           '--experiment', 'run', '--epochs', '2', '--amp', '--amp-dtype', 'float16', '--channels-last', '--pin-mem',
           '--reduction-spec', spec]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'loss scaling' in done.stdout + done.stderr  # fp16 with a GradScaler, not bf16
    loaded = timm_reduce.load_pretrained(tmp_path / 'run' / 'model')  # on CPU
    timm.utils.random_seed(0, 0)  # train.py's initial model: same seed, same build
    initial = timm.create_model('timm_reduce', base='vit_tiny_patch16_224', reduce=spec, drop_rate=0.0,
                                **MODEL_KWARGS)
    assert _unique_count(loaded) == _unique_count(initial)
    sites = timm_reduce.find_mlp_sites(loaded)
    state, initial_state = loaded.state_dict(), initial.state_dict()
    assert any(not torch.equal(state[k], initial_state[k]) for k in state)  # the steps did update the weights
    if spec.startswith('grouped'):
        assert sites[0].mlp is sites[1].mlp and sites[2].mlp is sites[3].mlp and sites[0].mlp is not sites[2].mlp
        return
    assert sites[0].mlp.fc1.basis is sites[1].mlp.fc2.basis  # one basis per group of 2 blocks
    layers, initial_layers = _fips_layers(loaded), _fips_layers(initial)
    total = sum(m.mask.numel() for m in layers.values())
    assert sum(int(m.mask.sum()) for m in layers.values()) == _keep_count(total, 0.75)
    for m in layers.values():
        assert torch.count_nonzero(m.factor[~m.mask]) == 0
    # RigL exchanged entries: its hook read the (unscaled) dense gradient under fp16 loss scaling
    assert any(not torch.equal(m.mask, initial_layers[n].mask) for n, m in layers.items())


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize('spec', [*SPECS, 'fips:budget=0.5,group_size=2,sparsifier=rigl (calibrated on cuda)'])
def test_save_on_cuda_load_on_cpu_is_exact(spec, tmp_path):
    model = perturb_blocks(tiny('vit'))
    if spec.endswith('(calibrated on cuda)'):
        model = timm_reduce.compress(model.cuda(), 'fips', data=_batches(n=2), budget=0.5, group_size=2,
                                     sparsifier='rigl', delta_t=1, epochs=2, batches=2).eval()
    else:
        model = timm_reduce.reduce(model, spec).cuda().eval()
    x = tiny_input(model, batch=4)
    timm_reduce.save_pretrained(model, tmp_path)
    loaded = timm_reduce.load_pretrained(tmp_path).eval()
    assert next(loaded.parameters()).device.type == 'cpu'
    reference = copy.deepcopy(model).cpu()
    state = loaded.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert _unique_count(loaded) == _unique_count(reference)
    assert torch.equal(_out(loaded, x), _out(reference, x))
