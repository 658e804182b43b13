from dataclasses import dataclass

import pytest
import torch

import timm_reduce
from timm_reduce import ReduceError, ReduceSpec
from timm_reduce.core.spec import parse_recipe

from conftest import tiny, tiny_input


def test_builtin_strategies_listed():
    assert {'thin', 'shallow', 'grouped'} <= set(timm_reduce.list_strategies())
    assert timm_reduce.list_strategies() == sorted(timm_reduce.list_strategies())


def test_parse_text_and_json_round_trip():
    spec = ReduceSpec.parse('grouped:group_size=2,init=scale,scale=0.5')
    assert spec == ReduceSpec('grouped', {'group_size': 2, 'init': 'scale', 'scale': 0.5})
    assert ReduceSpec.from_json(spec.to_json()) == spec
    assert ReduceSpec.parse(spec.to_json()) == spec
    assert ReduceSpec.parse(str(spec)) == spec
    lists = ReduceSpec.parse('shallow:keep=[3,4,5,6],importance=first')
    assert lists.options == {'keep': [3, 4, 5, 6], 'importance': 'first'}
    assert ReduceSpec.parse('thin') == ReduceSpec('thin', {})


def test_recipe_forms_agree():
    a = parse_recipe(['shallow:keep=0.5', {'strategy': 'grouped', 'options': {'group_size': 2}}])
    b = parse_recipe('[{"strategy": "shallow", "options": {"keep": 0.5}}, "grouped:group_size=2"]')
    assert a == b and [s.strategy for s in a] == ['shallow', 'grouped']


def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ReduceError) as e:
        ReduceSpec('nope')
    for name in timm_reduce.list_strategies():
        assert name in str(e.value)


@pytest.mark.parametrize('text, fragment', [
    ('grouped:bogus=1', 'allowed: group_size'),
    ('grouped:group_size=0', '>= 1'),
    ('grouped:group_size=1.5', 'integer'),
    ('grouped:init=mean,scale=0.5', "init='scale'"),
    ('grouped:init=avg', "'mean'"),
    ('shallow:keep=0', '(0, 1]'),
    ('shallow:keep=1.5', '(0, 1]'),
    ('shallow:keep=-0.2', '(0, 1]'),
    ('shallow:importance=random', "'magnitude'"),
    ('thin:mlp_ratio=0', '> 0'),
    ('grouped:group_size', 'key=value'),
])
def test_bad_options_are_clear(text, fragment):
    with pytest.raises(ReduceError) as e:
        ReduceSpec.parse(text)
    assert fragment in str(e.value)


@pytest.mark.parametrize('data', [
    '{"strategy": "grouped", "options": {"group_size": 2}, "format": 99}',
    '{"options": {}}',
    '{"strategy": "grouped", "options": [1, 2]}',
    '{"strategy": "grouped", "evil": "__import__(\'os\')"}',
    '{not json',
])
def test_corrupted_specs_rejected(data):
    with pytest.raises(ReduceError):
        ReduceSpec.from_json(data)


def test_third_party_strategy_registers_and_applies(monkeypatch):
    from timm_reduce.core import registry

    monkeypatch.setattr(registry, '_STRATEGIES', dict(registry._STRATEGIES))  # undone after the test

    @dataclass
    class ZeroBiasConfig:
        which: str = 'fc2'

    @timm_reduce.register_strategy('test_zero_bias', ZeroBiasConfig, description='zero one bias')
    def apply_zero_bias(model, sites, config):
        for site in sites:
            getattr(site.mlp, config.which).bias.data.zero_()

    assert 'test_zero_bias' in timm_reduce.list_strategies()
    model = timm_reduce.reduce(tiny('vit'), 'test_zero_bias', which='fc1')
    assert all(float(s.mlp.fc1.bias.detach().abs().sum()) == 0 for s in timm_reduce.find_mlp_sites(model))
    assert timm_reduce.get_record(model).recipe == [ReduceSpec('test_zero_bias', {'which': 'fc1'})]
    with pytest.raises(ReduceError, match='already registered'):
        timm_reduce.register_strategy('test_zero_bias', ZeroBiasConfig)(lambda m, s, c: None)


def test_reduce_accepts_spec_text_and_object_equally():
    x = tiny_input(tiny('vit'))
    a = timm_reduce.reduce(tiny('vit'), 'shallow:keep=0.5')
    b = timm_reduce.reduce(tiny('vit'), ReduceSpec('shallow', {'keep': 0.5}))
    c = timm_reduce.reduce(tiny('vit'), 'shallow', keep=0.5)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))
    with pytest.raises(ReduceError, match='not both'):
        timm_reduce.reduce(tiny('vit'), ReduceSpec('shallow', {}), keep=0.5)


def test_reduce_checks_weights_only_for_strategies_that_read_them(monkeypatch):
    """A from-scratch strategy (reads_weights=False) replaces NaN MLP weights; one that reads them refuses."""
    from timm_reduce.core import registry

    monkeypatch.setattr(registry, '_STRATEGIES', dict(registry._STRATEGIES))

    @dataclass
    class NoOptions:
        pass

    @timm_reduce.register_strategy('test_scratch', NoOptions, reads_weights=False)
    def apply_scratch(model, sites, config):
        for site in sites:
            torch.nn.init.zeros_(site.mlp.fc1.weight)

    @timm_reduce.register_strategy('test_reads', NoOptions)
    def apply_reads(model, sites, config):
        pass

    def poisoned():
        model = tiny('vit')
        with torch.no_grad():
            model.blocks[1].mlp.fc1.weight[0, 0] = float('nan')
        return model

    assert torch.isfinite(timm_reduce.reduce(poisoned(), 'test_scratch').blocks[1].mlp.fc1.weight).all()
    with pytest.raises(ReduceError, match=r'blocks\.1\.mlp\.fc1\.weight contains NaN'):
        timm_reduce.reduce(poisoned(), 'test_reads')
