"""Loading never silently produces a different model, and an untrusted folder can make the loader do nothing but
read its own two files within fixed bounds (issue 14, items 1, 2, 3, 5, 15, 16).

Each test edits a saved folder the way an attacker or a careless user would and expects a ReduceError that names
the key, field or limit. `BAD_INPUTS` counts the distinct bad inputs tried here (docs/threat-model.md cites it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_reduce
from timm_reduce import ReduceError
from timm_reduce.persistence import trust
from timm_reduce.persistence.serialization import load_pretrained, load_reduced_state, read_weights, safe_torch_load

from conftest import tiny, tiny_input

WEIGHTS, CONFIG = 'model.safetensors', 'config.json'


def _save(model: torch.nn.Module, folder: Path) -> Path:
    timm_reduce.save_pretrained(model, folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    state = safetensors.torch.load_file(str(folder / WEIGHTS))
    edit(state)
    safetensors.torch.save_file(state, str(folder / WEIGHTS), metadata={'format': 'pt'})


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture()
def grouped(tmp_path):
    model = timm_reduce.reduce(tiny('vit'), 'grouped', group_size=2).eval()  # depth 4: blocks 0+1, 2+3 share
    return model, _save(model, tmp_path / 'grouped')


@pytest.fixture()
def sparse_fips(tmp_path):
    model = timm_reduce.reduce(tiny('vit'), 'fips', budget=0.5, group_size=2, sparsifier='static', sparsity=0.6)
    return model.eval(), _save(model, tmp_path / 'fips')


BAD_INPUTS: list[str] = []


def _count(*names: str) -> None:
    BAD_INPUTS.extend(names)


# ---- item 1: every shared tensor stored once, loaded from exactly that key ------------------------------------

def test_an_alias_key_in_the_file_is_refused_naming_it(grouped):
    _, folder = grouped
    zeros = {'blocks.1.mlp.fc1.weight': torch.zeros(128, 32)}  # block 1 shares block 0's MLP
    _edit_weights(folder, lambda s: s.update(zeros))
    for load in (load_pretrained, lambda f: timm.create_model(f'local-dir:{f}', pretrained=True)):
        with pytest.raises(ReduceError, match=r'blocks\.1\.mlp\.fc1\.weight \(an alias of the shared '
                                              r'blocks\.0\.mlp\.fc1\.weight'):
            load(folder)


def test_an_alias_key_holding_the_same_values_is_still_refused_in_the_saved_format(grouped):
    """The save_pretrained format stores a shared tensor once: a second copy means the file was not written by it."""
    _, folder = grouped
    _edit_weights(folder, lambda s: s.update({'blocks.1.mlp.fc2.bias': s['blocks.0.mlp.fc2.bias'].clone()}))
    with pytest.raises(ReduceError, match=r'blocks\.1\.mlp\.fc2\.bias'):
        load_pretrained(folder)


@pytest.mark.parametrize('options', [{'group_size': 4}, {'group_size': 1}, {'group_size': 12},
                                     {'groups': [[0, 2], [1, 3]]}], ids=['gs4', 'gs1', 'gs12', 'groups'])
def test_a_recipe_that_disagrees_with_the_weights_is_refused(grouped, options):
    _, folder = grouped

    def edit(config):
        config['model_args']['reduce'][0]['options'] = options
    _edit_config(folder, edit)
    with pytest.raises(ReduceError, match=r'do not match the model its config describes.*blocks\.\d\.mlp\.fc'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_a_fips_basis_stored_under_a_second_name_is_refused(sparse_fips):
    _, folder = sparse_fips
    stored = safetensors.torch.load_file(str(folder / WEIGHTS))
    bases = sorted(k for k in stored if k.endswith('basis.weight'))
    # block 1 shares block 0's basis (group_size=2): its key is an alias
    alias = bases[0].replace('blocks.0.', 'blocks.1.')
    assert alias not in stored
    _edit_weights(folder, lambda s: s.update({alias: s[bases[0]].clone()}))
    with pytest.raises(ReduceError, match=alias.replace('.', r'\.')):
        load_pretrained(folder)


def test_a_full_state_dict_may_repeat_a_shared_tensor_only_with_the_same_values(grouped):
    """Training checkpoints list a shared tensor under every name: equal copies load, a differing one is refused
    (before the fix the last key silently won)."""
    model, _ = grouped
    full = {k: v.clone() for k, v in model.state_dict().items()}
    target = timm_reduce.reduce(tiny('vit', seed=5), 'grouped', group_size=2)
    load_reduced_state(target, full, 'full')
    x = tiny_input(model)
    assert torch.equal(_outputs(target, x), _outputs(model, x))
    full['blocks.3.mlp.fc2.weight'] = torch.zeros_like(full['blocks.3.mlp.fc2.weight'])
    fresh = timm_reduce.reduce(tiny('vit', seed=5), 'grouped', group_size=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ReduceError, match=r'differ.*blocks\.3\.mlp\.fc2\.weight'):
        load_reduced_state(fresh, full, 'full')
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing was loaded


@pytest.mark.parametrize('dtype', [torch.bool, torch.int64])
def test_weights_are_never_cast_from_bool_or_integers(grouped, dtype):
    _, folder = grouped
    _edit_weights(folder, lambda s: s.update({'head.weight': torch.ones_like(s['head.weight'], dtype=dtype)}))
    with pytest.raises(ReduceError, match=rf'head\.weight is {dtype}'):
        load_pretrained(folder)


_count('alias key (different values)', 'alias key (same values)', 'group_size 4', 'group_size 1', 'group_size 12',
       'groups permuted', 'FiPS basis alias', 'full state_dict with a differing alias', 'bool weight', 'int64 weight')


# ---- item 2: bounds, and the header is compared before anything is allocated ----------------------------------

def _set_args(**values):
    def edit(config):
        config['model_args'].update(values)
    return edit


@pytest.mark.parametrize('edit,limit', [
    (_set_args(mlp_ratio=1e6), 'at most 64'),
    (_set_args(mlp_ratio=1000), 'at most 64'),
    (_set_args(depth=400), 'at most 128'),
    (_set_args(embed_dim=10 ** 7), 'at most 65,536'),
    (_set_args(img_size=[10 ** 9, 10 ** 9]), 'at most 65,536'),
    (_set_args(num_classes=10 ** 12), 'at most 10,000,000'),
    (_set_args(mlp_ratio=float('inf')), 'finite numbers only|not valid JSON'),
    (_set_args(mlp_ratio=float('nan')), 'finite numbers only|not valid JSON'),
    (lambda c: c['model_args'].update(reduce=c['model_args']['reduce'] * 1000), 'at most 8 steps'),
], ids=['mlp_ratio_1e6', 'mlp_ratio_1000', 'depth_400', 'embed_dim', 'img_size', 'num_classes', 'inf', 'nan',
        '1000_steps'])
def test_a_config_beyond_the_bounds_is_refused(grouped, monkeypatch, edit, limit):
    _, folder = grouped
    _edit_config(folder, edit)
    built = []
    monkeypatch.setattr(timm_reduce.persistence.entrypoint, 'build_reduced', lambda *a, **k: built.append(1))
    with pytest.raises(ReduceError, match=limit):
        load_pretrained(folder)
    with pytest.raises(ReduceError, match=limit):  # timm's own entry, without load_pretrained's checks
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert built == []  # refused before anything was built


_count('mlp_ratio=1e6', 'mlp_ratio=1000', 'depth=400', 'embed_dim=1e7', 'img_size=1e9', 'num_classes=1e12',
       'mlp_ratio=inf', 'mlp_ratio=NaN', '1000 recipe steps')


@pytest.mark.parametrize('edit', [_set_args(mlp_ratio=32.0), _set_args(depth=100), _set_args(embed_dim=4096),
                                  _set_args(num_classes=100000)],
                         ids=['mlp_ratio_32', 'depth_100', 'embed_dim_4096', 'num_classes_1e5'])
def test_sizes_within_bounds_are_checked_against_the_header_before_allocating(grouped, monkeypatch, edit):
    _, folder = grouped
    _edit_config(folder, edit)
    devices = []
    real = timm_reduce.persistence.entrypoint.build_reduced

    def spy(*args, **kwargs):
        devices.append(torch.get_default_device().type)
        return real(*args, **kwargs)
    monkeypatch.setattr(timm_reduce.persistence.entrypoint, 'build_reduced', spy)
    with pytest.raises(ReduceError, match='do not match the model its config describes'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert set(devices) <= {'meta'}  # at most the meta-device skeleton was built, no weight allocated


_count('mlp_ratio=32 vs file', 'depth=100 vs file', 'embed_dim=4096 vs file', 'num_classes=1e5 vs file')


def test_a_plain_timm_folder_is_checked_against_its_header_too(tmp_path):
    folder = _save(timm_reduce.reduce(tiny('vit'), 'thin', mlp_ratio=2.0), tmp_path / 'thin')
    assert json.loads((folder / CONFIG).read_text())['architecture'] == 'vit_tiny_patch16_224'
    _edit_config(folder, _set_args(mlp_ratio=48.0))
    with pytest.raises(ReduceError, match=r'do not match the model its config describes.*mlp\.fc1\.weight'):
        load_pretrained(folder)


def test_a_config_file_too_large_or_nested_too_deeply_is_refused(grouped, monkeypatch):
    _, folder = grouped
    (folder / CONFIG).write_text('[' * 100000 + ']' * 100000)
    with pytest.raises(ReduceError, match='not valid JSON'):
        load_pretrained(folder)
    monkeypatch.setattr(trust, 'MAX_CONFIG_BYTES', 100)
    with pytest.raises(ReduceError, match='at most 100'):
        load_pretrained(folder)


def test_a_model_larger_than_its_file_can_back_is_refused(grouped, monkeypatch):
    """A FiPS layer's values are data-dependent: the entries the file can back bound what is allocated."""
    _, folder = grouped
    monkeypatch.setattr(trust, 'ENTRIES_PER_STORED_BYTE', 0)
    monkeypatch.setattr(trust, '_HEADER_SLACK', 0)
    with pytest.raises(ReduceError, match='per byte of its'):
        load_pretrained(folder)


def test_random_weights_for_a_config_are_bounded_too(grouped):
    """`pretrained=False` reads no weights, so no header backs the size: the meta-device count must."""
    _, folder = grouped
    _edit_config(folder, _set_args(embed_dim=65536, mlp_ratio=64, depth=128, num_heads=1))
    with pytest.raises(ReduceError, match='at most 20,000,000,000'):
        timm.create_model(f'local-dir:{folder}')


_count('mlp_ratio=48 in a plain timm config', 'in-bounds sizes with random weights', 'config nested 100000 deep', 'config over the size bound',
       'model larger than the file backs')


# ---- item 3: a config cannot point the loader at other files -----------------------------------------------

def _set_pretrained_cfg(**values):
    def edit(config):
        config['pretrained_cfg'].update(values)
    return edit


PATH_EDITS = {
    'checkpoint_path': _set_args(checkpoint_path='/etc/passwd'),
    'base_local_dir': _set_args(base='local-dir:/etc'),
    'base_hf_hub': _set_args(base='hf-hub:someone/else'),
    'cache_dir': _set_args(cache_dir='/tmp'),
    'overlay_file': _set_args(pretrained_cfg_overlay={'file': '/etc/passwd'}),
    'nested_path_value': _set_args(act_kwargs={'table': '../../etc/passwd'}),
    'cfg_url': _set_pretrained_cfg(url='https://example.com/weights.pth'),
    'cfg_file': _set_pretrained_cfg(file='/etc/passwd'),
    'cfg_hf_hub_filename': _set_pretrained_cfg(hf_hub_filename='pytorch_model.bin'),
    'cfg_custom_load': _set_pretrained_cfg(custom_load=True),
}


@pytest.mark.parametrize('name', list(PATH_EDITS))
def test_path_like_config_fields_are_refused(grouped, tmp_path, monkeypatch, name):
    _, folder = grouped
    _edit_config(folder, PATH_EDITS[name])
    opened = []
    real_open = open

    def watch(file, *args, **kwargs):  # the loader must not touch /etc at all
        opened.append(str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr('builtins.open', watch)
    with pytest.raises(ReduceError, match='another file, folder, URL or Hub repository'):
        load_pretrained(folder)
    assert not any(p.startswith('/etc') for p in opened)


@pytest.mark.parametrize('name', ['checkpoint_path', 'base_local_dir', 'cfg_url', 'cfg_hf_hub_filename'])
def test_path_like_fields_are_refused_by_timms_own_entry_too(grouped, name):
    _, folder = grouped
    _edit_config(folder, PATH_EDITS[name])
    with pytest.raises(ReduceError, match='another file, folder, URL or Hub repository'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_a_plain_timm_config_with_a_checkpoint_path_is_refused(tmp_path):
    folder = _save(timm_reduce.reduce(tiny('vit'), 'thin', mlp_ratio=2.0), tmp_path / 'thin')
    _edit_config(folder, _set_args(checkpoint_path='/etc/passwd'))
    with pytest.raises(ReduceError, match=r'model_args\.checkpoint_path'):
        load_pretrained(folder)


_count(*(f'path field {n}' for n in PATH_EDITS), 'plain timm checkpoint_path')


# ---- item 5: FiPS compact form validated, nothing cast -------------------------------------------------------

def _bits(edit):
    def apply(state):
        key = next(k for k in state if k.endswith('factor.bits'))
        state[key] = edit(state[key])
    return apply


def _values(edit):
    def apply(state):
        key = next(k for k in state if k.endswith('factor.values'))
        state[key] = edit(state[key])
    return apply


def _flip_one_bit(bits):
    out = bits.clone()
    out[0] ^= 1
    return out


FIPS_EDITS = {
    'short_bits': (_bits(lambda b: b[:-1]), 'factor.bits'),
    'long_bits': (_bits(lambda b: torch.cat([b, torch.zeros(4, dtype=torch.uint8)])), 'factor.bits'),
    'float_bits': (_bits(lambda b: b.float()), 'factor.bits'),
    'int64_bits': (_bits(lambda b: b.long()), 'factor.bits'),
    '2d_bits': (_bits(lambda b: b.reshape(1, -1)), 'factor.bits'),
    'popcount': (_bits(_flip_one_bit), 'factor'),
    'f16_values': (_values(lambda v: v.half()), 'factor.values'),
    'int64_values': (_values(lambda v: v.long()), 'factor.values'),
    'bool_values': (_values(lambda v: v != 0), 'factor.values'),
    'bf16_values': (_values(lambda v: v.bfloat16()), 'factor.values'),
    'long_values': (_values(lambda v: torch.cat([v, v[:3]])), 'factor'),
    '2d_values': (_values(lambda v: v.reshape(1, -1)), 'factor.values'),
}


@pytest.mark.parametrize('name', list(FIPS_EDITS))
def test_a_bad_fips_compact_form_is_refused_naming_the_tensor(sparse_fips, name):
    _, folder = sparse_fips
    edit, tensor = FIPS_EDITS[name]
    _edit_weights(folder, edit)
    with pytest.raises(ReduceError, match=rf'blocks\.\d\.mlp\.fc\d\.{tensor.replace(".", chr(92) + ".")}'):
        load_pretrained(folder)


@pytest.mark.parametrize('name', list(FIPS_EDITS) + ['padding', 'dense_short_values'])
def test_the_fips_layer_validates_its_compact_form_itself(sparse_fips, tmp_path, name):
    """The same checks where no header check runs before (load_reduced_state: CLI --checkpoint, train.py)."""
    _, folder = sparse_fips
    state = read_weights(folder)
    if name == 'padding':
        # a 3 x 5 factor packs 15 bits into 2 bytes: the 16th bit is padding
        from timm_reduce.strategies.fips import FipsBasis, FipsLinear, pack_bits
        layer = FipsLinear(FipsBasis(torch.randn(4, 3)), torch.randn(3, 5), None, transposed=False)
        mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
        bits = pack_bits(mask)
        bits[-1] |= 1
        stored = {'factor.values': torch.randn(int(mask.sum())), 'factor.bits': bits}
        with pytest.raises(ReduceError, match=r'factor\.bits sets padding bits'):
            layer.decode_state_dict('', stored)
        return
    if name == 'dense_short_values':
        key = next(k for k in state if k.endswith('factor.bits'))
        del state[key]
        tensor = 'factor.values'
    else:
        edit, tensor = FIPS_EDITS[name]
        edit(state)
    target = timm_reduce.reduce(tiny('vit'), 'fips', budget=0.5, group_size=2, sparsifier='static', sparsity=0.6)
    with pytest.raises(ReduceError, match=rf'blocks\.\d\.mlp\.fc\d\.{tensor.replace(".", chr(92) + ".")}'):
        load_reduced_state(target, state, 'edited')


_count(*(f'FiPS {n}' for n in FIPS_EDITS), 'FiPS padding bit set', 'FiPS bits removed (dense, short values)')


def test_valid_fips_folders_still_load_exactly(sparse_fips):
    model, folder = sparse_fips
    x = tiny_input(model)
    assert torch.equal(_outputs(load_pretrained(folder), x), _outputs(model, x))


# ---- item 15: summary() of a model built from its class ------------------------------------------------------

def test_summary_of_a_class_built_model_uses_its_own_input_size():
    from timm.models.vision_transformer import VisionTransformer

    from timm_reduce.summary import model_input_size

    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    assert model_input_size(model) == (3, 28, 28)
    info = timm_reduce.summary(model)
    assert info['macs'] == timm_reduce.summary(model, input_size=(3, 28, 28))['macs'] > 0


_count('class-built ViT at 28 px')


# ---- item 16: our words, never torch's weights_only=False advice ------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize('content', ['code', 'garbage', 'empty'])
def test_unreadable_checkpoints_never_suggest_weights_only_false(tmp_path, content):
    path = tmp_path / 'bad.pth'
    if content == 'code':
        torch.save({'w': torch.ones(1), 'x': _Payload()}, path)
    elif content == 'garbage':
        path.write_bytes(b'\x80\x04garbage')
    else:
        path.write_bytes(b'')
    for read in (safe_torch_load, read_weights):
        with pytest.raises(ReduceError) as info:
            read(path)
        text = str(info.value)
        assert 'weights_only' not in text and 'will likely succeed' not in text
        assert str(path) in text
        if content == 'code':
            assert 'posix.getcwd' in text or 'os.getcwd' in text or 'nt.getcwd' in text


_count('pickle with code', 'garbage pickle', 'empty checkpoint')


def test_the_count_of_bad_inputs_is_what_the_docs_say():
    text = (Path(__file__).parents[1] / 'docs' / 'threat-model.md').read_text()
    assert len(BAD_INPUTS) == len(set(BAD_INPUTS))
    assert f'{len(BAD_INPUTS)} distinct bad inputs' in text
