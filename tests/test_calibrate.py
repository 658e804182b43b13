"""Block-wise calibration engine: it lowers block errors, is deterministic, bounded, resumable and validates input."""
from __future__ import annotations

import copy

import pytest
import torch

import timm_reduce
from timm_reduce import ReduceError
from timm_reduce.calibration import CalibrationConfig, calibrate, calibration_report, compress, estimate_memory

from calib_helpers import block_errors, image_batches, tiny_swin, tiny_vit

FAST = dict(epochs=6, lr=2e-3, batches=4)


def _mlp_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('strategy,options', [
    ('grouped', {'group_size': 2}),
    ('shallow', {'keep': 0.5, 'allocation': 'uniform'}),  # reduce() and compress() keep the same widths
    ('shallow', {'keep': 0.5, 'importance': 'first'}),
])
def test_calibration_lowers_every_block_error(strategy, options):
    data = image_batches()
    teacher = tiny_vit()
    # compress starts from the reduction with the teacher's activation statistics (init_from='activations')
    stats = timm_reduce.collect_statistics(teacher, data)
    reduced_only = timm_reduce.reduce(copy.deepcopy(teacher), strategy, statistics=stats, **options)
    model = compress(copy.deepcopy(teacher), strategy, data=data, **options, **FAST)
    before = block_errors(reduced_only, teacher, data)
    after = block_errors(model, teacher, data)
    assert all(b > 0 for b in before)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    report = calibration_report(model)
    # the engine's own accounting agrees with the independent probe
    assert report.block_error_before == pytest.approx(before, rel=1e-4)
    assert report.block_error_after == pytest.approx(after, rel=1e-4)
    assert report.epoch_loss[-1] < report.epoch_loss[0]
    assert report.output_error_after < report.output_error_before
    assert report.completed and report.epochs_done == FAST['epochs']


def test_swin_grouped_within_stage_calibrates():
    data = image_batches(n=2)
    teacher = tiny_swin()
    # teacher inputs: each block is fitted to its own error, so every block error falls (the default 'mix' inputs
    # may trade one block's error for a lower output error)
    model = compress(copy.deepcopy(teacher), 'grouped', data=data, group_size=2, inputs='teacher',
                     **{**FAST, 'batches': 2})
    report = calibration_report(model)
    assert len(report.blocks) == 4
    assert all(a < b for a, b in zip(report.block_error_after, report.block_error_before))


def test_only_mlp_parameters_change_and_flags_are_restored():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.5)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # a user choice that must survive
    before = _mlp_state(model)
    model.train()
    calibrate(model, teacher, image_batches(), **FAST)
    assert model.training
    assert model.blocks[0].attn.qkv.weight.requires_grad is False
    assert model.blocks[1].attn.qkv.weight.requires_grad is True
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all('.mlp.' in k for k in changed), changed
    assert {f'blocks.{i}.mlp.fc1.weight' for i in range(4)} <= changed


def test_deterministic_for_a_seed_and_seed_matters():
    data = image_batches()
    runs = [compress(tiny_vit(), 'grouped', data=data, group_size=2, seed=s, **FAST) for s in (3, 3, 4)]
    a, b, c = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed visits the batches in another order


def test_fp32_cache_matches_recomputation_and_bf16_is_close():
    data = image_batches()
    ref = compress(tiny_vit(), 'shallow', data=data, keep=0.5, cache='none', **FAST).state_dict()
    fp32 = compress(tiny_vit(), 'shallow', data=data, keep=0.5, cache='fp32', **FAST).state_dict()
    bf16 = compress(tiny_vit(), 'shallow', data=data, keep=0.5, cache='bf16', **FAST)
    assert all(torch.equal(ref[k], fp32[k]) for k in ref)
    assert not all(torch.equal(ref[k], bf16.state_dict()[k]) for k in ref)
    for k, v in bf16.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=2e-2, rtol=0)
    report = calibration_report(bf16)
    assert report.memory_estimate['cache'] > 0


def test_takes_at_most_batches_and_accepts_image_target_tuples():
    seen = []

    def loader():
        for i, images in enumerate(image_batches(n=6)):
            seen.append(i)
            yield images, torch.zeros(len(images), dtype=torch.long)

    model = compress(tiny_vit(), 'grouped', data=loader(), group_size=2, epochs=1, batches=3)
    report = calibration_report(model)
    assert report.batches == 3 and report.images == 24 and report.steps_per_epoch == 3
    assert seen == [0, 1, 2, 3]  # the 4th batch is pulled only to learn that the limit is reached


class MaskHooks:
    """A minimal strategy-hooks implementation: a fixed random mask on every fc1 weight."""

    def __init__(self, model):
        gen = torch.Generator().manual_seed(0)
        self.weights = {f'blocks.{i}.fc1': b.mlp.fc1.weight for i, b in enumerate(model.blocks)}
        self.mask = {k: torch.rand(w.shape, generator=gen) > 0.5 for k, w in self.weights.items()}
        self.calls = []

    def setup(self, model, optimizer, total_steps):
        self.calls.append(('setup', total_steps))
        with torch.no_grad():
            for k, w in self.weights.items():
                w.mul_(self.mask[k])

    def after_backward(self, step):
        self.calls.append(('backward', step))
        for k, w in self.weights.items():
            w.grad.mul_(self.mask[k])

    def after_step(self, step):
        self.calls.append(('step', step))

    def state_dict(self):
        return {'calls': len(self.calls)}

    def load_state_dict(self, state):
        pass

    def masks(self):
        return self.mask


def test_hooks_are_called_in_order_and_masked_entries_stay_zero():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.75)
    hooks = MaskHooks(model)
    calibrate(model, teacher, image_batches(n=3), hooks=hooks, epochs=2, lr=1e-2, batches=3, distill_epochs=0)
    assert hooks.calls[0] == ('setup', 6)
    assert hooks.calls[1:] == [(kind, s) for s in range(6) for kind in ('backward', 'step')]
    for k, w in hooks.weights.items():
        assert torch.count_nonzero(w[~hooks.mask[k]]) == 0
        assert torch.count_nonzero(w[hooks.mask[k]]) == hooks.mask[k].sum()


def test_resume_after_stop_and_after_exception_equals_uninterrupted(tmp_path):
    data = image_batches()
    opts = dict(group_size=2, epochs=4, lr=2e-3, batches=4, seed=7)
    full = compress(tiny_vit(), 'grouped', data=data, **opts)

    part = compress(tiny_vit(), 'grouped', data=data, checkpoint_dir=tmp_path / 'a', stop_after=2, **opts)
    assert calibration_report(part).epochs_done == 2 and not calibration_report(part).completed
    resumed = compress(tiny_vit(), 'grouped', data=data, checkpoint_dir=tmp_path / 'a', **opts)
    report = calibration_report(resumed)
    assert report.resumed_from == 2 and report.completed and len(report.epoch_loss) == 4
    assert report.epoch_loss == pytest.approx(calibration_report(full).epoch_loss, rel=1e-6)

    def crash(rep):
        if rep.epochs_done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_vit(), 'grouped', data=data, checkpoint_dir=tmp_path / 'b', callback=crash, **opts)
    resumed_b = compress(tiny_vit(), 'grouped', data=data, checkpoint_dir=tmp_path / 'b', **opts)
    assert calibration_report(resumed_b).resumed_from == 3
    ref = full.state_dict()
    for m in (resumed, resumed_b):
        assert all(torch.equal(ref[k], v) for k, v in m.state_dict().items())
    # an interrupted run differs from the full one before resuming (the test would be vacuous otherwise)
    assert not all(torch.equal(ref[k], v) for k, v in part.state_dict().items())
    with pytest.raises(ReduceError, match='different run.*lr'):
        compress(tiny_vit(), 'grouped', data=data, checkpoint_dir=tmp_path / 'b', **{**opts, 'lr': 1e-3})


def test_compress_without_data_is_a_clear_error():
    with pytest.raises(ReduceError, match='needs calibration data'):
        compress(tiny_vit(), 'grouped', group_size=2)


@pytest.mark.parametrize('options,match', [
    ({'epochs': 0}, 'epochs must be an integer >= 1'),
    ({'lr': -1.0}, 'lr must be a number > 0'),
    ({'cache': 'gpu'}, "cache must be 'none', 'bf16' or 'fp32'"),
    ({'batches': 0}, 'batches must be an integer >= 1'),
    ({'min_lr_ratio': 2}, r'min_lr_ratio must be in \[0, 1\]'),
    ({'epoch': 3}, "Unknown option.*epoch.*strategy 'grouped'"),
])
def test_bad_options_are_clear_errors_and_leave_the_model_alone(options, match):
    model = tiny_vit()
    state = _mlp_state(model)
    with pytest.raises(ReduceError, match=match):
        compress(model, 'grouped', data=image_batches(), **options)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert timm_reduce.get_record(model) is None


@pytest.mark.parametrize('data,match', [
    ([], 'empty'),
    ([torch.zeros(2, 3, 32, 32, dtype=torch.uint8)], 'float images'),
    (['a.jpg'], 'expected an image tensor'),
    (42, 'must be iterable'),
])
def test_bad_data_is_a_clear_error(data, match):
    with pytest.raises(ReduceError, match=match):
        compress(tiny_vit(), 'grouped', data=data, group_size=2)


def test_calibrate_rejects_a_teacher_with_other_blocks():
    model = timm_reduce.reduce(tiny_vit(), 'grouped', group_size=2)
    other = tiny_swin()
    with pytest.raises(ReduceError, match='same blocks'):
        calibrate(model, other, image_batches(n=1), epochs=1)


def test_memory_estimate_formula():
    config = CalibrationConfig(cache='bf16', distill_epochs=0)  # the block-wise formula
    est = estimate_memory(config, trainable_params=1000, image_shape=(8, 3, 32, 32), batches=4,
                          block_shapes=[(136, 32, 128, False)] + [(136, 32, 128, True)] * 3)
    assert est['images'] == 4 * 4 * 8 * 3 * 32 * 32
    assert est['optimizer'] == 12 * 1000
    assert est['cache'] == 2 * 4 * 136 * 32 * (2 + 1 + 1 + 1)  # bf16: block 0 in + out, blocks 1-3 out only
    assert est['activations'] == 4 * 136 * (4 * 128 + 8 * 32)
    assert est['total'] == sum(v for k, v in est.items() if k != 'total')


# ---------------------------------------------------------------------------------------------- FiPS end to end
FIPS = dict(budget=0.5, sparsity=0.5, group_size=2)


def _factors(model):
    from timm_reduce.strategies.fips.sparsity import fips_layers

    return fips_layers(model)


@pytest.mark.parametrize('sparsifier', ['gmp', 'rigl', 'static'])
def test_fips_calibration_lowers_every_block_error(sparsifier):
    data = image_batches()
    teacher = tiny_vit()
    # reference: the uncalibrated decomposition, magnitude-pruned straight to the final sparsity
    start = timm_reduce.reduce(copy.deepcopy(teacher), 'fips', **FIPS, sparsifier='static')
    model = compress(copy.deepcopy(teacher), 'fips', data=data, sparsifier=sparsifier, delta_t=3, **FIPS, **FAST)
    before, after = block_errors(start, teacher, data), block_errors(model, teacher, data)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    layers = _factors(model)
    total = sum(m.mask.numel() for m in layers.values())
    assert sum(int(m.mask.sum()) for m in layers.values()) == int(total * 0.5)  # final sparsity exactly
    for m in layers.values():
        assert torch.count_nonzero(m.factor[~m.mask]) == 0


def test_fips_resume_with_changing_masks_equals_uninterrupted(tmp_path):
    data = image_batches()
    opts = dict(**FIPS, sparsifier='gmp', delta_t=2, epochs=4, lr=2e-3, batches=4, seed=1)
    full = compress(tiny_vit(), 'fips', data=data, **opts)
    compress(tiny_vit(), 'fips', data=data, checkpoint_dir=tmp_path, stop_after=2, **opts)
    resumed = compress(tiny_vit(), 'fips', data=data, checkpoint_dir=tmp_path, **opts)
    assert calibration_report(resumed).resumed_from == 2
    ref = full.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(ref[k], v), k


def test_swin_cache_across_stages_matches_recomputation():
    # stage 2's first block gets the downsampled tensor, not block 1's output: the cache must store that input itself
    data = image_batches(n=2)
    opts = dict(group_size=2, epochs=2, lr=2e-3, batches=2)
    ref = compress(tiny_swin(), 'grouped', data=data, cache='none', **opts).state_dict()
    cached = compress(tiny_swin(), 'grouped', data=data, cache='fp32', **opts)
    assert all(torch.equal(ref[k], v) for k, v in cached.state_dict().items())
    report = calibration_report(cached)
    # fp32, 2 batches; stage 1: 8 x 16 x 16 tokens of width 16, stage 2: 8 x 8 x 8 of width 32; per stage the
    # first block stores its input and output, the second only its output
    assert report.memory_estimate['cache'] == 4 * 2 * (3 * 8 * 16 * 16 * 16 + 3 * 8 * 8 * 8 * 32)
