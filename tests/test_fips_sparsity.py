"""FiPS sparsity: exact selection, global vs local pruning, GMP schedule, RigL, masked optimizer state, hooks."""
from __future__ import annotations

import math

import pytest
import torch

import timm_reduce
from timm_reduce import get_strategy
from timm_reduce.strategies.fips import fips_layers, gmp_sparsity, prune, rigl_drop_fraction, select_top
from timm_reduce.strategies.fips.sparsity import keep_count, magnitude_keys

from fips_utils import images, tiny_vit


def _reduced(**options):
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', **{'budget': 0.25, 'group_size': 2, **options})
    return model


def _hooks(model):
    return get_strategy('fips').calibration_hooks(model, model._timm_reduce_record.recipe[-1].config)


def _calibrate(model, steps, hooks, on_step=None, lr=1e-2, weight_decay=0.05):
    """A minimal engine with the call order of the calibration contract; regresses to a fixed random target."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    hooks.setup(model, opt, steps)
    x = images(model, n=4)
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    for step in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        hooks.after_backward(step)
        opt.step()
        hooks.after_step(step)
        if on_step is not None:
            on_step(step, opt)
    return opt


def _keys(scores):
    return [magnitude_keys(s, s >= 0) for s in scores]


def test_select_top_is_exact_with_ties():
    scores = _keys([torch.tensor([[3.0, 1.0, 1.0], [1.0, -1.0, 0.0]]), torch.tensor([1.0, 2.0, 1.0])])
    masks = select_top(scores, 4)  # 3, 2, then two of the five 1.0s, earliest first
    assert [m.tolist() for m in masks] == [[[True, True, True], [False, False, False]], [False, True, False]]
    assert sum(int(m.sum()) for m in select_top(scores, 100)) == 8  # the -1 entry is never eligible


def test_select_top_matches_a_sort():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(50, 70, generator=gen), torch.rand(30, generator=gen) * 2]
    masks = select_top(_keys(scores), 1234)
    flat = torch.cat([s.reshape(-1) for s in scores])
    expected = flat >= flat.sort(descending=True).values[1233]
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), expected)


def test_global_and_local_pruning_sparsities():
    model = _reduced(sparsifier='dense')
    layers = list(fips_layers(model).values())
    with torch.no_grad():
        layers[0].factor.mul_(100.0)  # one factor of much larger magnitude
    local_model = _reduced(sparsifier='dense')
    local_layers = list(fips_layers(local_model).values())
    with torch.no_grad():
        for a, b in zip(local_layers, layers):
            a.factor.copy_(b.factor)
    magnitudes = [m.factor.detach().abs().clone() for m in layers]
    prune(layers, 0.75, 'global')
    prune(local_layers, 0.75, 'local')
    total = sum(m.mask.numel() for m in layers)
    assert sum(m.active for m in layers) == keep_count(total, 0.75)
    for m in local_layers:
        assert m.active == keep_count(m.mask.numel(), 0.75)
    # global: one threshold; the large factor keeps (almost) everything, the others are pruned harder
    kept_min = min(float(a[m.mask].min()) for a, m in zip(magnitudes, layers))
    dropped_max = max(float(a[~m.mask].max()) for a, m in zip(magnitudes, layers) if (~m.mask).any())
    assert dropped_max <= kept_min
    assert layers[0].sparsity < 0.05 and all(m.sparsity > 0.75 for m in layers[1:])


def test_prune_only_shrinks_and_keeps_values_at_zero():
    model = _reduced(sparsifier='static', sparsity=0.5)
    layers = list(fips_layers(model).values())
    before = [m.mask.clone() for m in layers]
    prune(layers, 0.8, 'local')
    for m, old in zip(layers, before):
        assert not (m.mask & ~old).any()
        assert torch.count_nonzero(m.factor[~m.mask]) == 0


@pytest.mark.parametrize('total,t0,t_end,delta', [(12, 0.0, 0.75, 2), (11, 0.1, 0.7, 4), (3, 0.0, 0.75, 50)])
def test_gmp_schedule_ends_exactly_at_final_sparsity(total, t0, t_end, delta):
    model = _reduced(sparsity=0.75, s0=0.25, delta_t=delta, t0=t0, t_end=t_end)
    layers = list(fips_layers(model).values())
    n = sum(m.mask.numel() for m in layers)
    hooks = _hooks(model)
    seen = []
    _calibrate(model, total, hooks, on_step=lambda step, opt: seen.append(hooks.sparsity()))
    assert sum(m.active for m in layers) == keep_count(n, 0.75)
    t0_step, end = math.floor(t0 * total), min(math.floor(t_end * total), total - 1)
    assert seen[end] == pytest.approx(1 - keep_count(n, 0.75) / n, abs=0)
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # monotone
    for step in range(t0_step, end, delta):  # on the update steps, the cubic schedule (up to ⌊⌋ of the count)
        expected = gmp_sparsity(step, 0.75, 0.25, t0_step, end)
        assert seen[step] == pytest.approx(1 - keep_count(n, expected) / n, abs=0)


def test_gmp_formula_endpoints():
    assert gmp_sparsity(10, 0.75, 0.25, 10, 110) == 0.25
    assert gmp_sparsity(110, 0.75, 0.25, 10, 110) == 0.75
    assert gmp_sparsity(60, 0.75, 0.25, 10, 110) == pytest.approx(0.75 - 0.5 * 0.125)
    assert gmp_sparsity(5, 0.75, 0.25, 10, 10) == 0.25 and gmp_sparsity(10, 0.75, 0.25, 10, 10) == 0.75


def test_rigl_keeps_counts_and_grows_at_zero():
    model = _reduced(sparsifier='rigl', sparsity=0.75, delta_t=2, drop_fraction=0.3)
    layers = fips_layers(model)
    counts = {n: m.active for n, m in layers.items()}
    assert all(abs(m.sparsity - 0.75) < 0.1 for m in layers.values())  # pruned to the target at once
    hooks = _hooks(model)
    masks_before = {}
    changed = []

    def check(step, opt):
        for n, m in layers.items():
            assert m.active == counts[n]
            if n in masks_before:
                grown = m.mask & ~masks_before[n]
                if grown.any():
                    changed.append(step)
                    if hooks._rigl_step(step):  # just regrown: zero value and zero moments
                        assert torch.count_nonzero(m.factor[grown]) == 0
                        for v in opt.state[m.factor].values():
                            if v.shape == m.mask.shape:
                                assert torch.count_nonzero(v[grown]) == 0
            masks_before[n] = m.mask.clone()

    check(-1, None)
    _calibrate(model, 8, hooks, on_step=check)
    assert changed and all(hooks._rigl_step(s) for s in changed)  # masks change on exchange steps only
    assert rigl_drop_fraction(0, 0.3, 10) == pytest.approx(0.3) and rigl_drop_fraction(10, 0.3, 10) == 0


def test_masked_entries_stay_zero_through_adamw():
    model = _reduced(sparsifier='static', sparsity=0.6)
    layers = list(fips_layers(model).values())
    hooks = _hooks(model)

    def check(step, opt):
        for m in layers:
            assert torch.count_nonzero(m.factor[~m.mask]) == 0
            state = opt.state[m.factor]
            assert torch.count_nonzero(state['exp_avg'][~m.mask]) == 0
            assert torch.count_nonzero(state['exp_avg_sq'][~m.mask]) == 0
            assert torch.count_nonzero(state['exp_avg'][m.mask]) > 0

    opt = _calibrate(model, 5, hooks, on_step=check, weight_decay=0.1)
    assert all(m.factor.grad is None or torch.count_nonzero(m.factor.grad[~m.mask]) == 0 for m in layers)
    assert opt.state[layers[0].basis.weight]['exp_avg'].abs().sum() > 0  # the basis trains densely


def test_dense_sparsifier_keeps_everything():
    model = _reduced(sparsifier='dense')
    hooks = _hooks(model)
    _calibrate(model, 4, hooks)
    assert hooks.sparsity() == 0 and all(m.mask.all() for m in fips_layers(model).values())


def test_hooks_state_masks_and_resume():
    model = _reduced(sparsity=0.75, delta_t=3)
    hooks = _hooks(model)
    _calibrate(model, 6, hooks)
    masks = hooks.masks()
    assert set(masks) == {f'{n}.mask' for n in fips_layers(model)}
    assert all(masks[k] is v for k, v in model.state_dict(keep_vars=True).items() if k in masks)
    state = hooks.state_dict()
    assert state['last_step'] == 5 and state['total_steps'] == 6
    # a resumed run: new hooks on a model with loaded buffers keep the masks instead of pruning again
    fresh = _reduced(sparsity=0.75, delta_t=3)
    fresh.load_state_dict(model.state_dict())
    resumed = _hooks(fresh)
    resumed.setup(fresh, torch.optim.AdamW(fresh.parameters()), 6)
    resumed.load_state_dict(state)
    assert resumed.last_step == 5
    assert all(torch.equal(resumed.masks()[k], masks[k]) for k in masks)
    with pytest.raises(timm_reduce.ReduceError, match='same schedule'):
        resumed.load_state_dict({**state, 'total_steps': 9})


def test_schedule_acts_on_the_factors_the_optimizer_trains():
    """An engine that calibrates one group at a time prunes that group only, to the exact target within it."""
    model = _reduced(sparsity=0.75, s0=0.25, delta_t=2)
    layers = fips_layers(model)
    group0 = [m for n, m in layers.items() if n.startswith(('blocks.0.', 'blocks.1.'))]
    others = {n: m.mask.clone() for n, m in layers.items() if not n.startswith(('blocks.0.', 'blocks.1.'))}
    hooks = _hooks(model)
    opt = torch.optim.AdamW(model.blocks[:2].parameters(), lr=1e-3)  # the shared basis listed once
    hooks.setup(model, opt, 4)
    for step in range(4):
        opt.zero_grad()
        model(images(model)).square().mean().backward()
        hooks.after_backward(step)
        opt.step()
        hooks.after_step(step)
    assert sum(m.active for m in group0) == keep_count(sum(m.mask.numel() for m in group0), 0.75)
    assert all(torch.equal(layers[n].mask, mask) for n, mask in others.items())
    assert len(hooks.masks()) == len(layers)
    with pytest.raises(timm_reduce.ReduceError, match='trains none of the FiPS factors'):
        hooks.setup(model, torch.optim.AdamW(model.head.parameters()), 4)
