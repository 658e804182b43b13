"""Data-aware initialisation (issue 13 item 2): activation statistics, the data-aware FiPS decomposition, ShallowMLP's
measured importance, and `compress(init_from=...)`."""
from __future__ import annotations

import copy

import pytest
import torch

import timm_reduce
from timm_reduce import ReduceError, collect_statistics
from timm_reduce.strategies.fips import decompose_group
from timm_reduce.strategies.fips.decompose import SliceData

from calib_helpers import image_batches, run_two_ranks, tiny_swin, tiny_vit


def _captured(model, batches):
    """Every MLP's input and fc2 input, stored whole (the reference: no accumulation)."""
    store = {}
    handles = []
    for site in timm_reduce.find_mlp_sites(model):
        rec = store.setdefault(site.path, {'x': [], 'h': []})
        handles.append(site.mlp.register_forward_pre_hook(lambda m, a, r=rec: r['x'].append(a[0].detach())))
        handles.append(site.mlp.fc2.register_forward_pre_hook(lambda m, a, r=rec: r['h'].append(a[0].detach())))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return store


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
def test_statistics_match_stored_activations(make):
    model, batches = make(), image_batches(n=3)
    model.train()
    stats = collect_statistics(model, batches)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    ref = _captured(model.eval(), batches)
    assert set(stats) == set(ref)
    for path, rec in ref.items():
        site = model.get_submodule(path)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in rec['x']]).double()
        h = torch.cat([t.reshape(-1, t.shape[-1]) for t in rec['h']]).double()
        y = h @ site.mlp.fc2.weight.double().T
        s = stats[path]
        assert s.tokens == x.shape[0]
        tol = dict(rtol=1e-5, atol=1e-6)  # float32 sums per batch
        torch.testing.assert_close(s.input_moment, x.T @ x / x.shape[0], **tol)
        torch.testing.assert_close(s.hidden_energy, (h ** 2).mean(0), **tol)
        torch.testing.assert_close(s.output_moment, y.T @ y / y.shape[0], **tol)


def test_statistics_need_tokens():
    with pytest.raises(ValueError, match='no tokens'):
        collect_statistics(tiny_vit(), [])


def _anisotropic(n: int, d: int, seed: int) -> torch.Tensor:
    """n samples of d features whose scales span two orders of magnitude, in a random orientation."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(1, -1, d, dtype=torch.float64) @ q.T


def test_data_aware_fc2_basis_is_the_output_pca():
    d, h, r = 12, 24, 4
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, h, generator=g, dtype=torch.float64)
    hidden = _anisotropic(2000, h, 1)
    y = hidden @ w.T
    moment = y.T @ y / len(y)
    data = [SliceData(hidden_energy=(hidden ** 2).mean(0), output_moment=moment)]
    aware = decompose_group([w], r, data=data)
    plain = decompose_group([w], r)

    def err(parts):
        approx = parts.basis @ parts.factors[0]
        return float(((hidden @ (w - approx).T) ** 2).sum(1).mean())

    # closed form: the best rank-r output error is the sum of the smallest d - r eigenvalues of E[y yᵀ]
    best = float(torch.linalg.eigvalsh(moment)[:d - r].sum())
    assert err(aware) == pytest.approx(best, rel=1e-9)
    assert err(plain) > 1.2 * err(aware)


def test_data_aware_input_linear_lowers_the_data_error():
    d, h, r = 12, 24, 4
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, h, generator=g, dtype=torch.float64)  # fc1ᵀ: d side reads x
    x = _anisotropic(3000, d, 2)
    data = [SliceData(input_moment=x.T @ x / len(x))]
    aware = decompose_group([a], r, data=data)
    plain = decompose_group([a], r)

    def err(parts):
        return float(((x @ (a - parts.basis @ parts.factors[0])) ** 2).mean())

    assert err(aware) < 0.5 * err(plain)
    # the factor is the least-squares fit for the basis: no other V does better on the data
    u, v = aware.basis, aware.factors[0]
    nudged = v + 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    assert err(aware) < float(((x @ (a - u @ nudged)) ** 2).mean())


def test_data_aware_full_rank_still_reconstructs():
    d, h = 8, 16
    g = torch.Generator().manual_seed(0)
    slices = [torch.randn(d, h, generator=g, dtype=torch.float64) for _ in range(2)]
    x = _anisotropic(500, d, 3)
    data = [SliceData(input_moment=x.T @ x / len(x)), None]
    parts = decompose_group(slices, d + 3, data=data)
    for w, v in zip(slices, parts.factors):
        torch.testing.assert_close(parts.basis @ v, w)


def test_compress_init_activations_starts_closer_to_the_teacher():
    batches = image_batches(n=4)
    errors = {}
    for init in ('weights', 'activations'):
        model = timm_reduce.compress(tiny_vit(), 'fips', batches, budget=0.2, sparsity=0.5, group_size=2,
                                     sparsifier='static', epochs=1, lr=1e-9, init_from=init, eval_batches=None,
                                     allocation='uniform')
        report = timm_reduce.calibration_report(model)
        assert report.init_from == init
        assert (report.statistics_time > 0) == (init == 'activations')
        errors[init] = report.output_error_before
    assert errors['activations'] < 0.8 * errors['weights']


def test_shallow_keeps_the_units_with_the_largest_measured_contribution():
    batches = image_batches(n=2)
    model = tiny_vit()
    ref = _captured(model, batches)
    keep = 0.25
    reduced = timm_reduce.compress(copy.deepcopy(model), 'shallow', batches, keep=keep, epochs=1, lr=1e-9,
                                   init_from='activations', allocation='uniform')
    plain = timm_reduce.compress(copy.deepcopy(model), 'shallow', batches, keep=keep, epochs=1, lr=1e-9,
                                 init_from='weights', allocation='uniform')
    differs = False
    for site in timm_reduce.find_mlp_sites(model):
        h = torch.cat([t.reshape(-1, t.shape[-1]) for t in ref[site.path]['h']]).double()
        score = h.pow(2).mean(0).sqrt() * site.mlp.fc2.weight.double().norm(dim=0)
        k = round(keep * score.numel())
        expect = torch.topk(score, k).indices.sort().values
        got = reduced.get_submodule(site.path).mlp.fc2.weight
        # the kept fc2 columns are the expected units' columns, in order (lr ~0: the weights barely move)
        torch.testing.assert_close(got, site.mlp.fc2.weight[:, expect], atol=1e-6, rtol=0)
        differs |= not torch.allclose(plain.get_submodule(site.path).mlp.fc2.weight, got)
    assert differs  # on this model the measured importance picks other units than the weight magnitudes


def test_paper_recipe_and_strategies_without_statistics_start_from_weights():
    batches = image_batches(n=2)
    model = timm_reduce.compress(tiny_vit(), 'fips', batches, budget=0.3, epochs=1, recipe='paper')
    assert timm_reduce.calibration_report(model).init_from == 'weights'
    model = timm_reduce.compress(tiny_vit(), 'morphreuse', batches, epochs=1)
    assert timm_reduce.calibration_report(model).init_from == 'weights'


def test_init_errors():
    with pytest.raises(ReduceError, match="init_from must be 'weights'"):
        timm_reduce.compress(tiny_vit(), 'fips', image_batches(n=1), init_from='svd')
    with pytest.raises(ReduceError, match='compress'):
        timm_reduce.calibrate(tiny_vit(), tiny_vit(), image_batches(n=1), init_from='weights')
    model = tiny_vit()
    stats = collect_statistics(model, image_batches(n=1))
    stats.pop(next(iter(stats)))
    with pytest.raises(ReduceError, match='statistics lack block'):
        timm_reduce.reduce(model, 'fips', budget=0.3, statistics=stats)


def test_two_ranks_pool_their_statistics(tmp_path):
    # each rank holds half of the batches: without pooled statistics they would keep different units
    r0, r1 = run_two_ranks(tmp_path, 'shallow', 'keep=0.25', 'init_from=activations')
    for k, v in r0['state'].items():
        assert torch.equal(v, r1['state'][k]), k
    assert r0['report']['init_from'] == 'activations'


def test_init_from_does_not_collide_with_a_strategy_option():
    # grouped has its own `init` ('mean' | 'scale' | 'first'): the calibration option must not take it
    model = timm_reduce.compress(tiny_vit(), 'grouped', image_batches(n=2), group_size=2, init='first', epochs=1)
    assert model._timm_reduce_record.recipe[-1].config.init == 'first'
    assert timm_reduce.calibration_report(model).init_from == 'weights'  # 'first' reads no statistics


def test_dead_inputs_fall_back_to_the_weights():
    d, h, r = 8, 16, 3
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, h, generator=g, dtype=torch.float64)
    dead = [SliceData(input_moment=torch.zeros(d, d, dtype=torch.float64))]
    aware, plain = decompose_group([a], r, data=dead), decompose_group([a], r)
    torch.testing.assert_close(aware.basis @ aware.factors[0], plain.basis @ plain.factors[0])


def test_grouped_mean_weighted_by_activations_is_the_least_squares_fit():
    model, batches = tiny_vit(), image_batches(n=3)
    ref = _captured(model, batches)
    stats = collect_statistics(model, batches)
    reduced = timm_reduce.reduce(copy.deepcopy(model), 'grouped', group_size=2, statistics=stats)
    plain = timm_reduce.reduce(copy.deepcopy(model), 'grouped', group_size=2)

    def plain_w(group):
        return plain.blocks[group[0]].mlp.fc1.weight.double()

    for group in ((0, 1), (2, 3)):
        mlps = [model.blocks[i].mlp for i in group]
        shared = reduced.blocks[group[0]].mlp
        assert reduced.blocks[group[1]].mlp is shared
        # fc1: argmin_W Σ_b Σ_tokens ‖(W - W_b) x‖², solved on the stacked tokens in float64
        xs = [torch.cat([t.reshape(-1, t.shape[-1]) for t in ref[f'blocks.{i}']['x']]).double() for i in group]
        targets = torch.cat([x @ m.fc1.weight.double().T for x, m in zip(xs, mlps)])
        x = torch.cat(xs)
        best = x @ torch.linalg.lstsq(x, targets).solution
        got = x @ shared.fc1.weight.double().T
        assert (got - targets).pow(2).sum() <= (best - targets).pow(2).sum() * 1.01  # float32 moments, ridge
        assert (got - targets).pow(2).sum() < 0.9 * (x @ plain_w(group).T - targets).pow(2).sum()
        # LayerNorm's output has no component along the all-ones direction: there W keeps the plain mean
        ones = torch.ones(x.shape[1], dtype=torch.float64)
        assert float((x @ ones).abs().max()) < 1e-4
        torch.testing.assert_close(shared.fc1.weight.double() @ ones, plain_w(group) @ ones, rtol=1e-3, atol=1e-4)
        # fc2: each column averaged with the weights E[h_j²] of the members
        hs = [torch.cat([t.reshape(-1, t.shape[-1]) for t in ref[f'blocks.{i}']['h']]).double() for i in group]
        e = torch.stack([h.pow(2).mean(0) for h in hs])
        cols = torch.stack([m.fc2.weight.double() for m in mlps])
        torch.testing.assert_close(shared.fc2.weight.double(), (cols * (e / e.sum(0))[:, None]).sum(0),
                                   rtol=1e-4, atol=1e-6)
        # biases stay the plain mean
        torch.testing.assert_close(shared.fc1.bias, plain.blocks[group[0]].mlp.fc1.bias)
        assert not torch.allclose(shared.fc1.weight, plain.blocks[group[0]].mlp.fc1.weight)


def test_grouped_measures_statistics_only_for_the_mean_init():
    batches = image_batches(n=2)
    for init, expect in (('mean', 'activations'), ('first', 'weights')):
        model = timm_reduce.compress(tiny_vit(), 'grouped', batches, group_size=2, init=init, epochs=1)
        report = timm_reduce.calibration_report(model)
        assert report.init_from == expect and (report.statistics_time > 0) == (expect == 'activations')
