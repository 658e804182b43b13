"""FiPS layers: shared basis ownership, eval-mode cache, materialize, gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import timm_reduce
from timm_reduce.strategies.fips import FipsLinear, fips_layers

from fips_utils import images, tiny_eva, tiny_vit


def _reduced(**options):
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', **{'budget': 0.25, 'group_size': 2, **options})
    return model


def test_basis_is_stored_once_and_shared_by_the_group():
    model = _reduced()
    layers = fips_layers(model)
    bases = {id(m.basis) for m in layers.values()}
    assert len(bases) == 2
    assert layers['blocks.0.mlp.fc1'].basis is layers['blocks.1.mlp.fc2'].basis
    params = list(model.parameters())
    basis_params = [p for p in params if any(p is m.basis.weight for m in layers.values())]
    assert len(basis_params) == 2  # once each in parameters(), though every layer of the group registers it
    # a block's own parameters include the basis it depends on
    assert any(p is layers['blocks.1.mlp.fc1'].basis.weight for p in model.blocks[1].parameters())
    clone = copy.deepcopy(model)
    c1, c2 = clone.blocks[0].mlp.fc1, clone.blocks[1].mlp.fc2
    assert c1.basis is c2.basis and c1.basis is not layers['blocks.0.mlp.fc1'].basis


def test_gradient_reaches_the_shared_basis_from_every_block():
    model = _reduced().train()
    basis = model.blocks[0].mlp.fc1.basis.weight
    grads = []
    for block in model.blocks[:2]:
        basis.grad = None
        x = torch.randn(2, 5, 32)
        block.mlp(x).square().sum().backward()
        grads.append(basis.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads)
    assert not torch.equal(grads[0], grads[1])


def test_eval_cache_matches_train_path_and_is_reused():
    model = _reduced()
    x = images(model)
    model.train()
    with torch.no_grad():
        train_out = model(x)  # no dropout in the tiny ViT, so train and eval compute the same function
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
        torch.testing.assert_close(eval_out, train_out, rtol=1e-5, atol=1e-6)
        layer = model.blocks[0].mlp.fc1
        first = layer.cached_weight()
        assert layer.cached_weight() is first  # reused, not recomputed
        torch.testing.assert_close(first, layer.dense_weight(), rtol=0, atol=0)


def test_cache_invalidates_on_step_load_and_train():
    model = _reduced()
    layer = model.blocks[0].mlp.fc2
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = layer(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    layer(x).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = layer(x)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, nn.functional.linear(x, layer.dense_weight(), layer.bias))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        layer.factor.add_(1.0)  # in-place change through the parameter bumps its version
        assert not torch.equal(layer(x), after)
        model.load_state_dict(state)
        assert torch.equal(layer(x), after)
    cached = layer.cached_weight()
    model.train()
    model.eval()
    assert layer._cache is None or layer.cached_weight() is not cached


def test_eval_with_autograd_still_trains():
    """Calibration may run in eval mode (no dropout) with gradients: the cache must not cut the graph."""
    model = _reduced().eval()
    layer = model.blocks[0].mlp.fc1
    layer(torch.randn(2, 32)).sum().backward()
    assert layer.factor.grad is not None and layer.basis.weight.grad is not None


def test_low_rank_and_dense_paths_agree():
    model = _reduced(budget=0.5).train()
    layer = model.blocks[0].mlp.fc1  # r = 51 > d = 32: x·U·V wins only for a few tokens
    few, many = torch.randn(2, 32), torch.randn(4096, 32)
    assert layer._low_rank_cheaper(few) and not layer._low_rank_cheaper(many)
    with torch.no_grad():
        for x in (few, many):
            torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dense_weight(), layer.bias),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('make', [tiny_vit, tiny_eva], ids=['vit', 'eva-glumlp'])
def test_materialize_is_exact_and_plain(make):
    model = make()
    timm_reduce.reduce(model, 'fips', budget=0.25, group_size=2, sparsifier='static')
    x = images(model)
    dense = timm_reduce.materialize(model).eval()
    assert not any(isinstance(m, FipsLinear) for m in dense.modules())
    assert isinstance(dense.blocks[0].mlp.fc1, nn.Linear)
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))
    assert fips_layers(model)  # the original is unchanged



def _compiled_graphs(depth: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_vit(depth=depth)
    timm_reduce.reduce(model, 'fips', budget=0.25, group_size=1)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend='eager')
        compiled(x)
        out = compiled(x)
    graphs = counters['stats']['unique_graphs']
    torch._dynamo.reset()
    return graphs, out, expected


def test_torch_compile_does_not_specialise_per_layer(caplog):
    """Compiled for inference, a FiPS model matches eager, and the number of compiled graphs does not grow with depth
    (the eval cache's key holds data pointers: traced, it made dynamo recompile for every layer until its limit)."""
    from timm_reduce.strategies.fips.layers import _compile_hint

    _compile_hint.cache_clear()
    graphs_2, out, expected = _compiled_graphs(2)
    graphs_4, _, _ = _compiled_graphs(4)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert graphs_4 == graphs_2
    # the user is told once how to get full compiled speed
    hints = [r for r in caplog.records if 'materialize(model)' in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelname == 'WARNING'
