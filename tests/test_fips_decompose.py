"""FiPS decomposition: budget -> rank, exact reconstruction at full rank (with growth), truncation optimality,
groups, MLP variants and input validation."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import SwiGLU

import timm_reduce
from timm_reduce import ReduceError
from timm_reduce.strategies.fips import FipsLinear, decompose_group, fips_layers, rank_for_budget

from fips_utils import images, mlp_linears, tiny_eva, tiny_swin, tiny_vit

DEIT_B_RANKS = {0.10: 273, 0.25: 682, 0.40: 1092, 0.50: 1365, 0.75: 2048}


@pytest.mark.parametrize('budget,rank', sorted(DEIT_B_RANKS.items()))
def test_deit_base_rank_from_budget(budget, rank):
    with torch.device('meta'):
        model = timm.create_model('vit_base_patch16_224', pretrained=False)
    timm_reduce.reduce(model, 'fips', budget=budget, sparsity=0.75, group_size=4)
    layers = fips_layers(model)
    assert len(layers) == 24
    assert {m.rank for m in layers.values()} == {rank}
    assert len({id(m.basis) for m in layers.values()}) == 3
    # closed form: the rank is the largest whose basis + non-zeros fit p·N of the group's weights
    d, cols = 768, 8 * 3072
    stored = lambda r: d * r + 0.25 * r * cols  # noqa: E731
    assert stored(rank) <= budget * d * cols + 1e-6 < stored(rank + 1)


def test_rank_uses_the_real_hidden_size():
    # mlp_ratio 2 (h = 2d), groups of 2: N = d·2·2·2d, r = ⌊p·N / (d + (1-s)·8d)⌋
    d, p, s = 64, 0.3, 0.5
    assert rank_for_budget(d, [2 * d] * 4, p, s) == math.floor(p * d * 8 * d / (d + (1 - s) * 8 * d))
    assert rank_for_budget(d, [2 * d] * 4, p, s) != rank_for_budget(d, [4 * d] * 4, p, s)


def _reference_weights(model):
    return {n: m.weight.detach().clone() for n, m in mlp_linears(model).items()}


@pytest.mark.parametrize('growth', ['hybrid', 'random', 'split'])
def test_full_rank_reproduces_weights_float64_with_growth(growth):
    model = tiny_vit().double()
    before = _reference_weights(model)
    x = images(model, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    # d = 32, groups of 2: N = 32·512; budget 0.5 at s = 0.75 -> r = ⌊8192/160⌋ = 51 > d (growth); s0 = 0: no pruning
    timm_reduce.reduce(model, 'fips', budget=0.5, sparsity=0.75, s0=0.0, group_size=2, growth=growth)
    layers = fips_layers(model)
    assert {m.rank for m in layers.values()} == {51}
    assert all(m.sparsity == 0 for m in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.dense_weight(), before[name], rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)


def test_hybrid_growth_layout_keeps_weights():
    model = tiny_vit().double()
    before = _reference_weights(model)
    timm_reduce.reduce(model, 'fips', budget=0.5, sparsity=0.75, s0=0.0, group_size=2, beta=4.0)
    for name, layer in fips_layers(model).items():
        torch.testing.assert_close(layer.dense_weight(), before[name], rtol=0, atol=1e-12)
    # hybrid growth: basis columns d.. are zero; factor rows d.. are the top rows divided by beta
    layer = fips_layers(model)['blocks.0.mlp.fc1']
    d = 32
    assert torch.count_nonzero(layer.basis.weight[:, d:]) == 0
    torch.testing.assert_close(layer.factor[d:], layer.factor[:layer.rank - d] / 4.0, rtol=0, atol=0)


def test_scaling_vectors_reproduce_weights_and_normalise_units():
    model = tiny_vit().double()
    before = _reference_weights(model)
    timm_reduce.reduce(model, 'fips', budget=0.5, sparsity=0.75, s0=0.0, group_size=2, scaling_vectors=True)
    for name, layer in fips_layers(model).items():
        torch.testing.assert_close(layer.dense_weight(), before[name], rtol=0, atol=1e-12)
        unit_axis = 1 if name.endswith('fc1') else 0  # fc1 rows / fc2 columns are the hidden units
        torch.testing.assert_close(layer.scale, before[name].norm(dim=unit_axis), rtol=1e-12, atol=0)
        # the normalised units have norm 1: ‖U V_k[:, j]‖ = 1 (U has orthonormal leading columns, zero grown ones)
        torch.testing.assert_close((layer.basis.weight @ layer.factor).norm(dim=0),
                                   torch.ones(layer.factor.shape[1], dtype=torch.float64), rtol=1e-10, atol=0)


def test_split_growth_repeats_rows_when_growth_exceeds_dim():
    gen = torch.Generator().manual_seed(0)
    slices = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    parts = decompose_group(slices, rank=11, growth='split')  # 7 extra components for d = 4: cycles the rows
    assert parts.rank == 11
    for w, v in zip(slices, parts.factors):
        torch.testing.assert_close(parts.basis @ v, w, rtol=0, atol=1e-12)
    parts = decompose_group(slices, rank=11, growth='hybrid', beta=2.0)
    torch.testing.assert_close(parts.factors[0][8:], parts.factors[0][:3] / 2, rtol=0, atol=0)
    torch.testing.assert_close(parts.factors[0][4:8], parts.factors[0][:4] / 2, rtol=0, atol=0)


def test_truncated_rank_is_the_best_approximation():
    gen = torch.Generator().manual_seed(0)
    slices = [torch.randn(16, 40, generator=gen, dtype=torch.float64) for _ in range(4)]
    parts = decompose_group(slices, rank=5)
    approx = torch.cat([parts.basis @ v for v in parts.factors], 1)
    concat = torch.cat(slices, 1)
    sv = torch.linalg.svdvals(concat)  # independent reference (Eckart–Young)
    assert torch.allclose(torch.linalg.norm(concat - approx), sv[5:].pow(2).sum().sqrt(), rtol=1e-9)
    torch.testing.assert_close(parts.basis.T @ parts.basis, torch.eye(5, dtype=torch.float64))


def test_swin_groups_stay_inside_stages():
    model = tiny_swin()
    timm_reduce.reduce(model, 'fips', budget=0.5, group_size=4)
    layers = fips_layers(model)
    bases = {}
    for name, layer in layers.items():
        bases.setdefault(id(layer.basis), set()).add(name.split('.blocks')[0])
    assert len(bases) == 2 and all(len(stages) == 1 for stages in bases.values())
    assert {layer.basis.dim for layer in layers.values()} == {16, 32}


@pytest.mark.parametrize('make', [tiny_eva, lambda: tiny_vit(mlp_layer=SwiGLU)], ids=['glumlp', 'swiglu'])
def test_gated_mlps_decompose_exactly_at_full_rank(make):
    model = make().double()
    before = _reference_weights(model)
    x = images(model, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    timm_reduce.reduce(model, 'fips', budget=0.6, sparsity=0.75, s0=0.0, group_size=2)
    layers = fips_layers(model)
    assert set(layers) == set(before)
    assert all(m.rank > 32 for m in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    assert timm_reduce.core.discovery.mlp_kind(model.blocks[0].mlp) in ('glu', 'swiglu')
    assert timm_reduce.core.hidden_units.hidden_units(model.blocks[0].mlp) == before['blocks.0.mlp.fc2'].shape[1]


@pytest.mark.parametrize('options,match', [
    (dict(budget=0.0), 'budget must be a fraction in \\(0, 1\\]'),
    (dict(budget=1.5), 'budget must be a fraction in \\(0, 1\\]'),
    (dict(budget=float('nan')), 'budget'),
    (dict(sparsity=1.0), 'sparsity must be in \\[0, 1\\)'),
    (dict(sparsity=-0.1), 'sparsity must be in \\[0, 1\\)'),
    (dict(sparsifier='dense', sparsity=0.5), "sparsifier='dense'"),
    (dict(groups=[[0, 1], [2]]), 'do not cover blocks \\[3\\]'),
    (dict(groups=[[0, 1]], group_size=2), 'either group_size or groups'),
    (dict(sparsifier='magic'), 'must be one of'),
    (dict(budget=0.001), 'too small'),
    (dict(t0=0.8, t_end=0.5), 't0 and t_end'),
])
def test_bad_options_raise_clear_errors(options, match):
    model = tiny_vit()
    with pytest.raises(ReduceError, match=match):
        timm_reduce.reduce(model, 'fips', **options)
    assert not fips_layers(model)


def test_nan_weights_raise():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight[0, 0] = float('nan')
    with pytest.raises(ReduceError, match='blocks.2.mlp.fc2.weight contains NaN'):
        timm_reduce.reduce(model, 'fips', budget=0.25)


def test_reduce_twice_or_after_grouped_raises():
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=0.25)
    with pytest.raises(ReduceError, match='already reduced'):
        timm_reduce.reduce(model, 'fips', budget=0.25)
    model = timm_reduce.reduce(tiny_vit(), 'grouped', group_size=2)
    with pytest.raises(ReduceError, match='share one MLP'):
        timm_reduce.reduce(model, 'fips', budget=0.25)


def test_fips_layers_are_drop_in():
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=0.25)
    fc1, fc2 = model.blocks[1].mlp.fc1, model.blocks[1].mlp.fc2
    assert isinstance(fc1, FipsLinear) and (fc1.in_features, fc1.out_features) == (32, 128)
    assert (fc2.in_features, fc2.out_features) == (128, 32) and fc2.weight.shape == (32, 128)
    assert timm_reduce.core.discovery.mlp_kind(model.blocks[1].mlp) == 'mlp'
