"""push_to_hub / `timm-reduce push` against a fake Hub, and loading back through local-dir: and hf-hub: (offline)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2 as httpx
import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard, scan_cache_dir
from huggingface_hub.errors import HfHubHTTPError

import timm_reduce
from timm_reduce import cli
from timm_reduce.errors import HubError, ReduceError

from _hub_fakes import (STRATEGY_EXAMPLES, FakeHub, example_ids, fake_hub, get_example, offline,  # noqa: F401
                        reduced_example, sample_input, tiny_vit)

ROOT = Path(__file__).resolve().parents[1]
FILES = {'config.json', 'model.safetensors', 'README.md'}


def _load_local(folder: Path) -> torch.nn.Module:
    return timm.create_model(f'local-dir:{folder}', pretrained=True).eval()


def _outputs(model: torch.nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input() if x is None else x)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _network_calls(hub: FakeHub) -> list[str]:
    return [name for name, _ in hub.calls if name != 'HfApi']


def test_every_registered_strategy_has_an_example() -> None:
    missing = sorted(name for name in timm_reduce.list_strategies() if not STRATEGY_EXAMPLES.get(name))
    assert not missing, f'add examples for {missing} to tests/_hub_fakes.STRATEGY_EXAMPLES'


@pytest.mark.parametrize('example', example_ids())
def test_push_then_load_recorded_folder_gives_identical_outputs(example: str, fake_hub: FakeHub,
                                                                 tmp_path: Path) -> None:
    strategy, spec = get_example(example)
    model = reduced_example(example)
    info = timm_reduce.push_to_hub(model, 'me/tiny')
    assert _network_calls(fake_hub) == ['create_repo', 'create_commit']  # one commit holds everything
    commit_call = fake_hub.calls[-1][1]
    assert set(commit_call['operations']) == FILES
    assert info.oid == fake_hub.repos['me/tiny'].branches['main'][-1].oid
    folder = fake_hub.write_folder('me/tiny', tmp_path / 'recorded')
    loaded = _load_local(folder)
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert timm_reduce.summary(loaded, macs=False)['unique_params'] == timm_reduce.summary(model, macs=False)[
        'unique_params']
    config = json.loads((folder / 'config.json').read_text())
    assert config['timm_reduce']['recipe'][0]['strategy'] == strategy
    if spec.options is not None:
        assert config['timm_reduce']['recipe'][0]['options'] == spec.options


def test_grouped_push_uses_timm_reduce_format_and_stores_shared_mlp_once(fake_hub: FakeHub, tmp_path: Path) -> None:
    import safetensors.torch

    model = reduced_example('grouped')
    timm_reduce.push_to_hub(model, 'me/tiny')
    folder = fake_hub.write_folder('me/tiny', tmp_path / 'recorded')
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'timm_reduce'
    assert config['model_args']['base'] == 'vit_tiny_patch16_224'
    assert config['model_args']['reduce'] == [{'format': 1, 'strategy': 'grouped', 'options': {'group_size': 2}}]
    assert {'version', 'timm_version', 'torch_version'} <= set(config['timm_reduce'])
    stored = safetensors.torch.load_file(str(folder / 'model.safetensors'))
    assert sum(t.numel() for t in stored.values()) == timm_reduce.summary(model, macs=False)['unique_params']
    loaded = _load_local(folder)
    assert loaded.blocks[0].mlp is loaded.blocks[1].mlp and loaded.blocks[2].mlp is loaded.blocks[3].mlp
    assert loaded.blocks[1].mlp is not loaded.blocks[2].mlp


def test_dense_push_is_plain_timm_with_identical_outputs(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = reduced_example('grouped')
    timm_reduce.push_to_hub(model, 'me/tiny-dense', dense=True)
    folder = fake_hub.write_folder('me/tiny-dense', tmp_path / 'recorded')
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert config['model_args']['mlp_ratio'] == 4.0
    assert config['timm_reduce']['dense'] is True
    assert config['timm_reduce']['recipe'][0]['strategy'] == 'grouped'  # the recipe it came from, not a rewrite
    loaded = _load_local(folder)
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert loaded.blocks[0].mlp is not loaded.blocks[1].mlp


def test_revision_private_and_pull_request(fake_hub: FakeHub, tmp_path: Path) -> None:
    first, second = reduced_example('grouped', seed=0), reduced_example('grouped', seed=1)
    first.train()
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    timm_reduce.push_to_hub(first, 'me/tiny', private=True)
    assert first.training and all(torch.equal(v, weights[k]) for k, v in first.state_dict().items())  # untouched
    first.eval()
    timm_reduce.push_to_hub(second, 'me/tiny', revision='v2', commit_message='second')
    repo = fake_hub.repos['me/tiny']
    assert repo.private
    assert [c.message for c in repo.branches['v2']][-1] == 'second'
    assert len(repo.branches['main']) == 1
    main = _load_local(fake_hub.write_folder('me/tiny', tmp_path / 'main'))
    v2 = _load_local(fake_hub.write_folder('me/tiny', tmp_path / 'v2', revision='v2'))
    assert torch.equal(_outputs(main), _outputs(first)) and torch.equal(_outputs(v2), _outputs(second))
    timm_reduce.push_to_hub(second, 'me/tiny', create_pr=True)
    assert len(repo.pull_requests) == 1 and len(repo.branches['main']) == 1


_LOAD_SCRIPT = textwrap.dedent('''
    import socket, sys
    def refuse(*args, **kwargs):
        raise RuntimeError('network access attempted')
    socket.socket.connect = refuse
    import torch, timm
    mode, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == 'plugin':
        import timm_reduce
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for name in names:
        model = timm.create_model(name, pretrained=True).eval()
        with torch.no_grad():
            row = {'out': model(x)}
        if mode == 'plugin':
            row['unique_params'] = timm_reduce.summary(model, macs=False)['unique_params']
            row['shared_modules'] = [model.blocks[i].mlp is model.blocks[i + 1].mlp for i in range(3)]
            fc1 = [getattr(b.mlp.fc1, 'weight', None) for b in model.blocks]
            row['same_storage'] = [fc1[i] is not None and fc1[i].data_ptr() == fc1[i + 1].data_ptr() for i in range(3)]
            row['storages'] = len({p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False)})
        results[name] = row
    results['plugin_imported'] = 'timm_reduce' in sys.modules
    torch.save(results, out)
''')


def _run_loader(mode: str, names: list[str], tmp_path: Path, cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE'))}
    env.update(HF_HOME=str(tmp_path / 'sub_hf_home'), HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    if cache is not None:
        env['HF_HUB_CACHE'] = str(cache)
    out = tmp_path / f'{mode}.pt'
    proc = subprocess.run([sys.executable, '-c', _LOAD_SCRIPT, mode, str(out), *names], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_hf_hub_loads_from_offline_cache_with_sharing_intact(fake_hub: FakeHub, tmp_path: Path) -> None:
    grouped, shallow, morph = reduced_example('grouped'), reduced_example('shallow'), reduced_example('morphreuse')
    timm_reduce.push_to_hub(grouped, 'me/tiny')
    timm_reduce.push_to_hub(shallow, 'me/tiny-shallow')
    timm_reduce.push_to_hub(morph, 'me/tiny-morph')
    timm_reduce.push_to_hub(reduced_example('grouped', seed=2), 'me/tiny', revision='v2')
    cache = tmp_path / 'hf_cache'
    for repo in ('me/tiny', 'me/tiny-shallow', 'me/tiny-morph'):
        fake_hub.write_cache(cache, repo)
    scan = scan_cache_dir(cache)  # huggingface_hub's own reader accepts the hand-built layout
    assert not scan.warnings, scan.warnings
    scanned = {repo.repo_id: repo for repo in scan.repos}
    assert set(scanned) == {'me/tiny', 'me/tiny-shallow', 'me/tiny-morph'}
    assert {ref for rev in scanned['me/tiny'].revisions for ref in rev.refs} == {'main', 'v2'}
    names = ['hf-hub:me/tiny', 'hf-hub:me/tiny-shallow', 'hf-hub:me/tiny-morph', 'hf-hub:me/tiny@v2']
    results = _run_loader('plugin', names, tmp_path, cache)
    x = sample_input()
    for name, model in (('hf-hub:me/tiny', grouped), ('hf-hub:me/tiny-shallow', shallow),
                        ('hf-hub:me/tiny-morph', morph)):  # unique params unchanged: shared banks re-tied
        row = results[name]
        assert torch.equal(row['out'], _outputs(model, x)), name
        assert row['unique_params'] == timm_reduce.summary(model, macs=False)['unique_params'], name
        assert row['storages'] == len({p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False)})
    assert results['hf-hub:me/tiny']['shared_modules'] == [True, False, True]
    assert results['hf-hub:me/tiny']['same_storage'] == [True, False, True]
    assert results['hf-hub:me/tiny-shallow']['shared_modules'] == [False, False, False]
    assert torch.equal(results['hf-hub:me/tiny@v2']['out'], _outputs(reduced_example('grouped', seed=2), x))


def test_dense_saves_load_in_plain_timm_without_the_plugin(fake_hub: FakeHub, tmp_path: Path) -> None:
    names, expected = [], {}
    for example in example_ids():
        model = reduced_example(example)
        if not get_example(example)[1].dense:  # no plain timm form: refused with a reason, nothing written
            with pytest.raises(ReduceError, match='plain-timm|plain timm'):
                timm_reduce.save_pretrained(model, tmp_path / f'dense-{example}', dense=True)
            assert not (tmp_path / f'dense-{example}' / 'config.json').exists()
            continue
        folder = timm_reduce.save_pretrained(model, tmp_path / f'dense-{example}', dense=True)
        names.append(f'local-dir:{folder}')
        expected[names[-1]] = _outputs(model)
        # a save without dense=True that chose the plain timm format (thin, uniform shallow) must also load
        folder = timm_reduce.save_pretrained(model, tmp_path / f'saved-{example}')
        if json.loads((folder / 'config.json').read_text())['architecture'] != 'timm_reduce':
            names.append(f'local-dir:{folder}')
            expected[names[-1]] = expected[names[-2]]
    assert {'local-dir:' + str(tmp_path / 'saved-thin'), 'local-dir:' + str(tmp_path / 'saved-shallow')} <= set(names)
    grouped = reduced_example('grouped')
    timm_reduce.push_to_hub(grouped, 'me/tiny-dense', dense=True)
    fake_hub.write_cache(tmp_path / 'hf_cache', 'me/tiny-dense')
    names.append('hf-hub:me/tiny-dense')
    expected[names[-1]] = _outputs(grouped)
    results = _run_loader('plain', names, tmp_path, tmp_path / 'hf_cache')
    assert results['plugin_imported'] is False
    for name in names:
        torch.testing.assert_close(results[name]['out'], expected[name], rtol=0, atol=1e-6, msg=name)


def test_model_card_renders_summary_numbers_and_metadata(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = reduced_example('grouped')
    metadata = {'calibration_data': '256 images of imagenette train', 'accuracy': {'top1': 81.25, 'top5': 95.5},
                'license': 'apache-2.0', 'base_model': 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k',
                'description': 'A tiny test model.', 'seed': 7}
    timm_reduce.push_to_hub(model, 'me/tiny', metadata=metadata)
    text = fake_hub.tree('me/tiny')['README.md'].decode()
    card = ModelCard(text)  # huggingface_hub's own parser of the YAML front matter
    data = card.data.to_dict()
    assert data['library_name'] == 'timm'
    assert {'timm', 'timm_reduce', 'grouped'} <= set(data['tags'])
    assert data['license'] == 'apache-2.0'
    assert data['base_model'] == metadata['base_model']
    info, dense = timm_reduce.summary(model), timm_reduce.summary(tiny_vit(), macs=False)
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:5]]
            for line in card.text.splitlines() if line.startswith('| ') and line.count('|') == 5}
    assert rows['unique parameters (stored)'][:2] == [f"{dense['unique_params']:,}", f"{info['unique_params']:,}"]
    assert rows['parameters (as used in the forward pass)'][:2] == [f"{dense['params']:,}", f"{info['params']:,}"]
    assert rows['MLP parameters'][:2] == [f"{dense['mlp_params']:,}", f"{info['mlp_params']:,}"]
    assert rows['bytes at rest (tensor data)'][:2] == [f"{dense['bytes']:,}", f"{info['bytes']:,}"]
    assert rows['MACs per image'][1] == f"{info['macs']:,}"
    assert info['unique_params'] < dense['unique_params']
    assert '256 images of imagenette train' in card.text
    assert '| top1 | 81.25 |' in card.text and '| top5 | 95.5 |' in card.text
    assert "timm.create_model('hf-hub:me/tiny', pretrained=True)" in card.text
    assert '`grouped:group_size=2`' in card.text
    assert '**seed**: 7' in card.text


def test_unreduced_model_round_trips_and_its_card_says_so(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = tiny_vit()
    timm_reduce.push_to_hub(model, 'me/dense')
    text = fake_hub.tree('me/dense')['README.md'].decode()
    assert 'No reduction recorded' in text and '100.0%' in text
    loaded = _load_local(fake_hub.write_folder('me/dense', tmp_path / 'recorded'))
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_card_of_plain_checkpoint_says_stock_timm_loads_it(fake_hub: FakeHub) -> None:
    timm_reduce.push_to_hub(reduced_example('shallow'), 'me/tiny-shallow')
    text = fake_hub.tree('me/tiny-shallow')['README.md'].decode()
    front = yaml.safe_load(text.split('---\n')[1])
    assert 'shallow' in front['tags'] and 'license' not in front and 'base_model' not in front
    assert 'so stock timm loads it' in text


def test_save_pretrained_writes_card_but_keeps_a_users_readme(tmp_path: Path) -> None:
    model = reduced_example('grouped')
    folder = timm_reduce.save_pretrained(model, tmp_path / 'out')
    assert "local-dir:path/to/this/folder" in (folder / 'README.md').read_text()
    user = tmp_path / 'mine'
    user.mkdir()
    (user / 'README.md').write_text('# my own card\n')
    timm_reduce.save_pretrained(model, user)
    assert (user / 'README.md').read_text() == '# my own card\n'
    bare = timm_reduce.save_pretrained(model, tmp_path / 'bare', model_card=False)
    assert sorted(p.name for p in bare.iterdir()) == ['config.json', 'model.safetensors']


def test_cli_push_folder_uploads_it_unchanged_and_adds_the_card(fake_hub: FakeHub, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    model = reduced_example('grouped')
    folder = timm_reduce.save_pretrained(model, tmp_path / 'out', model_card=False, metadata={'accuracy': 50.0})
    (folder / 'notes.txt').write_text('not uploaded')
    before = _digest(folder)
    assert cli.main(['push', str(folder), 'me/tiny']) == 0
    assert 'https://huggingface.co/me/tiny/commit/' in capsys.readouterr().out
    assert _digest(folder) == before
    tree = fake_hub.tree('me/tiny')
    assert set(tree) == FILES
    assert tree['model.safetensors'] == (folder / 'model.safetensors').read_bytes()
    assert "hf-hub:me/tiny'" in tree['README.md'].decode() and '| accuracy | 50.0 |' in tree['README.md'].decode()
    loaded = _load_local(fake_hub.write_folder('me/tiny', tmp_path / 'recorded'))
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_cli_push_keeps_a_users_card_and_dense_flag_uploads_plain_timm(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = reduced_example('grouped')
    folder = timm_reduce.save_pretrained(model, tmp_path / 'out', metadata={'calibration_data': 'cifar'})
    (folder / 'README.md').write_text('# hand written\n')
    assert cli.main(['push', str(folder), 'me/tiny', '--message', 'hi']) == 0
    assert fake_hub.tree('me/tiny')['README.md'] == b'# hand written\n'
    assert fake_hub.repos['me/tiny'].branches['main'][-1].message == 'hi'
    assert cli.main(['push', str(folder), 'me/tiny-dense', '--dense']) == 0
    config = json.loads(fake_hub.tree('me/tiny-dense')['config.json'])
    assert config['architecture'] == 'vit_tiny_patch16_224' and config['timm_reduce']['calibration_data'] == 'cifar'
    loaded = _load_local(fake_hub.write_folder('me/tiny-dense', tmp_path / 'recorded'))
    assert torch.equal(_outputs(loaded), _outputs(model))


# ---- failures: clear errors, nothing sent or nothing committed, local files intact ----

@pytest.mark.parametrize('repo_id', ['tiny', 'me/tiny/extra', 'me/bad..name', 'me/-tiny', 'me/ti ny', '', 'me/',
                                     'me/' + 'x' * 100, 42])
def test_invalid_repo_id_is_refused_before_any_network_call(repo_id: object, fake_hub: FakeHub) -> None:
    with pytest.raises(HubError, match="namespace/name"):
        timm_reduce.push_to_hub(reduced_example('grouped'), repo_id)
    assert fake_hub.calls == []


def test_cli_reports_an_invalid_repo_id(fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = timm_reduce.save_pretrained(reduced_example('grouped'), tmp_path / 'out')
    assert cli.main(['push', str(folder), 'just-a-name']) == 2
    assert "Invalid Hub repo id 'just-a-name'" in capsys.readouterr().err
    assert fake_hub.calls == []


def test_missing_token_explains_how_to_log_in(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('HF_TOKEN')
    with pytest.raises(HubError, match='no Hugging Face token') as err:
        timm_reduce.push_to_hub(reduced_example('grouped'), 'me/tiny')
    assert 'hf auth login' in str(err.value) and 'HF_TOKEN' in str(err.value)
    assert fake_hub.calls == []
    timm_reduce.push_to_hub(reduced_example('grouped'), 'me/tiny', token='hf_explicit')  # an explicit token works
    assert fake_hub.calls[0] == ('HfApi', {'token': 'hf_explicit', 'library_name': 'timm_reduce',
                                           'library_version': timm_reduce.__version__})


def test_offline_mode_is_reported(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(HubError, match='HF_HUB_OFFLINE'):
        timm_reduce.push_to_hub(reduced_example('grouped'), 'me/tiny')
    assert fake_hub.calls == []


def test_rejected_token_is_explained(fake_hub: FakeHub) -> None:
    response = httpx.Response(401, request=httpx.Request('POST', 'https://huggingface.co/api/repos/create'))
    fake_hub.fail_create_repo = HfHubHTTPError('401 Unauthorized', response=response)
    with pytest.raises(HubError, match='HTTP 401.*token is invalid') as err:
        timm_reduce.push_to_hub(reduced_example('grouped'), 'me/tiny')
    assert 'hf auth login' in str(err.value)


def test_network_failure_mid_upload_commits_nothing_and_keeps_local_files(fake_hub: FakeHub, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    model = reduced_example('grouped')
    timm_reduce.push_to_hub(model, 'me/tiny')  # a previous good revision
    good = fake_hub.tree('me/tiny')
    folder = timm_reduce.save_pretrained(reduced_example('grouped', seed=3), tmp_path / 'out')
    before = _digest(folder)
    fake_hub.fail_commit = httpx.ConnectError('connection reset by peer')
    with pytest.raises(HubError, match='Nothing partial was committed') as err:
        timm_reduce.persistence.hub.push_folder(folder, 'me/tiny')
    assert 'ConnectError' in str(err.value) and 'local files are unchanged' in str(err.value)
    assert fake_hub.tree('me/tiny') == good and len(fake_hub.repos['me/tiny'].branches['main']) == 1
    assert _digest(folder) == before
    assert cli.main(['push', str(folder), 'me/tiny']) == 2  # the CLI reports it and exits non-zero
    assert 'Nothing partial was committed' in capsys.readouterr().err
    fake_hub.fail_commit = None
    assert cli.main(['push', str(folder), 'me/tiny']) == 0  # retry once the network is back
    loaded = _load_local(fake_hub.write_folder('me/tiny', tmp_path / 'recorded'))
    assert torch.equal(_outputs(loaded), _outputs(reduced_example('grouped', seed=3)))


def test_push_folder_refuses_a_folder_that_does_not_load(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ReduceError, match='config.json, model.safetensors missing'):
        timm_reduce.persistence.hub.push_folder(tmp_path, 'me/tiny')
    folder = timm_reduce.save_pretrained(reduced_example('grouped'), tmp_path / 'out')
    other = timm_reduce.save_pretrained(reduced_example('shallow'), tmp_path / 'other')
    (folder / 'model.safetensors').write_bytes((other / 'model.safetensors').read_bytes())  # wrong weights
    with pytest.raises(ReduceError, match='do not match|do not fit|does not load'):
        timm_reduce.persistence.hub.push_folder(folder, 'me/tiny')
    assert fake_hub.calls == []


def test_bad_metadata_is_refused_before_upload(fake_hub: FakeHub) -> None:
    with pytest.raises(ReduceError, match='JSON-serialisable'):
        timm_reduce.push_to_hub(reduced_example('grouped'), 'me/tiny', metadata={'data': object()})
    with pytest.raises(ReduceError, match='written by timm_reduce itself'):
        timm_reduce.push_to_hub(reduced_example('grouped'), 'me/tiny', metadata={'recipe': 'mine'})
    assert _network_calls(fake_hub) == []


def test_dense_push_of_per_block_widths_says_why_it_cannot(fake_hub: FakeHub) -> None:
    model = timm_reduce.reduce(tiny_vit(), 'shallow', keep=[64, 32, 64, 32])
    with pytest.raises(ReduceError, match='per-block MLP widths'):
        timm_reduce.push_to_hub(model, 'me/tiny', dense=True)
    assert _network_calls(fake_hub) == []
