"""Calibration options of issue 13: schedules derived from the run, output-level distillation, cache='auto',
bounded evaluation, recipe='paper', and clear errors for every bad value."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import timm_reduce
from timm_reduce import ReduceError, get_strategy
from timm_reduce.calibration import CalibrationConfig, calibrate, calibration_report, compress
from timm_reduce.calibration.config import recipe_defaults
from timm_reduce.strategies.fips import FipsConfig, fips_layers
from timm_reduce.strategies.shallow import ShallowConfig
from timm_reduce.strategies.fips.sparsity import derived_delta_t, keep_count

from calib_helpers import block_errors, image_batches, run_two_ranks, tiny_vit

FAST = dict(epochs=4, lr=2e-3, batches=4)
FIPS = dict(budget=0.5, sparsity=0.5, group_size=2)


@torch.no_grad()
def _output_kl(student: torch.nn.Module, teacher: torch.nn.Module, data: list[torch.Tensor]) -> float:
    """Mean over batches of KL(teacher || student) of the softmax outputs."""
    student.eval(), teacher.eval()
    return sum(F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), log_target=True,
                        reduction='batchmean').item() for x in data) / len(data)


def _assert_masks_exact(model: torch.nn.Module, sparsity: float) -> None:
    """Stored non-zeros equal the budget: exactly ⌊N(1 - s)⌋ mask entries over all factors, none outside a mask."""
    layers = fips_layers(model).values()
    assert sum(int(m.mask.sum()) for m in layers) == keep_count(sum(m.mask.numel() for m in layers), sparsity)
    for m in layers:
        assert torch.count_nonzero(m.factor[~m.mask]) == 0


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ derived schedules
@pytest.mark.parametrize('sparsifier', ['gmp', 'rigl'])
@pytest.mark.parametrize('total,t0,t_end', [(60, 0.0, 0.75), (600, 0.0, 0.75), (600, 0.2, 0.9), (7, 0.0, 0.75),
                                            (1000, 0.1, 0.75)])
def test_derived_delta_t_closed_form(sparsifier, total, t0, t_end):
    model = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.25, group_size=2, sparsifier=sparsifier, t0=t0,
                               t_end=t_end)
    config = model._timm_reduce_record.recipe[-1].config
    assert config.delta_t is None and config.drop_fraction == 0.1  # the defaults
    hooks = get_strategy('fips').calibration_hooks(model, config)
    hooks.setup(model, torch.optim.AdamW(model.parameters()), total)
    t0_step, end = math.floor(t0 * total), min(math.floor(t_end * total), total - 1)
    span = end - t0_step if sparsifier == 'gmp' else end
    assert hooks.delta_t == max(1, span // 20) == derived_delta_t(span)
    updates = sum(hooks._prune_step(s) if sparsifier == 'gmp' else hooks._rigl_step(s) for s in range(end))
    assert updates >= (min(20, span) if sparsifier == 'gmp' else min(19, span - 1))


def test_an_explicit_delta_t_keeps_its_schedule():
    model = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.25, group_size=2, delta_t=50)
    hooks = get_strategy('fips').calibration_hooks(model, model._timm_reduce_record.recipe[-1].config)
    hooks.setup(model, torch.optim.AdamW(model.parameters()), 60)  # t_end = 45 < 50: one prune at 0, then at 45
    assert hooks.delta_t == 50
    assert [s for s in range(45) if hooks._prune_step(s)] == [0]
    assert derived_delta_t(0) == derived_delta_t(19) == 1 and derived_delta_t(40) == 2


# ------------------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize('sparsifier', ['gmp', 'rigl'])
def test_fips_distillation_lowers_output_kl_and_keeps_masks_exact(sparsifier):
    data, teacher = image_batches(), tiny_vit()
    opts = dict(**FIPS, sparsifier=sparsifier, **FAST)
    plain = compress(copy.deepcopy(teacher), 'fips', data=data, distill_epochs=0, **opts)
    distilled = compress(copy.deepcopy(teacher), 'fips', data=data, distill_epochs=4, **opts)
    assert _output_kl(distilled, teacher, data) < 0.8 * _output_kl(plain, teacher, data)
    _assert_masks_exact(plain, 0.5)
    _assert_masks_exact(distilled, 0.5)
    if sparsifier == 'rigl':  # RigL stops exchanging at t_end: the distillation does not move the masks
        assert all(torch.equal(a.mask, b.mask) for a, b in zip(fips_layers(plain).values(),
                                                                fips_layers(distilled).values()))
    report, base = calibration_report(distilled), calibration_report(plain)
    assert report.epoch_loss == base.epoch_loss  # the block-wise stage is the same run
    assert len(report.distill_loss) == 4 and report.distill_epochs_done == 4 and report.completed
    assert len(report.epoch_time) == 8 and report.epochs_done == 4
    assert report.output_error_blockwise == pytest.approx(base.output_error_after)
    # (no claim on output_error_after: it is a logit MSE, which a KL fit need not lower, KL ignoring logit shifts)
    assert 'distillation   4/4 epochs' in report.format()


# shallow with uniform widths: with compress()'s default allocation the block-wise fit of this tiny model is already
# so close (output KL 1e-4) that 3 distillation epochs at this lr overshoot it
@pytest.mark.parametrize('strategy,options', [('shallow', {'keep': 0.5, 'allocation': 'uniform'}),
                                              ('grouped', {'group_size': 2})])
def test_distillation_works_for_every_strategy(strategy, options):
    data, teacher = image_batches(), tiny_vit()
    plain = compress(copy.deepcopy(teacher), strategy, data=data, distill_epochs=0, **options, **FAST)
    distilled = compress(copy.deepcopy(teacher), strategy, data=data, distill_epochs=3, **options, **FAST)
    assert _output_kl(distilled, teacher, data) < _output_kl(plain, teacher, data)
    changed = {k for k, v in distilled.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed and all('.mlp.' in k for k in changed)  # only the MLPs train


def test_distillation_with_targets_cross_entropy_and_their_errors():
    data = image_batches()
    labelled = [(x, torch.arange(len(x)) % 5) for x in data]
    model = compress(tiny_vit(), 'shallow', data=labelled, keep=0.5, distill_epochs=1, distill_ce_weight=0.5, **FAST)
    assert len(calibration_report(model).distill_loss) == 1
    with pytest.raises(ReduceError, match=r'batch 0 has no targets .*distill_ce_weight > 0 needs \(images, targets\)'):
        compress(tiny_vit(), 'shallow', data=data, keep=0.5, distill_epochs=1, distill_ce_weight=0.5, **FAST)
    with pytest.raises(ReduceError, match=r'batch 1 has targets 0\.\.7; the model has 5 classes'):
        bad = [(x, torch.arange(len(x)) % (5 if i != 1 else 8)) for i, x in enumerate(data)]
        compress(tiny_vit(), 'shallow', data=bad, keep=0.5, distill_epochs=1, distill_ce_weight=0.5, **FAST)
    with pytest.raises(ReduceError, match='integer class indices'):
        soft = [(x, torch.rand(len(x), 5)) for x in data]
        compress(tiny_vit(), 'shallow', data=soft, keep=0.5, distill_epochs=1, distill_ce_weight=0.5, **FAST)
    headless = tiny_vit()
    headless.reset_classifier(0)
    with pytest.raises(ReduceError, match='needs a model with a classifier'):
        compress(headless, 'shallow', data=labelled, keep=0.5, distill_epochs=1, distill_ce_weight=0.5, **FAST)


def test_distillation_of_a_model_without_classifier_matches_features():
    teacher = tiny_vit()
    teacher.reset_classifier(0)
    data = image_batches()
    plain = compress(copy.deepcopy(teacher), 'shallow', data=data, keep=0.5, **FAST)
    distilled = compress(copy.deepcopy(teacher), 'shallow', data=data, keep=0.5, distill_epochs=3, **FAST)
    assert calibration_report(distilled).output_error_after < calibration_report(plain).output_error_after


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_distillation_under_autocast_keeps_fips_masks_exact(amp):
    model = compress(tiny_vit(), 'fips', data=image_batches(), **FIPS, distill_epochs=2, amp=amp, **FAST)
    report = calibration_report(model)
    assert report.completed and all(math.isfinite(v) for v in report.distill_loss)
    _assert_masks_exact(model, 0.5)


class _FixedMaskHooks:
    """Third-party hooks without `use_optimizer`: distillation steps still reach them, numbered on."""

    def __init__(self, model):
        self.weight = model.blocks[0].mlp.fc1.weight
        self.mask = torch.rand(self.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
        self.steps = []

    def setup(self, model, optimizer, total_steps):
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def after_backward(self, step):
        self.weight.grad.mul_(self.mask)

    def after_step(self, step):
        self.steps.append(step)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def masks(self):
        return {'fc1': self.mask}


def test_distillation_drives_hooks_past_the_block_wise_steps():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.75)
    hooks = _FixedMaskHooks(model)
    calibrate(model, teacher, image_batches(n=3), hooks=hooks, epochs=2, distill_epochs=1, lr=1e-2, batches=3)
    assert hooks.steps == list(range(9))
    assert torch.count_nonzero(hooks.weight[~hooks.mask]) == 0  # AdamW moments stay zero where grads are masked


def test_resume_with_distill_epochs_equals_uninterrupted(tmp_path):
    data = image_batches()
    opts = dict(**FIPS, sparsifier='gmp', delta_t=2, epochs=2, distill_epochs=2, lr=2e-3, batches=4, seed=1)
    full = compress(tiny_vit(), 'fips', data=data, **opts)
    for stop in (1, 2, 3):  # inside the block-wise stage, at its end, inside the distillation
        folder = tmp_path / str(stop)
        part = compress(tiny_vit(), 'fips', data=data, checkpoint_dir=folder, stop_after=stop, **opts)
        assert not calibration_report(part).completed
        resumed = compress(tiny_vit(), 'fips', data=data, checkpoint_dir=folder, **opts)
        report = calibration_report(resumed)
        assert report.resumed_from == stop and report.completed
        assert report.distill_loss == pytest.approx(calibration_report(full).distill_loss, rel=1e-6)
        assert _equal_states(full, resumed), stop
    # the distillation options are part of the fingerprint
    compress(tiny_vit(), 'fips', data=data, checkpoint_dir=tmp_path / 'x', stop_after=3, **opts)
    for change, name in [({'distill_temperature': 2.0}, 'distill_temperature'), ({'distill_lr': 1e-3}, 'distill_lr'),
                         ({'distill_epochs': 3}, 'distill_epochs')]:
        with pytest.raises(ReduceError, match=f'different run .*{name}: checkpoint'):
            compress(tiny_vit(), 'fips', data=data, checkpoint_dir=tmp_path / 'x', **{**opts, **change})


def test_two_ranks_distil_to_identical_weights(tmp_path):
    r0, r1 = run_two_ranks(tmp_path, 'fips', 'budget=0.5', 'sparsity=0.5', 'group_size=2', 'sparsifier=rigl', 'delta_t=2',
                       'distill_epochs=2', 'eval_batches=2')
    for k, v in r0['state'].items():
        assert torch.equal(v, r1['state'][k]), k
    for k, v in r0['masks'].items():
        assert torch.equal(v, r1['masks'][k]), k
    rep = r0['report']
    assert rep['distill_loss'] == r1['report']['distill_loss'] and len(rep['distill_loss']) == 2
    assert rep['eval_batches'] == 2 and rep['completed']


# ----------------------------------------------------------------------------------------- cache and evaluation
def test_cache_auto_picks_by_the_cap_and_says_so():
    data = image_batches()
    exact = compress(tiny_vit(), 'fips', data=data, **FIPS, cache='none', **FAST)
    auto = compress(tiny_vit(), 'fips', data=data, **FIPS, **FAST)  # the default: 'auto'
    report = calibration_report(auto)
    assert report.cache == 'fp32' and report.cache_reason.startswith('auto: fp32') and 'cache_limit_gb=4' in \
        report.cache_reason
    assert _equal_states(exact, auto)  # the fp32 cache changes nothing
    fp32_bytes = report.memory_estimate['cache']
    assert fp32_bytes > 0
    between = compress(tiny_vit(), 'fips', data=data, **FIPS, cache_limit_gb=0.75 * fp32_bytes / 2 ** 30, **FAST)
    assert calibration_report(between).cache == 'bf16'
    assert calibration_report(between).memory_estimate['cache'] == fp32_bytes // 2
    assert 'auto: bf16' in calibration_report(between).cache_reason
    small = compress(tiny_vit(), 'fips', data=data, **FIPS, cache_limit_gb=0.25 * fp32_bytes / 2 ** 30, **FAST)
    assert calibration_report(small).cache == 'none' and calibration_report(small).memory_estimate['cache'] == 0
    assert 'the teacher is recomputed every step' in calibration_report(small).cache_reason
    assert _equal_states(exact, small)
    assert calibration_report(exact).cache_reason == "cache='none' as given"


def test_eval_batches_bounds_the_evaluation():
    data, teacher = image_batches(n=6), tiny_vit()
    # compress starts from the activation-aware reduction measured on all its batches (init_from='activations')
    stats = timm_reduce.collect_statistics(teacher, data)
    reduced = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.5, statistics=stats)
    opts = dict(keep=0.5, allocation='uniform', epochs=1, lr=2e-3, batches=6)  # the widths of `reduced`
    two = calibration_report(compress(copy.deepcopy(teacher), 'shallow', data=data, eval_batches=2, **opts))
    assert two.eval_batches == 2
    assert two.block_error_before == pytest.approx(block_errors(reduced, teacher, data[:2]), rel=1e-4)
    every = calibration_report(compress(copy.deepcopy(teacher), 'shallow', data=data, eval_batches=None, **opts))
    assert every.eval_batches == 6
    assert every.block_error_before == pytest.approx(block_errors(reduced, teacher, data), rel=1e-4)
    assert calibration_report(compress(copy.deepcopy(teacher), 'shallow', data=data, **opts)).eval_batches == 4
    assert calibration_report(compress(copy.deepcopy(teacher), 'shallow', data=data, evaluate=False,
                                       **opts)).eval_batches == 0


# --------------------------------------------------------------------------------------------------- recipes
PAPER_FIPS = dict(sparsifier='gmp', pruning='global', s0=0.25, delta_t=50, t0=0.0, t_end=0.75, drop_fraction=0.3,
                  growth='hybrid', beta=32.0, scaling_vectors=False, allocation='uniform')
PAPER_CALIBRATION = dict(weight_decay=0.05, distill_epochs=0, eval_batches=None, inputs='teacher',
                         init_from='weights')  # the paper's


def test_recipe_paper_equals_the_explicit_options():
    data = image_batches(n=6)
    opts = dict(budget=0.5, group_size=2, epochs=2, batches=6, lr=2e-3)  # explicit epochs/batches win
    paper = compress(tiny_vit(), 'fips', data=data, recipe='paper', **opts)
    explicit = compress(tiny_vit(), 'fips', data=data, **PAPER_CALIBRATION, **PAPER_FIPS, **opts)
    assert _equal_states(paper, explicit)
    a, b = calibration_report(paper), calibration_report(explicit)
    assert a.recipe == 'paper' and a.eval_batches == 6 and a.epochs == 2 and a.block_error_after == b.block_error_after
    assert paper._timm_reduce_record.recipe[-1].config == explicit._timm_reduce_record.recipe[-1].config
    assert FipsConfig.RECIPES['paper'] == PAPER_FIPS
    # not what the default recipe does (weight decay, schedule), and an explicit option wins over the recipe
    assert not _equal_states(paper, compress(tiny_vit(), 'fips', data=data, **opts))
    mine = compress(tiny_vit(), 'fips:delta_t=3', data=data, recipe='paper', drop_fraction=0.2, **opts)
    config = mine._timm_reduce_record.recipe[-1].config
    assert (config.delta_t, config.drop_fraction, config.t_end) == (3, 0.2, 0.75)
    # shallow's recipe table has only its allocation; a strategy without one (grouped) takes the calibration part
    assert ShallowConfig.RECIPES['paper'] == {'allocation': 'uniform'}
    shallow = compress(tiny_vit(), 'shallow', data=data, keep=0.5, recipe='paper', **opts_no_fips(opts))
    plain = compress(tiny_vit(), 'shallow', data=data, keep=0.5, allocation='uniform', **PAPER_CALIBRATION,
                     **opts_no_fips(opts))
    assert _equal_states(shallow, plain)
    grouped = compress(tiny_vit(), 'grouped', data=data, recipe='paper', **opts_no_fips(opts))
    plain = compress(tiny_vit(), 'grouped', data=data, **PAPER_CALIBRATION, **opts_no_fips(opts))
    assert _equal_states(grouped, plain)


def opts_no_fips(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k not in ('budget', 'group_size')}


def test_recipe_defaults_apply_to_calibrate_too():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.5)
    report = calibrate(model, teacher, image_batches(n=6), recipe='paper', epochs=1, batches=6)
    assert report.recipe == 'paper' and report.eval_batches == 6


# ----------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize('options,match', [
    ({'cache': 'disk'}, r"cache must be 'none', 'bf16' or 'fp32' \(or 'auto'"),
    ({'cache_limit_gb': 0}, 'cache_limit_gb must be a number of GiB > 0'),
    ({'cache_limit_gb': float('inf')}, 'cache_limit_gb must be a number of GiB > 0'),
    ({'eval_batches': 0}, r'eval_batches must be an integer >= 1 or None \(all batches\)'),
    ({'eval_batches': 2.5}, 'eval_batches must be an integer >= 1'),
    ({'distill_epochs': -1}, r'distill_epochs must be an integer >= 0 \(0: no distillation\)'),
    ({'distill_epochs': True}, 'distill_epochs must be an integer >= 0'),
    ({'distill_lr': 0}, r'distill_lr must be a number > 0 and at most 1, or None \(= lr\)'),
    ({'distill_lr': 3.0}, 'distill_lr must be a number > 0 and at most 1'),
    ({'distill_temperature': 0}, 'distill_temperature must be a number > 0'),
    ({'distill_temperature': float('nan')}, 'distill_temperature must be a number > 0'),
    ({'distill_ce_weight': -0.5}, r'distill_ce_weight must be a number >= 0 \(0: no labels\)'),
    ({'distill_ce_weight': 0.5}, 'distill_ce_weight=0.5 needs distill_epochs >= 1'),
    ({'recipe': 'fast'}, "recipe must be one of 'default', 'paper', got 'fast'"),
    ({'recipe': None}, "recipe must be one of 'default', 'paper', got None"),
    ({'delta_t': 0}, r'delta_t must be an integer >= 1, or None \(derived from the number of steps\)'),
    ({'delta_t': True}, r'delta_t=True of strategy .fips. has the wrong type; expected int \| None'),
    ({'drop_fraction': 1.0}, r'drop_fraction must be in \[0, 1\)'),
])
def test_bad_values_of_the_new_options_are_clear_errors(options, match):
    model = tiny_vit()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ReduceError, match=match):
        compress(model, 'fips', data=image_batches(n=1), budget=0.5, group_size=2, epochs=1, **options)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert timm_reduce.get_record(model) is None


@pytest.mark.parametrize('inputs', ['teacher', 'student', 'mix'])
def test_calibration_inputs_feed_each_block_what_was_asked(inputs):
    """In the first step, block 1 is fed the teacher's block-0 output, the student's block-0 output (detached) or
    their mean, as captured by hooks on both models; block 0 is always fed the teacher's input."""
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.5)
    seen: dict[str, torch.Tensor] = {}

    def keep(name, which):
        def hook(module, args, output):
            if name not in seen:
                seen[name] = (args[0] if which == 'input' else output).detach().clone()
        return hook

    hooks = [teacher.blocks[0].register_forward_hook(keep('teacher0', 'output')),
             model.blocks[0].register_forward_hook(keep('student0', 'output')),
             model.blocks[1].register_forward_hook(keep('student1_in', 'input'))]
    try:
        calibrate(model, teacher, image_batches(n=2), epochs=1, cache='none', inputs=inputs, evaluate=False)
    finally:
        for h in hooks:
            h.remove()
    expected = {'teacher': seen['teacher0'], 'student': seen['student0'],
                'mix': (seen['teacher0'] + seen['student0']) / 2}[inputs]
    torch.testing.assert_close(seen['student1_in'], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(seen['teacher0'], seen['student0'])  # the two inputs really differ


def test_calibration_inputs_change_the_result_and_are_part_of_the_fingerprint(tmp_path):
    data = image_batches(n=2)
    base = dict(keep=0.5, epochs=2, seed=0)
    a = compress(tiny_vit(), 'shallow', data=data, **base)
    b = compress(tiny_vit(), 'shallow', data=data, inputs='student', **base)
    assert not torch.equal(a.blocks[2].mlp.fc1.weight, b.blocks[2].mlp.fc1.weight)
    compress(tiny_vit(), 'shallow', data=data, checkpoint_dir=tmp_path, stop_after=1, **base)
    with pytest.raises(ReduceError, match='different run .*inputs'):
        compress(tiny_vit(), 'shallow', data=data, checkpoint_dir=tmp_path, inputs='teacher', **base)
    with pytest.raises(ReduceError, match="inputs must be 'teacher', 'student' or 'mix'"):
        compress(tiny_vit(), 'shallow', data=data, inputs='previous', **base)


def test_distillation_default_is_half_the_blockwise_epochs():
    assert CalibrationConfig().distill_epochs == 10  # after the default 20 block-wise epochs
    assert CalibrationConfig(epochs=5).distill_epochs == 2 and CalibrationConfig(epochs=1).distill_epochs == 0
    assert CalibrationConfig(epochs=5, distill_epochs=0).distill_epochs == 0
    assert CalibrationConfig(**recipe_defaults('paper')).distill_epochs == 0
    report = calibration_report(compress(tiny_vit(), 'shallow', data=image_batches(n=2), keep=0.5, epochs=4,
                                         batches=2))
    assert report.distill_epochs == report.distill_epochs_done == 2 and len(report.distill_loss) == 2
    with pytest.raises(ReduceError, match=r'distill_epochs must be an integer >= 0 .* or None'):
        CalibrationConfig(distill_epochs=-1)
