import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import timm_reduce
from timm_reduce import ReduceError, find_mlp_sites
from timm_reduce.core.sharing import count_unique

from conftest import perturb_blocks, tiny, tiny_input


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize('spec', ['shallow:keep=1.0', 'shallow:keep=1.0,importance=first', 'grouped:group_size=1',
                                  'grouped:group_size=1,init=scale', 'grouped:group_size=1,init=first'])
def test_identity_settings_leave_outputs_unchanged(family, spec):
    model = tiny(family)
    x = tiny_input(model)
    before = outputs(model, x)
    timm_reduce.reduce(model, spec)
    assert torch.equal(outputs(model, x), before)


def _mlp_reference(mlp_orig, x, index):
    """float64 output of an `Mlp` that keeps only hidden units `index`, computed from the original weights."""
    w1, b1 = mlp_orig.fc1.weight.double()[index], mlp_orig.fc1.bias.double()[index]
    w2, b2 = mlp_orig.fc2.weight.double()[:, index], mlp_orig.fc2.bias.double()
    return F.gelu(x.double() @ w1.T + b1) @ w2.T + b2


def test_shallow_matches_float64_reference():
    model = perturb_blocks(tiny('vit'))
    originals = [copy.deepcopy(s.mlp) for s in find_mlp_sites(model)]
    timm_reduce.reduce(model, 'shallow', keep=0.25)
    x = torch.randn(3, 5, 32)
    for orig, site in zip(originals, find_mlp_sites(model)):
        score = orig.fc1.weight.norm(dim=1) * orig.fc2.weight.norm(dim=0)
        index = torch.topk(score, 32).indices.sort().values  # 0.25 * 128 units
        assert site.mlp.fc2.in_features == 32
        with torch.no_grad():
            torch.testing.assert_close(site.mlp(x).double(), _mlp_reference(orig, x, index), rtol=1e-5, atol=1e-5)


def test_shallow_glu_removes_paired_rows():
    model = tiny('eva_glu')
    orig = copy.deepcopy(find_mlp_sites(model)[0].mlp)
    h = orig.fc2.in_features
    timm_reduce.reduce(model, 'shallow', keep=0.5, importance='first')
    mlp = find_mlp_sites(model)[0].mlp
    k = h // 2
    assert mlp.fc1.out_features == 2 * k and mlp.fc2.in_features == k
    rows = torch.cat([torch.arange(k), torch.arange(k) + h])
    assert torch.equal(mlp.fc1.weight, orig.fc1.weight[rows])
    x = torch.randn(2, 4, 32)
    with torch.no_grad():  # the kept units compute exactly what they computed before
        g = orig.fc1(x)
        ref = orig.fc2.weight[:, :k] @ (F.silu(g[..., :k]) * g[..., h:h + k]).unsqueeze(-1)
        torch.testing.assert_close(mlp(x), ref.squeeze(-1) + orig.fc2.bias, rtol=1e-5, atol=1e-6)


def test_shallow_swiglu_cuts_gate_value_and_norm():
    model = tiny('eva_swiglu')
    orig = copy.deepcopy(find_mlp_sites(model)[1].mlp)
    with torch.no_grad():
        orig.norm.weight.copy_(torch.linspace(0.5, 2.0, orig.norm.weight.numel()))
        find_mlp_sites(model)[1].mlp.norm.weight.copy_(orig.norm.weight)
    timm_reduce.reduce(model, 'shallow', keep=[10, 20, 30])
    mlp = find_mlp_sites(model)[1].mlp
    index = torch.topk(timm_reduce.core.hidden_units.unit_importance(orig), 20).indices.sort().values
    assert torch.equal(mlp.fc1_g.weight, orig.fc1_g.weight[index])
    assert torch.equal(mlp.fc1_x.weight, orig.fc1_x.weight[index])
    assert torch.equal(mlp.norm.weight, orig.norm.weight[index])
    assert mlp.norm.normalized_shape == (20,)
    assert [s.mlp.fc2.in_features for s in find_mlp_sites(model)] == [10, 20, 30]
    with torch.no_grad():
        mlp(torch.randn(2, 3, 32))  # still runs with the cut norm


def test_magnitude_beats_first_on_non_iid_weights(family):
    model = perturb_blocks(tiny(family))
    x = tiny_input(model, batch=4)
    ref = outputs(model, x)
    errors = {}
    for importance in ('first', 'magnitude'):
        reduced = timm_reduce.reduce(copy.deepcopy(model), 'shallow', keep=0.5, importance=importance)
        errors[importance] = (outputs(reduced, x) - ref).pow(2).mean().item()
    assert errors['magnitude'] < errors['first']


def test_shallow_per_block_widths_validated():
    with pytest.raises(ReduceError, match='lists 2 widths but the model has 4 blocks'):
        timm_reduce.reduce(tiny('vit'), 'shallow', keep=[10, 10])
    with pytest.raises(ReduceError, match='cannot keep 999'):
        timm_reduce.reduce(tiny('vit'), 'shallow', keep=[999, 10, 10, 10])


def test_grouped_shares_one_module_and_inits():
    model = tiny('vit')
    sites = find_mlp_sites(model)
    w = [s.mlp.fc1.weight.detach().double().clone() for s in sites]
    b2 = [s.mlp.fc2.bias.detach().clone() for s in sites]
    timm_reduce.reduce(model, 'grouped', group_size=2)
    sites = find_mlp_sites(model)
    assert sites[0].mlp is sites[1].mlp and sites[2].mlp is sites[3].mlp and sites[0].mlp is not sites[2].mlp
    torch.testing.assert_close(sites[0].mlp.fc1.weight.double(), (w[0] + w[1]) / 2)
    assert len(list(model.parameters())) < len(list(model.named_parameters(remove_duplicate=False)))

    scaled = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2, init='scale')
    s0 = find_mlp_sites(scaled)[0].mlp
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(s0.fc1.weight.double(), w[0] * c)
    assert torch.equal(s0.fc2.bias, b2[0])  # fc2 bias is not scaled
    first = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2, init='first')
    assert torch.equal(find_mlp_sites(first)[2].mlp.fc1.weight.double(), w[2])


def _assert_shared(model):
    sites = find_mlp_sites(model)
    assert sites[0].mlp is sites[1].mlp
    assert sites[0].mlp.fc1.weight.data_ptr() == sites[1].mlp.fc1.weight.data_ptr()


def test_sharing_survives_deepcopy_pickle_state_dict_and_ema():
    from timm.utils import ModelEmaV3

    model = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2)
    unique = count_unique(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), ModelEmaV3(model).module):
        _assert_shared(clone)
        assert count_unique(clone) == unique
        assert timm_reduce.get_record(clone).recipe == timm_reduce.get_record(model).recipe
    fresh = timm_reduce.reduce(tiny('vit', seed=5), 'grouped', group_size=2)
    fresh.load_state_dict(model.state_dict())
    _assert_shared(fresh)
    x = tiny_input(model)
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_shared_gradient_accumulates_from_every_block():
    model = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=4).train()
    sites = find_mlp_sites(model)
    model(tiny_input(model)).sum().backward()
    grad = sites[0].mlp.fc1.weight.grad.clone()
    # the same loss through separate copies: the shared gradient is the sum of the per-block gradients
    untied = timm_reduce.materialize(model).train()
    untied(tiny_input(model)).sum().backward()
    total = sum(s.mlp.fc1.weight.grad for s in find_mlp_sites(untied))
    torch.testing.assert_close(grad, total, rtol=1e-4, atol=1e-6)


def test_thin_rebuilds_with_timm_init():
    model = timm_reduce.reduce(tiny('vit'), 'thin', mlp_ratio=1.5)
    for s in find_mlp_sites(model):
        assert s.mlp.fc1.out_features == 48 and s.mlp.fc2.in_features == 48
        assert float(s.mlp.fc1.bias.detach().abs().sum()) == 0
        assert 0.01 < float(s.mlp.fc1.weight.detach().std()) < 0.03
    glu = timm_reduce.reduce(tiny('eva_glu'), 'thin', mlp_ratio=2)
    assert all(s.mlp.fc1.out_features == 128 and s.mlp.fc2.in_features == 64 for s in find_mlp_sites(glu))


def test_chained_reductions_are_recorded():
    model = timm_reduce.reduce(tiny('vit'), 'shallow', keep=0.5)
    timm_reduce.reduce(model, 'grouped', group_size=2)
    record = timm_reduce.get_record(model)
    assert [s.strategy for s in record.recipe] == ['shallow', 'grouped']
    assert record.mlp_params_before == 4 * (32 * 128 * 2 + 128 + 32)
