"""The GPU paths that can be checked without a GPU: mixed precision (train.py `--amp`, calibration `amp=`), the FiPS
eval cache under autocast, RigL on overflowing gradients, and where distributed calibration puts its collectives.

CPU autocast supports float16 and bfloat16 and `torch.amp.GradScaler('cpu')` scales like the CUDA one, so the
control flow of fp16 loss scaling (unscale, hooks, skipped or redone steps) runs here exactly as on a GPU.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import timm_reduce
from calib_helpers import image_batches, tiny_vit
from conftest import perturb_blocks
from fips_utils import images
from train_utils import TINY, load_train_module, make_image_folder

train = load_train_module()


def _fips_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """FiPS layers, found by what they hold (a `factor` parameter and a bool `mask` buffer)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, 'factor', None), torch.nn.Parameter)
            and getattr(m, 'mask', None) is not None and m.mask.dtype == torch.bool}


def _keep_count(numel: int, sparsity: float) -> int:
    return math.floor(round(numel * (1.0 - sparsity), 6))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('images'))


class _Recorder:
    """Wraps the recipe hooks train.py builds: keeps the model, the masks after setup and, per `after_backward`,
    the step and the largest factor gradient."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model: torch.nn.Module | None = None
        self.initial: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[int, float]] = []
        real = train.recipe_hooks

        def recipe_hooks(model: torch.nn.Module, recipe: Any) -> Any:
            hooks = real(model, recipe)
            setup, after_backward = hooks.setup, hooks.after_backward

            def recorded_setup(*args: Any) -> None:
                setup(*args)
                self.initial = {n: m.mask.clone() for n, m in _fips_layers(model).items()}

            def recorded_after_backward(step: int) -> None:
                grads = [m.factor.grad.abs().max() for m in _fips_layers(model).values() if m.factor.grad is not None]
                self.calls.append((step, float(max(grads)) if grads else float('nan')))
                after_backward(step)

            hooks.setup, hooks.after_backward = recorded_setup, recorded_after_backward
            self.model = model
            return hooks

        monkeypatch.setattr(train, 'recipe_hooks', recipe_hooks)


RIGL = 'fips:budget=0.5,group_size=2,sparsifier=rigl,delta_t=1'


def _run(data_dir: Path, out: Path, *extra: str) -> None:
    argv = [str(data_dir), *TINY, '--output', str(out), '--experiment', 'run', '--epochs', '2', '--val-split', '',
            '--reduction-spec', RIGL, '--amp', *extra]
    assert train.main(argv) == 0


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_amp_runs_the_sparsity_hooks_on_unscaled_gradients(data_dir, tmp_path, monkeypatch, dtype):
    """With fp16 loss scaling the hooks used to be skipped (timm's NativeScaler steps inside one call): masked
    gradients reached the optimizer and RigL, which reads the dense gradient, never exchanged an entry."""
    rec = _Recorder(monkeypatch)
    _run(data_dir, tmp_path, '--amp-dtype', dtype)
    updates = 2 * 3  # 2 epochs x 24 images / batch 8
    assert [step for step, _ in rec.calls] == list(range(updates))
    layers = _fips_layers(rec.model)
    total = sum(m.mask.numel() for m in layers.values())
    assert sum(int(m.mask.sum()) for m in layers.values()) == _keep_count(total, 0.75)
    assert any(not torch.equal(rec.initial[n], m.mask) for n, m in layers.items())  # RigL exchanged entries
    for m in layers.values():
        assert torch.count_nonzero(m.factor[~m.mask]) == 0
        assert torch.isfinite(m.factor).all()


def test_fp16_hooks_see_unscaled_gradients(data_dir, tmp_path, monkeypatch):
    """Under fp16 + GradScaler the hooks see true gradients: of the size bf16 (no scaler) gives, not 2^15-2^16 x it.

    The scaler starts at 2^16 and its first step overflows here (inf/NaN gradients: that step is skipped and the
    scale halved), so the first finite fp16 step is compared with bf16's first step (same initial weights, as the
    skipped step changed nothing).
    """
    first = {}
    for dtype in ('float16', 'bfloat16'):
        rec = _Recorder(monkeypatch)
        _run(data_dir, tmp_path / dtype, '--amp-dtype', dtype)
        first[dtype] = next(g for _, g in rec.calls if math.isfinite(g))
    assert 0.2 < first['float16'] / first['bfloat16'] < 5, first


# ---------------------------------------------------------------------------------------------- FiPS layers
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_fips_cached_weight_stays_float32_after_an_autocast_forward(dtype):
    """The eval cache used to keep the half-precision weight of the first (autocast) call: the next float32 call
    failed with 'self and mat2 must have the same dtype'."""
    model = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.5, group_size=2).eval()
    x = images(model, n=2)
    with torch.no_grad():
        ref = model(x)
        for layer in _fips_layers(model).values():
            layer.invalidate_cache()
        with torch.autocast('cpu', dtype=dtype):
            model(x)
        assert all(m.cached_weight().dtype == torch.float32 for m in _fips_layers(model).values())
        assert torch.equal(model(x), ref)


def test_rigl_exchanges_nothing_on_a_step_with_non_finite_gradients():
    """An fp16 overflow step (the GradScaler skips it) must not pick the entries RigL grows."""
    model = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.25, group_size=2, sparsifier='rigl', delta_t=1).train()
    hooks = timm_reduce.get_strategy('fips').calibration_hooks(model, timm_reduce.get_record(model).recipe[-1].config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hooks.setup(model, opt, 4)  # t_end = 3: RigL exchanges at steps 1 and 2
    layers = _fips_layers(model)
    x, target = images(model, n=4), torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        before = {n: m.mask.clone() for n, m in layers.items()}
        if step == 1:
            next(iter(layers.values())).factor.grad[0, 0] = float('inf')
        hooks.after_backward(step)
        if step != 1:  # a GradScaler skips the optimizer step of an overflow
            opt.step()
        hooks.after_step(step)
        changed = any(not torch.equal(before[n], m.mask) for n, m in layers.items())
        assert changed == (step == 2), step


# ---------------------------------------------------------------------------------------------- calibration amp
def _compress(model: torch.nn.Module | None = None, **options: Any) -> torch.nn.Module:
    opts = dict(budget=0.5, sparsity=0.5, group_size=2, delta_t=2, epochs=3, lr=2e-3, batches=4)
    return timm_reduce.compress(model or tiny_vit(), 'fips', data=image_batches(), **{**opts, **options})


@pytest.mark.parametrize('value', ['fp8', 'float16', True, 16])
def test_amp_option_is_validated(value):
    with pytest.raises(timm_reduce.ReduceError, match="amp must be None, 'bf16' or 'fp16'"):
        timm_reduce.CalibrationConfig(amp=value)


def test_amp_needs_float32_parameters():
    model = tiny_vit().to(torch.bfloat16)
    with pytest.raises(timm_reduce.ReduceError, match='needs float32 parameters'):
        timm_reduce.compress(model, 'grouped', data=image_batches(n=1), amp='bf16', epochs=1, batches=1)


@pytest.mark.parametrize('sparsifier', ['gmp', 'rigl'])
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_compress_with_amp_keeps_masks_and_float32_weights(amp, sparsifier):
    model = _compress(amp=amp, sparsifier=sparsifier)
    layers = _fips_layers(model)
    total = sum(m.mask.numel() for m in layers.values())
    assert sum(int(m.mask.sum()) for m in layers.values()) == _keep_count(total, 0.5)
    for m in layers.values():
        assert torch.count_nonzero(m.factor[~m.mask]) == 0
        assert m.factor.dtype == torch.float32 and torch.isfinite(m.factor).all()
    report = timm_reduce.calibration_report(model)
    assert report.amp == amp and f'amp={amp}' in report.format()
    # the same run in float32: mixed precision changes the result by rounding, which can tip pruning choices
    reference = timm_reduce.calibration_report(_compress(sparsifier=sparsifier))
    assert report.epoch_loss == pytest.approx(reference.epoch_loss, rel=0.1)
    assert report.output_error_after == pytest.approx(reference.output_error_after, rel=0.5)


def _huge_initial_scale(monkeypatch: pytest.MonkeyPatch, scale: float = 2. ** 30) -> None:
    """fp16 runs whose GradScaler starts far too high: the first batches overflow until the scale has halved enough."""
    from timm_reduce.calibration import engine

    monkeypatch.setattr(engine, '_grad_scaler', lambda device: torch.amp.GradScaler(device.type, init_scale=scale))


def test_fp16_loses_no_step_to_overflowing_gradients(monkeypatch):
    """A batch whose scaled gradients overflow is redone at a lower scale: the run follows the float32 one. (Skipped
    steps, as a plain GradScaler loop takes them, left GMP pruning on schedule with the weights not trained.)"""
    _huge_initial_scale(monkeypatch)
    fp16 = timm_reduce.calibration_report(_compress(amp='fp16', model=perturb_blocks(tiny_vit())))
    fp32 = timm_reduce.calibration_report(_compress(model=perturb_blocks(tiny_vit())))
    assert fp16.epoch_loss == pytest.approx(fp32.epoch_loss, rel=0.05)
    assert fp16.output_error_after == pytest.approx(fp32.output_error_after, rel=0.1)


def test_fp16_overflow_at_every_scale_is_a_clear_error(monkeypatch):
    from timm_reduce.calibration import run

    _huge_initial_scale(monkeypatch, 2. ** 120)
    monkeypatch.setattr(run, '_FP16_RETRIES', 3)
    with pytest.raises(timm_reduce.ReduceError, match="overflow float16 even at loss scale .*Use amp='bf16'"):
        _compress(amp='fp16')


def test_fp16_resume_equals_uninterrupted(tmp_path, monkeypatch):
    _huge_initial_scale(monkeypatch)
    opts = dict(amp='fp16', sparsifier='gmp', epochs=4, seed=1)
    full = _compress(**opts)
    _compress(checkpoint_dir=tmp_path, stop_after=2, **opts)
    resumed = _compress(checkpoint_dir=tmp_path, **opts)
    assert timm_reduce.calibration_report(resumed).resumed_from == 2
    ref = full.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(ref[k], v), k


def test_a_checkpoint_of_another_precision_is_refused(tmp_path):
    _compress(checkpoint_dir=tmp_path, stop_after=1, epochs=2)
    with pytest.raises(timm_reduce.ReduceError, match='amp'):
        _compress(checkpoint_dir=tmp_path, epochs=2, amp='bf16')


@pytest.mark.parametrize('backend, model_device, expected', [
    ('gloo', 'cpu', 'cpu'), ('gloo', 'cuda:1', 'cpu'), ('cpu:gloo,cuda:nccl', 'cuda:1', 'cpu'),
    ('nccl', 'cuda:1', 'cuda:1')])
def test_collectives_use_a_device_the_backend_supports(monkeypatch, backend, model_device, expected):
    """A plain NCCL group cannot all-reduce CPU tensors; calibration's loss / hash tensors go to the rank's GPU."""
    from timm_reduce.calibration.distributed import collective_device

    monkeypatch.setattr(torch.distributed, 'get_backend', lambda *a: backend)
    assert collective_device(torch.device(model_device)) == torch.device(expected)
