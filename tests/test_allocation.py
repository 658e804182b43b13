"""Budget allocation by measured sensitivity (issue 13 item 5): the greedy allocator against brute force, the
measured sensitivities against an exact Fisher computation, FiPS ranks and ShallowMLP widths (budget kept, recorded,
rebuilt from a saved model), and `compress(allocation=...)`."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import random

import pytest
import timm
import torch
from torch.nn import functional as F

import timm_reduce
from timm_reduce import ReduceError, collect_statistics
from timm_reduce.core.allocation import allocate
from timm_reduce.core.record import get_record
from timm_reduce.strategies.fips.decompose import rank_for_budget

from calib_helpers import image_batches, run_two_ranks, tiny_vit


def _brute_force(costs, gains, budget, minimum, maximum):
    best = -1.0
    for counts in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(minimum, maximum))):
        if sum(n * c for n, c in zip(counts, costs)) <= budget:
            best = max(best, sum(sum(g[:n]) for g, n in zip(gains, counts)))
    return best


def _gain(gains, counts):
    return sum(sum(g[:n]) for g, n in zip(gains, counts))


@pytest.mark.parametrize('seed', range(6))
def test_allocate_is_optimal_for_equal_costs_and_near_optimal_otherwise(seed):
    rng = random.Random(seed)
    groups = 3
    gains = [sorted((rng.random() * rng.choice([0.1, 1, 10]) for _ in range(6)), reverse=True) for _ in range(groups)]
    uniform, cap = [3] * groups, [6] * groups  # bounds max(1, 3 // 2) = 1 .. min(6, 2 * 3) = 6
    minimum, maximum = [1] * groups, [6] * groups
    equal = allocate([5] * groups, gains, 5 * 9, uniform, cap)
    assert sum(equal) == 9 and _gain(gains, equal) == pytest.approx(_brute_force([5] * 3, gains, 45, minimum, maximum))
    costs = [rng.randint(2, 9) for _ in range(groups)]
    budget = rng.randint(sum(costs), 6 * sum(costs))
    counts = allocate(costs, gains, budget, uniform, cap)
    spent = sum(n * c for n, c in zip(counts, costs))
    assert spent <= budget
    assert all(lo <= n <= hi for n, lo, hi in zip(counts, minimum, maximum))
    unsaturated = [c for n, c, hi in zip(counts, costs, maximum) if n < hi]
    assert not unsaturated or budget - spent < min(unsaturated)  # the budget is spent to within the cheapest step
    # greedy by gain per cost on non-increasing gains: within one step's gain of the integer optimum
    assert _gain(gains, counts) >= _brute_force(costs, gains, budget, minimum, maximum) - max(g[0] for g in gains)


def test_allocate_keeps_the_uniform_counts_when_nothing_is_measured():
    assert allocate([5, 5, 5], [[0.0, 0.0], [], [0.0]], 45, [2, 3, 4], [9, 9, 9]) == [2, 3, 4]
    model = tiny_vit()
    stats = _stats_with(model, [0.0, 0.0, 0.0, 0.0])
    shallow = timm_reduce.reduce(copy.deepcopy(model), 'shallow', keep=0.25, allocation='sensitivity',
                                 statistics=stats)
    assert get_record(shallow).recipe[-1].options['keep'] == [32] * 4
    fips = timm_reduce.reduce(copy.deepcopy(model), 'fips', budget=0.2, group_size=2, allocation='sensitivity',
                              statistics=stats)
    uniform = rank_for_budget(32, [128] * 4, 0.2, 0.75)
    assert get_record(fips).recipe[-1].options['ranks'] == [uniform] * 2


def test_allocate_refuses_a_budget_below_the_minimum():
    with pytest.raises(ReduceError, match='does not pay for the minimum'):
        allocate([10, 10], [[1.0], [1.0]], 15, [1, 1], [3, 3])


def _exact_sensitivity(model, batches):
    """½ Σ_i E_image[Σ_tokens E_{c~p}(∂CE(c)/∂y_i)²] E_token[y_i²] per MLP, with the label expectation taken exactly
    (a backward pass per class) instead of sampled, and y = fc2.weight h from captured activations."""
    sites = timm_reduce.find_mlp_sites(model)
    fisher = {s.path: 0.0 for s in sites}
    energy = {s.path: 0.0 for s in sites}
    images = tokens = 0
    for x in batches:
        outputs, hidden = {}, {}
        handles = []
        for s in sites:
            handles.append(s.mlp.register_forward_hook(lambda m, a, o, p=s.path: outputs.__setitem__(p, o)))
            handles.append(s.mlp.fc2.register_forward_pre_hook(lambda m, a, p=s.path: hidden.__setitem__(p, a[0])))
        logits = model(x.double())
        for h in handles:
            h.remove()
        probs = logits.softmax(-1).detach()
        for c in range(logits.shape[-1]):
            loss = F.cross_entropy(logits, torch.full((len(x),), c), reduction='none')
            grads = torch.autograd.grad(loss.sum(), [outputs[s.path] for s in sites], retain_graph=True)
            for s, g in zip(sites, grads):  # per image: Σ_tokens g², weighted by p(c | image)
                fisher[s.path] = fisher[s.path] + (probs[:, c, None, None] * g.pow(2)).sum((0, 1))
        for s in sites:
            y = hidden[s.path].detach() @ s.mlp.fc2.weight.detach().T
            energy[s.path] = energy[s.path] + y.pow(2).reshape(-1, y.shape[-1]).sum(0)
        images += len(x)
        tokens += hidden[sites[0].path].shape[0] * hidden[sites[0].path].shape[1]
    return {p: 0.5 * float((fisher[p] / images * energy[p] / tokens).sum()) for p in fisher}


def test_sensitivity_matches_the_exact_fisher_estimate():
    model, batches = tiny_vit(), image_batches(n=16, batch=16)
    exact = _exact_sensitivity(copy.deepcopy(model).double(), batches)
    flags = [p.requires_grad for p in model.parameters()]
    stats = collect_statistics(model, batches, sensitivity=True)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # only read
    measured = {p: s.sensitivity for p, s in stats.items()}
    # one sampled label per image (256 images) estimates the expectation over labels
    for path in exact:
        assert measured[path] == pytest.approx(exact[path], rel=0.2), (path, measured, exact)
    order = sorted(exact, key=exact.get)
    assert sorted(measured, key=measured.get) == order
    assert max(exact.values()) > 2 * min(exact.values())  # the blocks do differ on this model
    # without sensitivity the moments are the same and no sensitivity is reported
    plain = collect_statistics(model, batches)
    for path, s in plain.items():
        assert s.sensitivity is None
        torch.testing.assert_close(s.output_moment, stats[path].output_moment)


def test_an_mlp_with_no_output_has_no_sensitivity():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight.zero_()
    stats = collect_statistics(model, image_batches(n=2), sensitivity=True)
    assert stats['blocks.2'].sensitivity == 0
    assert all(stats[f'blocks.{i}'].sensitivity > 0 for i in (0, 1, 3))


def _stats_with(model, sensitivities):
    stats = collect_statistics(model, image_batches(n=2), sensitivity=True)
    for path, value in zip(stats, sensitivities):
        stats[path].sensitivity = value
    return stats


@pytest.mark.parametrize('sensitivities,larger', [([10.0, 10.0, 0.1, 0.1], 0), ([0.1, 0.1, 10.0, 10.0], 1)])
def test_fips_ranks_follow_sensitivity_within_the_same_budget(sensitivities, larger):
    model = tiny_vit()
    d, hidden = 32, model.blocks[0].mlp.fc1.out_features
    budget, sparsity = 0.2, 0.5
    stats = _stats_with(model, sensitivities)
    reduced = timm_reduce.reduce(copy.deepcopy(model), 'fips', budget=budget, sparsity=sparsity, group_size=2,
                                 allocation='sensitivity', statistics=stats)
    spec = get_record(reduced).recipe[-1]
    ranks = spec.options['ranks']
    uniform = rank_for_budget(d, [hidden] * 4, budget, sparsity)
    assert len(ranks) == 2 and ranks[larger] > uniform > ranks[1 - larger]
    assert all(uniform // 2 <= r <= min(2 * uniform, max(d, uniform)) for r in ranks)
    # stored weights at the final sparsity: dense basis + (1 - s) of every factor, within the budget
    cost = d + (1 - sparsity) * 4 * hidden
    total = budget * d * 8 * hidden
    assert sum(ranks) * cost <= total < sum(ranks) * cost + cost
    bases = {id(m.basis): m.basis.weight.shape[1] for m in reduced.modules() if hasattr(m, 'basis')}
    assert sorted(bases.values()) == sorted(ranks)


def test_equal_groups_keep_the_uniform_ranks():
    model = tiny_vit()
    with torch.no_grad():  # both groups the same weights: the same spectra
        for i in (2, 3):
            model.blocks[i].mlp.load_state_dict(model.blocks[i - 2].mlp.state_dict())
    stats = _stats_with(model, [1.0, 1.0, 1.0, 1.0])  # without moments: the weight-only spectra, equal too
    stats = {k: dataclasses.replace(v, input_moment=None, hidden_energy=None, output_moment=None)
             for k, v in stats.items()}
    reduced = timm_reduce.reduce(model, 'fips', budget=0.2, sparsity=0.5, group_size=2, allocation='sensitivity',
                                 statistics=stats)
    ranks = get_record(reduced).recipe[-1].options['ranks']
    uniform = rank_for_budget(32, [128] * 4, 0.2, 0.5)
    assert abs(ranks[0] - ranks[1]) <= 1 and sum(ranks) in (2 * uniform, 2 * uniform + 1)


def test_allocated_fips_model_saves_and_rebuilds(tmp_path):
    model = tiny_vit()
    batches = image_batches(n=2)
    reduced = timm_reduce.reduce(model, 'fips', budget=0.2, sparsity=0.5, group_size=2, allocation='sensitivity',
                                 statistics=_stats_with(model, [5.0, 5.0, 0.2, 0.2]))
    timm_reduce.save_pretrained(reduced, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]), reduced.eval()(batches[0]))
    assert get_record(loaded).recipe[-1].options['ranks'] == get_record(reduced).recipe[-1].options['ranks']


def test_explicit_ranks_and_their_errors():
    model = tiny_vit()
    reduced = timm_reduce.reduce(copy.deepcopy(model), 'fips', budget=0.2, group_size=2, ranks=[7, 3])
    assert sorted({m.basis.weight.shape[1] for m in reduced.modules() if hasattr(m, 'basis')}) == [3, 7]
    assert 'ranks' in get_record(reduced).recipe[-1].options
    with pytest.raises(ReduceError, match='ranks lists 3 ranks but the model has 2 groups'):
        timm_reduce.reduce(copy.deepcopy(model), 'fips', group_size=2, ranks=[4, 4, 4])
    with pytest.raises(ReduceError, match='ranks must be a non-empty list'):
        timm_reduce.reduce(copy.deepcopy(model), 'fips', ranks=[0])
    with pytest.raises(ReduceError, match="allocation='sensitivity' needs each block's measured sensitivity"):
        timm_reduce.reduce(copy.deepcopy(model), 'fips', group_size=2, allocation='sensitivity')
    stats = collect_statistics(model, image_batches(n=1))  # moments only
    with pytest.raises(ReduceError, match='compress'):
        timm_reduce.reduce(copy.deepcopy(model), 'fips', group_size=2, allocation='sensitivity', statistics=stats)
    with pytest.raises(ReduceError, match="allocation='sensitivity'.*importance='magnitude'"):
        timm_reduce.reduce(copy.deepcopy(model), 'shallow', keep=0.5, importance='first', allocation='sensitivity')
    with pytest.raises(ReduceError, match="allocation='sensitivity' needs"):
        timm_reduce.reduce(copy.deepcopy(model), 'shallow', keep=0.5, allocation='sensitivity')


def _unit_weights(model):
    return sum(s.mlp.fc1.weight.numel() + s.mlp.fc2.weight.numel() for s in timm_reduce.find_mlp_sites(model))


def test_shallow_widths_follow_sensitivity_and_keep_the_total(tmp_path):
    model = tiny_vit()
    hidden = model.blocks[0].mlp.fc2.in_features
    stats = _stats_with(model, [0.05, 3.0, 0.05, 1.0])
    reduced = timm_reduce.reduce(copy.deepcopy(model), 'shallow', keep=0.25, allocation='sensitivity',
                                 statistics=stats)
    widths = get_record(reduced).recipe[-1].options['keep']
    k = round(0.25 * hidden)
    assert widths == [s.mlp.fc2.in_features for s in timm_reduce.find_mlp_sites(reduced)]
    assert sum(widths) == 4 * k  # equal unit costs: the same number of units in all
    assert widths[1] == 2 * k and widths[0] < k and widths[2] < k and widths[3] >= k
    assert all(k // 2 <= w <= 2 * k for w in widths)
    assert _unit_weights(reduced) == 4 * k * (2 * 32)
    # each block keeps its most important units (the measured ones: hidden energy x fc2 column)
    for site, w in zip(timm_reduce.find_mlp_sites(model), widths):
        energy = stats[site.path].hidden_energy
        score = site.mlp.fc2.weight.detach().norm(dim=0) * energy.sqrt().float()
        expect = torch.topk(score, w).indices.sort().values
        torch.testing.assert_close(reduced.get_submodule(site.path).mlp.fc2.weight, site.mlp.fc2.weight[:, expect])
    timm_reduce.save_pretrained(reduced, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = image_batches(n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reduced.eval()(x))


def test_compress_measures_sensitivity_and_reports_the_allocation():
    batches = image_batches(n=3)
    model = timm_reduce.compress(tiny_vit(), 'fips', batches, budget=0.2, sparsity=0.5, group_size=2, epochs=1,
                                 distill_epochs=0, allocation='sensitivity')
    report = timm_reduce.calibration_report(model)
    ranks = get_record(model).recipe[-1].options['ranks']
    assert report.allocated == {'ranks': ranks} and report.init_from == 'activations'
    assert f'ranks={ranks}' in report.format()
    # init_from='weights' keeps the weight-only decomposition: the same model as reduce() with those ranks
    weights = timm_reduce.compress(tiny_vit(), 'fips', batches, budget=0.2, sparsity=0.5, group_size=2, epochs=1,
                                   lr=1e-12, distill_epochs=0, allocation='sensitivity', init_from='weights',
                                   sparsifier='static')
    assert timm_reduce.calibration_report(weights).init_from == 'weights'
    chosen = get_record(weights).recipe[-1].options['ranks']
    plain = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.2, sparsity=0.5, group_size=2, ranks=chosen,
                               sparsifier='static')
    for (name, a), (_, b) in zip(weights.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    # recipe='paper' allocates uniformly and measures nothing
    paper = timm_reduce.compress(tiny_vit(), 'fips', batches, budget=0.2, group_size=2, epochs=1, recipe='paper')
    assert timm_reduce.calibration_report(paper).allocated == {}
    assert 'ranks' not in get_record(paper).recipe[-1].options


def test_two_ranks_allocate_the_same_widths(tmp_path):
    r0, r1 = run_two_ranks(tmp_path, 'shallow', 'keep=0.25', 'allocation=sensitivity')
    assert r0['report']['allocated'] == r1['report']['allocated'] and r0['report']['allocated']['keep']
    for k, v in r0['state'].items():
        assert torch.equal(v, r1['state'][k]), k


def test_compress_measures_no_sensitivity_when_the_shapes_are_given():
    batches = image_batches(n=2)
    for strategy, options in (('fips', {'budget': 0.2, 'group_size': 2, 'ranks': [6, 4]}),
                              ('shallow', {'keep': [20, 30, 40, 50]})):
        model = timm_reduce.compress(tiny_vit(), strategy, batches, allocation='sensitivity', epochs=1,
                                     init_from='weights', **options)
        report = timm_reduce.calibration_report(model)
        assert report.statistics_time == 0 and report.allocated == {}


def test_compress_allocates_by_sensitivity_by_default_and_reduce_does_not():
    batches = image_batches(n=2)
    fips = timm_reduce.compress(tiny_vit(), 'fips', batches, budget=0.2, group_size=2, epochs=1)
    assert 'ranks' in timm_reduce.calibration_report(fips).allocated
    shallow = timm_reduce.compress(tiny_vit(), 'shallow', batches, keep=0.25, epochs=1)
    assert 'keep' in timm_reduce.calibration_report(shallow).allocated
    # a recipe default that does not fit the options given is left out, not an error
    first = timm_reduce.compress(tiny_vit(), 'shallow', batches, keep=0.25, importance='first', epochs=1)
    assert get_record(first).recipe[-1].options == {'keep': 0.25, 'importance': 'first'}
    assert timm_reduce.calibration_report(first).allocated == {}
    plain = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.2, group_size=2)
    assert get_record(plain).recipe[-1].config.allocation == 'uniform'


@pytest.mark.parametrize('scaling_vectors', [False, True])
def test_a_precomputed_gram_decomposes_the_same(scaling_vectors):
    from timm_reduce.strategies.fips.decompose import SliceData, decompose_group, group_gram, spectrum

    g = torch.Generator().manual_seed(0)
    slices = [torch.randn(12, 20, generator=g) for _ in range(3)]
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    data = [SliceData(input_moment=x.T @ x / 200), None, None]
    gram = group_gram(slices, scaling_vectors, None, data)
    values = spectrum(gram)
    assert torch.all(values[:-1] >= values[1:]) and float(values.sum()) == pytest.approx(float(gram.trace()))
    a = decompose_group(slices, 5, scaling_vectors=scaling_vectors, data=data)
    b = decompose_group(slices, 5, scaling_vectors=scaling_vectors, data=data, gram=gram)
    torch.testing.assert_close(a.basis, b.basis)
    for u, v in zip(a.factors, b.factors):
        torch.testing.assert_close(u, v)
    if scaling_vectors:
        for u, v in zip(a.scales, b.scales):
            torch.testing.assert_close(u, v)
