"""Saving is all-or-nothing and keeps what it is given (issue 14, items 6, 7, 8, 9, 11, 17, 18).

Every test here failed before the fix: a crash between two renames mixed two saves, a README.md folder raised after
the new weights were in place, files were 0600, bf16/float64 came back float32 (and a bf16 push was refused), a
`functools.partial` creation argument raised a bare TypeError after all the work, push_folder uploaded NaN weights,
a model with a replaced head or MLPs pruned by another library crashed the save or wrote a folder that does not load.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import timm_reduce
from timm_reduce import cli
from timm_reduce.errors import ReduceError
from timm_reduce.persistence import files, serialization
from timm_reduce.persistence.serialization import check_saveable

from _hub_fakes import FakeHub, fake_hub, offline, reduced_example, sample_input, tiny_vit  # noqa: F401

MANAGED = ('config.json', 'model.safetensors', 'README.md')


def _outputs(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(sample_input().to(dtype)).float()


def _managed(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {n: (folder / n).read_bytes() for n in MANAGED if (folder / n).is_file()}


# ---- item 6: the folder holds the old save or the new one, never a mix ------------------------------------------

class _Injector:
    """Counts the file-system steps of one write_folder call; at step `fail_at` it first records what a process
    killed right there would leave on disk, then raises."""

    def __init__(self, fail_at: int, folder: Path) -> None:
        self.fail_at, self.folder = fail_at, folder
        self.count, self.active = 0, False
        self.crash_state: Any = 'not reached'
        self.crash_listing: list[str] = []

    def step(self, name: str) -> None:
        if not self.active:
            return
        self.count += 1
        if self.count == self.fail_at:
            self.active = False
            self.crash_state = _managed(self.folder)
            self.crash_listing = sorted(p.name for p in self.folder.parent.iterdir())
            self.active = True
            raise OSError(errno.EIO, f'injected failure at step {self.count} ({name})')

    def wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.step(name)
            return fn(*args, **kwargs)
        return wrapped


def _install(monkeypatch: pytest.MonkeyPatch, injector: _Injector, exchange: bool) -> None:
    for name in ('mkdir', 'rename', 'replace', 'link', 'unlink', 'rmdir', 'chmod', 'fsync'):
        monkeypatch.setattr(os, name, injector.wrap(f'os.{name}', getattr(os, name)))
    real_exchange = files._exchange
    monkeypatch.setattr(files, '_exchange', injector.wrap('exchange', real_exchange if exchange else lambda a, b: False))
    monkeypatch.setattr(safetensors.torch, 'save_file', injector.wrap('save_file', safetensors.torch.save_file))
    monkeypatch.setattr(Path, 'write_text', injector.wrap('write_text', Path.write_text))
    real_write_folder = serialization.write_folder

    def counted(*args: Any, **kwargs: Any) -> Any:
        injector.active = True
        try:
            return real_write_folder(*args, **kwargs)
        finally:
            injector.active = False

    monkeypatch.setattr(serialization, 'write_folder', counted)


@pytest.mark.parametrize('exchange', [True, False], ids=['renameat2-exchange', 'rename-aside'])
def test_failure_at_every_step_leaves_the_old_or_the_new_save(exchange: bool, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    old_model = reduced_example('grouped')                                   # timm_reduce format
    new_model = timm_reduce.reduce(tiny_vit(seed=3), 'shallow', keep=0.5)   # plain timm format
    old_ref = _managed(timm_reduce.save_pretrained(old_model, tmp_path / 'ref_old'))
    new_ref = _managed(timm_reduce.save_pretrained(new_model, tmp_path / 'ref_new'))
    template = tmp_path / 'template'
    shutil.copytree(tmp_path / 'ref_old', template)
    (template / 'notes.txt').write_text('my notes')                         # the user's own files stay
    (template / 'runs').mkdir()
    (template / 'runs' / 'log.txt').write_text('my log')
    want_old, want_new = _outputs(old_model), _outputs(new_model)
    outcomes = set()
    k = 0
    while True:
        k += 1
        work = tmp_path / f'k{k}'
        work.mkdir()
        folder = work / 'model'
        shutil.copytree(template, folder)
        injector = _Injector(k, folder)
        with monkeypatch.context() as patch:
            _install(patch, injector, exchange)
            caplog.clear()
            try:
                timm_reduce.save_pretrained(new_model, folder)
                failed = False
            except OSError:
                failed = True
        logs = caplog.text
        # a process killed right before step k: the folder is one whole save (rename-aside: or briefly absent,
        # with the previous save whole next to it)
        if injector.crash_state != 'not reached':
            if injector.crash_state is None:
                assert not exchange
                aside = [n for n in injector.crash_listing if n.startswith('.model.timm_reduce-old-')]
                assert len(aside) == 1, injector.crash_listing
            else:
                assert injector.crash_state in (old_ref, new_ref), f'mixed folder if killed before step {k}'
        # the exception was handled: one whole save, and it loads as exactly that model
        state = _managed(folder)
        assert state in (old_ref, new_ref), f'failure at step {k} left a mix'
        loaded = timm_reduce.load_pretrained(folder)
        assert torch.equal(_outputs(loaded), want_new if state == new_ref else want_old)
        outcomes.add('new' if state == new_ref else 'old')
        # the user's files: never lost; only a failure after the swap may leave a folder in a sibling, and says so
        assert (folder / 'notes.txt').read_text() == 'my notes'
        leftovers = [p for p in work.iterdir() if p.name != 'model']
        for p in leftovers:
            assert str(p) in logs, f'{p} left behind without a warning (step {k})'
        runs = [d / 'runs' / 'log.txt' for d in (folder, *leftovers) if (d / 'runs' / 'log.txt').is_file()]
        assert [r.read_text() for r in runs] == ['my log'], f'step {k}'
        if not failed:  # absorbed: an existing parent folder, or a step after the swap (warned above)
            assert state == new_ref
        if injector.count < k:  # step k never came: a clean save
            assert not failed and not leftovers
            break
    assert outcomes == {'old', 'new'} and k > 10


@pytest.mark.parametrize('name, model_card', [('README.md', True), ('config.json', True),
                                              ('model.safetensors', False)])
def test_an_entry_to_replace_that_is_a_folder_fails_before_anything_is_replaced(name: str, model_card: bool,
                                                                                tmp_path: Path) -> None:
    old = reduced_example('grouped')
    folder = timm_reduce.save_pretrained(old, tmp_path / 'out')
    (folder / name).unlink()
    (folder / name).mkdir()
    before = _managed(folder)
    with pytest.raises(ReduceError, match=f'{name} there is a folder'):
        timm_reduce.save_pretrained(timm_reduce.reduce(tiny_vit(seed=3), 'thin', mlp_ratio=2.0), folder,
                                    model_card=model_card)
    assert _managed(folder) == before and (folder / name).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
    if name == 'README.md':  # the old save still loads as itself
        assert torch.equal(_outputs(timm_reduce.load_pretrained(folder)), _outputs(old))


def test_save_keeps_the_users_files_as_the_same_files(tmp_path: Path) -> None:
    folder = tmp_path / 'out'
    timm_reduce.save_pretrained(reduced_example('grouped'), folder)
    (folder / 'notes.txt').write_text('mine')
    (folder / 'README.md').write_text('# my own card')  # a user's card is kept, no card written
    os.symlink('notes.txt', folder / 'link')
    (folder / 'sub').mkdir()
    (folder / 'sub' / 'deep.txt').write_text('deep')
    inode = (folder / 'notes.txt').stat().st_ino
    new = timm_reduce.reduce(tiny_vit(seed=3), 'shallow', keep=0.5)
    timm_reduce.save_pretrained(new, folder)
    assert (folder / 'notes.txt').stat().st_ino == inode  # a hard link of the same file, not a copy
    assert os.readlink(folder / 'link') == 'notes.txt' and (folder / 'sub' / 'deep.txt').read_text() == 'deep'
    assert (folder / 'README.md').read_text() == '# my own card'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
    assert torch.equal(_outputs(timm_reduce.load_pretrained(folder)), _outputs(new))


def test_a_linked_folder_is_saved_through_its_link(tmp_path: Path) -> None:
    real = tmp_path / 'runs' / 'run1'
    timm_reduce.save_pretrained(reduced_example('grouped'), real)
    os.symlink(real, tmp_path / 'latest')
    new = reduced_example('shallow')
    timm_reduce.save_pretrained(new, tmp_path / 'latest')
    assert (tmp_path / 'latest').is_symlink()
    assert torch.equal(_outputs(timm_reduce.load_pretrained(real)), _outputs(new))


def test_the_working_directory_is_saved_in_place_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / 'out'
    timm_reduce.save_pretrained(reduced_example('grouped'), folder)
    monkeypatch.chdir(folder)
    new = reduced_example('shallow')
    with caplog.at_level(logging.WARNING):
        timm_reduce.save_pretrained(new, '.')
    assert 'file by file' in caplog.text and 'working directory' in caplog.text
    assert Path.cwd() == folder and torch.equal(_outputs(timm_reduce.load_pretrained(folder)), _outputs(new))


# ---- item 7: modes like open() ---------------------------------------------------------------------------------

@pytest.fixture
def umask() -> Callable[[int], None]:
    previous = os.umask(0o022)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saved_files_get_the_mode_open_gives(umask: Callable[[int], None], tmp_path: Path) -> None:
    model = reduced_example('grouped')
    folder = timm_reduce.save_pretrained(model, tmp_path / 'a' / 'model')
    assert {n: oct(_mode(folder / n)) for n in MANAGED} == {n: '0o644' for n in MANAGED}
    assert _mode(folder) == 0o755
    os.chmod(folder, 0o2750)  # a replaced folder keeps its own mode
    timm_reduce.save_pretrained(model, folder)
    assert _mode(folder) == 0o2750 and _mode(folder / 'model.safetensors') == 0o644
    umask(0o027)
    timm_reduce.save_pretrained(model, folder)
    assert {_mode(folder / n) for n in MANAGED} == {0o640}
    umask(0o022)
    from timm_reduce.persistence.export import export_model

    for fmt, name in (('onnx', 'model.onnx'), ('torchscript', 'model.torchscript.pt')):
        export_model(model, folder / name, fmt)
        assert _mode(folder / name) == 0o644, name


# ---- item 8: dtype kept -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize('spec', [None, 'thin:mlp_ratio=2', 'grouped:group_size=2'])
def test_every_dtype_round_trips_exactly(dtype: torch.dtype, spec: str | None, tmp_path: Path) -> None:
    model = tiny_vit()
    if spec:
        timm_reduce.reduce(model, spec)
    model.to(dtype)
    folder = timm_reduce.save_pretrained(model, tmp_path / 'out')
    config = json.loads((folder / 'config.json').read_text())
    assert config['timm_reduce']['dtype'] == str(dtype).removeprefix('torch.')
    loaders = [timm_reduce.load_pretrained]
    if config['architecture'] == 'timm_reduce':
        loaders.append(lambda f: timm.create_model(f'local-dir:{f}', pretrained=True))
    want = model.state_dict()
    for load in loaders:
        loaded = load(folder)
        got = loaded.state_dict()
        assert {t.dtype for t in loaded.parameters()} == {dtype}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        if dtype != torch.float16:  # float16 matmuls are not on every CPU
            assert torch.equal(_outputs(loaded, dtype), _outputs(model, dtype))


def test_push_of_a_bf16_model_passes_its_round_trip_check(fake_hub: FakeHub, tmp_path: Path) -> None:
    model = reduced_example('grouped').to(torch.bfloat16)
    timm_reduce.push_to_hub(model, 'me/tiny-bf16')
    folder = fake_hub.write_folder('me/tiny-bf16', tmp_path / 'pulled')
    loaded = timm_reduce.load_pretrained(folder)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert torch.equal(_outputs(loaded, torch.bfloat16), _outputs(model, torch.bfloat16))


@pytest.mark.parametrize('where, value', [('model_args', 'int8'), ('model_args', 'float8_e4m3fn'),
                                          ('model_args', 7), ('timm_reduce', 'complex64')])
def test_a_config_dtype_other_than_a_float_is_refused(where: str, value: Any, tmp_path: Path) -> None:
    model = reduced_example('grouped') if where == 'model_args' else tiny_vit()
    folder = timm_reduce.save_pretrained(model.to(torch.bfloat16), tmp_path / 'out')
    config = json.loads((folder / 'config.json').read_text())
    config[where]['dtype'] = value
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ReduceError, match='dtype .* allowed: float16, bfloat16, float32, float64'):
        timm_reduce.load_pretrained(folder)


def test_a_model_mixing_dtypes_warns_that_it_reloads_as_float32(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_vit().to(torch.bfloat16)
    model.head.float()
    with caplog.at_level(logging.WARNING):
        folder = timm_reduce.save_pretrained(model, tmp_path / 'out')
    assert 'bfloat16 and float32' in caplog.text and 'reload as float32' in caplog.text
    assert {p.dtype for p in timm_reduce.load_pretrained(folder).parameters()} == {torch.float32}


# ---- item 9: creation arguments JSON cannot hold ------------------------------------------------------------------

def _vit(**kwargs: Any) -> nn.Module:
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10, **kwargs)


@pytest.mark.parametrize('key, value', [('norm_layer', functools.partial(nn.LayerNorm, eps=1e-5)),
                                        ('act_layer', nn.GELU)], ids=['partial', 'class'])
def test_a_non_json_creation_argument_is_named_before_any_work(key: str, value: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = _vit(**{key: value})
    with pytest.raises(ReduceError, match=rf"created with {key}=.*config\.json cannot hold.*norm_layer='layernorm'"):
        check_saveable(model)

    def expensive(*args: Any, **kwargs: Any) -> None:
        raise AssertionError('save_pretrained did work before refusing the argument')

    for name in ('recipe_block', 'encode_state', 'plain_model_args'):
        monkeypatch.setattr(serialization, name, expensive)
    monkeypatch.setattr(timm_reduce.core.api, 'materialize', expensive)
    for dense in (False, True):
        with pytest.raises(ReduceError, match=f'created with {key}='):
            timm_reduce.save_pretrained(model, tmp_path / 'out', dense=dense)
    monkeypatch.undo()
    reduced = timm_reduce.reduce(model, 'grouped', group_size=2)  # the record keeps the argument too
    with pytest.raises(ReduceError, match=f'created with {key}='):
        check_saveable(reduced)
    assert not (tmp_path / 'out').exists()


# ---- item 11: push_folder refuses NaN/Inf before sending ------------------------------------------------------------

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')], ids=['nan', 'inf', '-inf'])
def test_push_folder_refuses_non_finite_weights_before_sending(bad: float, fake_hub: FakeHub, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    folder = timm_reduce.save_pretrained(reduced_example('grouped'), tmp_path / 'out')
    path = folder / 'model.safetensors'
    state = safetensors.torch.load_file(path)
    state['blocks.2.mlp.fc2.bias'][3] = bad
    safetensors.torch.save_file(state, path, metadata={'format': 'pt'})
    with pytest.raises(ReduceError, match=r'NaN or infinite values in blocks\.2\.mlp\.fc2\.bias \(1 of 32'):
        timm_reduce.persistence.hub.push_folder(folder, 'me/tiny')
    assert cli.main(['push', str(folder), 'me/tiny']) == 2
    assert 'blocks.2.mlp.fc2.bias' in capsys.readouterr().err
    assert fake_hub.calls == []


# ---- item 17: never write a folder the loader rejects --------------------------------------------------------------

def _with_custom_head(model: nn.Module) -> nn.Module:
    model.head = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 5))
    return model


@pytest.mark.parametrize('spec', [None, 'grouped:group_size=2', 'shallow:keep=0.5', 'thin:mlp_ratio=2'])
def test_a_replaced_head_is_refused_saying_what_differs(spec: str | None, tmp_path: Path) -> None:
    model = tiny_vit()
    if spec:
        timm_reduce.reduce(model, spec)
    _with_custom_head(model)
    pattern = r'(?s)would not load back.*head\.0\.weight \[16, 32\].*head\.weight \[5, 32\].*model\.head.*reset_classifier'
    with pytest.raises(ReduceError, match=pattern):
        timm_reduce.save_pretrained(model, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_dense_save_with_a_replaced_head_does_not_blame_mlp_widths(tmp_path: Path) -> None:
    model = _with_custom_head(reduced_example('grouped'))
    with pytest.raises(ReduceError, match='dense=True') as info:
        timm_reduce.save_pretrained(model, tmp_path / 'out', dense=True)
    assert 'per-block MLP widths' not in str(info.value) and 'model.head' in str(info.value)


def test_an_added_module_and_mlps_changed_after_reduction_are_refused(tmp_path: Path) -> None:
    model = tiny_vit()
    model.adapter = nn.Linear(32, 32)
    with pytest.raises(ReduceError, match=r'(?s)adapter\.weight \[32, 32\].*model\.adapter'):
        timm_reduce.save_pretrained(model, tmp_path / 'a')
    model = timm_reduce.reduce(tiny_vit(), 'shallow', keep=0.5)
    model.blocks[1].mlp.fc1 = nn.Linear(32, 8)
    model.blocks[1].mlp.fc2 = nn.Linear(8, 32)
    with pytest.raises(ReduceError, match=r'(?s)blocks\.1\.mlp\.fc1\.weight \[8, 32\] here, \[64, 32\] rebuilt.*'
                                          r'changed after timm_reduce recorded its recipe \(shallow'):
        timm_reduce.save_pretrained(model, tmp_path / 'b')
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- item 18: MLPs pruned by another library ----------------------------------------------------------------------

def _pruned(widths: list[int], seed: int = 0) -> nn.Module:
    """What a pruning library leaves: smaller nn.Linear layers in timm's Mlp, no timm_reduce record."""
    model = tiny_vit(seed)
    for block, width in zip(model.blocks, widths):
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        keep = torch.randperm(fc1.out_features, generator=torch.Generator().manual_seed(width))[:width]
        block.mlp.fc1 = nn.Linear(fc1.in_features, width)
        block.mlp.fc2 = nn.Linear(width, fc2.out_features)
        with torch.no_grad():
            block.mlp.fc1.weight.copy_(fc1.weight[keep])
            block.mlp.fc1.bias.copy_(fc1.bias[keep])
            block.mlp.fc2.weight.copy_(fc2.weight[:, keep])
            block.mlp.fc2.bias.copy_(fc2.bias)
    return model.eval()


@pytest.mark.parametrize('width', [48, 77, 100])
def test_uniformly_pruned_mlps_save_as_plain_timm_with_the_measured_ratio(width: int, tmp_path: Path) -> None:
    model = _pruned([width] * 4)
    folder = timm_reduce.save_pretrained(model, tmp_path / 'out')
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert int(32 * config['model_args']['mlp_ratio']) == width
    stock = timm.create_model(f'local-dir:{folder}', pretrained=True)  # timm's own plain loader
    assert torch.equal(_outputs(stock), _outputs(model))


def test_per_block_pruned_mlps_say_why_and_the_advice_works(tmp_path: Path) -> None:
    widths = [48, 64, 80, 96]
    model = _pruned(widths)
    shown = re.escape(str(widths))
    with pytest.raises(ReduceError, match=rf"(?s)widths {shown} differ per block.*'shallow', keep={shown}, "
                                          r"importance='first'"):
        timm_reduce.save_pretrained(model, tmp_path / 'out')
    reduced = timm_reduce.reduce(tiny_vit(), 'shallow', keep=widths, importance='first')
    reduced.load_state_dict(model.state_dict())
    folder = timm_reduce.save_pretrained(reduced, tmp_path / 'out')
    assert torch.equal(_outputs(timm_reduce.load_pretrained(folder)), _outputs(model))


def test_a_folder_the_system_will_not_move_is_saved_in_place_with_a_warning(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    folder = timm_reduce.save_pretrained(reduced_example('grouped'), tmp_path / 'out')
    (folder / 'notes.txt').write_text('mine')

    def refuse(a: Path, b: Path) -> bool:
        raise PermissionError(errno.EPERM, 'Operation not permitted', str(b))

    monkeypatch.setattr(files, '_exchange', refuse)
    new = reduced_example('shallow')
    with caplog.at_level(logging.WARNING):
        timm_reduce.save_pretrained(new, folder)
    assert 'cannot be moved' in caplog.text and 'file by file' in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out'] and (folder / 'notes.txt').read_text() == 'mine'
    assert torch.equal(_outputs(timm_reduce.load_pretrained(folder)), _outputs(new))
