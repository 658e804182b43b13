"""save_pretrained -> timm.create_model('local-dir:...') round trips, materialize, and failure handling."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import timm_reduce
from timm_reduce import ReduceError, find_mlp_sites
from timm_reduce.core.sharing import alias_map, count_unique

from conftest import TINY, perturb_blocks, tiny, tiny_input

SPECS = ['grouped:group_size=2', 'shallow:keep=0.5', 'shallow:keep=0.5,importance=first', 'thin:mlp_ratio=2',
         'grouped:group_size=3,init=scale']


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def load(path):
    return timm.create_model(f'local-dir:{path}', pretrained=True).eval()


@pytest.mark.parametrize('spec', SPECS)
def test_round_trip_is_exact(family, spec, tmp_path):
    model = timm_reduce.reduce(perturb_blocks(tiny(family)), spec)
    x = tiny_input(model)
    timm_reduce.save_pretrained(model, tmp_path)
    loaded = load(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert count_unique(loaded) == count_unique(model)
    assert sorted(alias_map(loaded.state_dict()).items()) == sorted(alias_map(model.state_dict()).items())
    before = timm_reduce.summary(model, macs=False)['mlp_params_before']
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['timm_reduce']['mlp_params_before'] == before
    if config['architecture'] == 'timm_reduce':  # plain-timm saves load as plain models without a record
        assert timm_reduce.summary(loaded, macs=False)['mlp_params_before'] == before


def test_grouped_file_holds_shared_tensors_once(tmp_path):
    model = tiny('vit', depth=6)
    dense_bytes = timm_reduce.save_pretrained(model, tmp_path / 'dense') / 'model.safetensors'
    timm_reduce.reduce(model, 'grouped', group_size=3)
    grouped_bytes = timm_reduce.save_pretrained(model, tmp_path / 'grouped') / 'model.safetensors'
    ratio = count_unique(model) / timm_reduce.summary(model, macs=False)['params']
    assert os.path.getsize(grouped_bytes) <= ratio * os.path.getsize(dense_bytes) * 1.01
    loaded = load(tmp_path / 'grouped')
    sites = find_mlp_sites(loaded)
    assert sites[0].mlp is sites[2].mlp and sites[3].mlp is sites[5].mlp and sites[0].mlp is not sites[3].mlp


@pytest.mark.parametrize('spec', ['thin:mlp_ratio=2', 'shallow:keep=0.5'])
def test_thin_and_uniform_shallow_load_in_plain_timm(spec, tmp_path):
    model = timm_reduce.reduce(perturb_blocks(tiny('vit')), spec)
    timm_reduce.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert config['model_args']['mlp_ratio'] == 2.0
    x = tiny_input(model)
    torch.save(x, tmp_path / 'x.pt')
    torch.save(outputs(model, x), tmp_path / 'y.pt')
    code = textwrap.dedent(f"""
        import sys, timm, torch
        m = timm.create_model('local-dir:{tmp_path}', pretrained=True).eval()
        assert 'timm_reduce' not in sys.modules, 'plain timm must not need the plugin'
        with torch.no_grad():
            y = m(torch.load('{tmp_path}/x.pt'))
        assert torch.equal(y, torch.load('{tmp_path}/y.pt')), 'outputs differ'
    """)
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_per_block_shallow_and_recipes_use_the_plugin_format(tmp_path):
    model = tiny('vit')
    timm_reduce.reduce(model, 'shallow', keep=[8, 16, 24, 32])
    timm_reduce.reduce(model, 'grouped', group_size=1)
    timm_reduce.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'timm_reduce'
    assert config['model_args']['base'] == 'vit_tiny_patch16_224'
    assert [s['strategy'] for s in config['model_args']['reduce']] == ['shallow', 'grouped']
    assert config['timm_reduce']['unique_params'] == count_unique(model)
    x = tiny_input(model)
    assert torch.equal(outputs(load(tmp_path), x), outputs(model, x))


def test_entrypoint_builds_reduced_models_directly():
    name, kwargs = TINY['vit']
    model = timm.create_model('timm_reduce', base=name, reduce='grouped:group_size=2', **kwargs)
    assert count_unique(model) == count_unique(timm_reduce.reduce(tiny('vit'), 'grouped:group_size=2'))
    thin = timm.create_model('timm_reduce', base=name, reduce='thin:mlp_ratio=3', **kwargs)
    assert all(s.mlp.fc2.in_features == 96 for s in find_mlp_sites(thin))
    with pytest.raises(ReduceError, match='conflict'):
        timm.create_model('timm_reduce', base=name, reduce='thin:mlp_ratio=3', mlp_ratio=2.0, **kwargs)
    with pytest.raises(ReduceError, match='needs base'):
        timm.create_model('timm_reduce', reduce='grouped')


def test_materialize_is_plain_and_exact(family):
    for spec in ('grouped:group_size=2', 'shallow:keep=0.5'):
        model = timm_reduce.reduce(perturb_blocks(tiny(family)), spec)
        dense = timm_reduce.materialize(model)
        x = tiny_input(model)
        assert torch.equal(outputs(dense, x), outputs(model, x))
        assert not alias_map(dense.state_dict())
        assert count_unique(dense) == timm_reduce.summary(model, macs=False)['params']
        # the materialised weights load strictly into a model stock timm builds with the same shape
        name, kwargs = TINY[family]
        ratio = find_mlp_sites(dense)[0].mlp.fc2.in_features / find_mlp_sites(dense)[0].mlp.fc2.out_features
        plain = timm.create_model(name, **{**kwargs, 'mlp_ratio': ratio}).eval()
        plain.load_state_dict(dense.state_dict(), strict=True)
        assert torch.equal(outputs(plain, x), outputs(model, x))
        assert sites_shared(model) == spec.startswith('grouped') and not sites_shared(dense)


def sites_shared(model):
    mlps = [id(s.mlp) for s in find_mlp_sites(model)]
    return len(set(mlps)) < len(mlps)


def test_dense_save_loads_without_plugin_format(tmp_path):
    model = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2)
    timm_reduce.save_pretrained(model, tmp_path, dense=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    x = tiny_input(model)
    assert torch.equal(outputs(load(tmp_path), x), outputs(model, x))
    with pytest.raises(ReduceError, match='per-block MLP widths'):
        timm_reduce.save_pretrained(timm_reduce.reduce(tiny('vit'), 'shallow', keep=[8, 9, 10, 11]),
                                    tmp_path / 'x', dense=True)


def _rewrite_config(path, edit):
    config = json.loads((path / 'config.json').read_text())
    edit(config)
    (path / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize('edit, fragment', [
    (lambda c: c['model_args'].pop('reduce'), 'needs reduce'),
    (lambda c: c['model_args'].pop('base'), 'needs base'),
    (lambda c: c['model_args'].update(reduce=[{'strategy': 'grouped', 'options': {'group_size': 'two'}}]), 'integer'),
    (lambda c: c['model_args'].update(reduce="__import__('os').system('touch PWNED')"), 'Unknown strategy'),
    (lambda c: c['model_args'].update(reduce=[{'strategy': 'grouped', 'options': {}, 'format': 7}]), 'format'),
    (lambda c: c['model_args']['reduce'][0]['options'].update(group_size=3), 'do not match'),
])
def test_missing_or_corrupted_spec_is_a_clear_error(tmp_path, edit, fragment):
    timm_reduce.save_pretrained(timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2), tmp_path)
    _rewrite_config(tmp_path, edit)
    with pytest.raises(ReduceError, match=fragment):
        load(tmp_path)
    assert not (tmp_path / 'PWNED').exists() and not os.path.exists('PWNED')


def test_failed_save_keeps_the_previous_save(tmp_path, monkeypatch):
    good = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2)
    timm_reduce.save_pretrained(good, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'half a file')
        raise OSError('disk full')

    monkeypatch.setattr('safetensors.torch.save_file', broken)
    with pytest.raises(OSError, match='disk full'):
        timm_reduce.save_pretrained(timm_reduce.reduce(tiny('vit', seed=3), 'shallow', keep=0.5), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    x = tiny_input(good)
    assert torch.equal(outputs(load(tmp_path), x), outputs(good, x))


def test_nan_weights_are_refused(tmp_path):
    model = tiny('vit')
    with torch.no_grad():
        find_mlp_sites(model)[1].mlp.fc1.weight[0, 0] = float('nan')
    with pytest.raises(ReduceError, match='NaN'):
        timm_reduce.save_pretrained(model, tmp_path)
    assert not (tmp_path / 'model.safetensors').exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ('touch PWNED_BY_PICKLE',))


def test_checkpoints_are_never_unpickled(tmp_path):
    from timm_reduce.persistence.serialization import read_weights

    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': _Payload()}, path)
    with pytest.raises(ReduceError, match=r'safely: it is a pickle that needs Python object (posix|nt|os)\.system'):
        read_weights(path)  # in our words: torch's advice to retry with weights_only=False never reaches users
    assert not os.path.exists('PWNED_BY_PICKLE') and not (tmp_path / 'PWNED_BY_PICKLE').exists()
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'module.w': torch.ones(2)}, 'epoch': 3}, good)
    assert torch.equal(read_weights(good)['w'], torch.ones(2))


def test_timm_training_checkpoints_are_readable(tmp_path):
    import argparse

    from timm_reduce.persistence.serialization import read_weights

    path = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': {'w': torch.ones(3)}, 'args': argparse.Namespace(model='vit'), 'epoch': 2}, path)
    assert torch.equal(read_weights(path)['w'], torch.ones(3))
