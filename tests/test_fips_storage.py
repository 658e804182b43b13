"""FiPS storage: packed bitmask + values, file size vs budget, exact round trips through timm, summary rows."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_reduce
from timm_reduce.strategies.fips import fips_layers, pack_bits, unpack_bits

from fips_utils import images, tiny_swin, tiny_vit


def _tensor_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in safetensors.torch.load_file(str(path)).values())


@pytest.mark.parametrize('numel', [1, 7, 8, 9, 1000])
def test_pack_bits_round_trip(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(numel / 8)
    assert torch.equal(unpack_bits(bits, mask.shape), mask)


def test_pack_bits_layout():
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]


@pytest.mark.parametrize('make,scaling', [(tiny_vit, False), (tiny_swin, False), (tiny_vit, True)],
                         ids=['vit', 'swin', 'vit-scaling-vectors'])
def test_exact_round_trip_through_timm(make, scaling, tmp_path):
    model = make()
    timm_reduce.reduce(model, 'fips', budget=0.25, sparsity=0.75, group_size=2, scaling_vectors=scaling)
    hooks = timm_reduce.get_strategy('fips').calibration_hooks(model, model._timm_reduce_record.recipe[-1].config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hooks.setup(model, opt, 2)
    x = images(model)
    for step in range(2):  # move the weights and masks away from what reduce() gives on a fresh model
        opt.zero_grad()
        model(x).square().mean().backward()
        hooks.after_backward(step)
        opt.step()
        hooks.after_step(step)
    model.eval()
    timm_reduce.save_pretrained(model, tmp_path)
    stored = safetensors.torch.load_file(str(tmp_path / 'model.safetensors'))
    assert not any(k.endswith('.factor') or k.endswith('.mask') for k in stored)
    assert sum(k.endswith('basis.weight') for k in stored) == len({id(m.basis) for m in fips_layers(model).values()})
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (name, a), b in zip(fips_layers(model).items(), fips_layers(loaded).values()):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.factor, b.factor), name
        assert (a.scale is None) == (not scaling) and (a.scale is None or torch.equal(a.scale, b.scale))
    first = next(iter(fips_layers(loaded)))  # the loaded model still shares the basis inside the block
    assert fips_layers(loaded)[first].basis is fips_layers(loaded)[first.replace('fc1', 'fc2')].basis
    assert len(timm_reduce.unique_parameters(loaded)) == len(timm_reduce.unique_parameters(model))
    assert timm_reduce.summary(loaded, macs=False)['bytes'] == timm_reduce.summary(model, macs=False)['bytes']


def _mlp_file_bytes(model, tmp_path: Path) -> tuple[int, int]:
    """(bytes of the MLP weight tensors in the saved file, their bytes stored densely in fp32)."""
    timm_reduce.save_pretrained(model, tmp_path)
    stored = safetensors.torch.load_file(str(tmp_path / 'model.safetensors'))
    mlp = {k: v for k, v in stored.items() if '.mlp.' in k and not k.endswith('.bias')}
    return sum(v.numel() * v.element_size() for v in mlp.values()), 4 * 4 * 2 * 32 * 128


@pytest.mark.parametrize('budget', [0.1, 0.25, 0.5])
def test_compact_file_matches_budget(budget, tmp_path):
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=budget, sparsity=0.75, sparsifier='static', group_size=2)
    compact, dense = _mlp_file_bytes(model, tmp_path)
    layers = fips_layers(model).values()
    rank = next(iter(layers)).rank
    values = sum(m.active for m in layers)
    expected = 4 * (2 * 32 * rank + values) + sum(math.ceil(m.mask.numel() / 8) for m in layers)
    assert compact == expected
    # the stored params fit the budget; the file is budget x dense fp32 plus 1 bit per factor entry (8 factors)
    assert values + 2 * 32 * rank <= budget * 4 * 2 * 32 * 128
    assert compact / dense == pytest.approx(budget + 8 * rank * 128 / 8 / dense, abs=0.02)


def test_file_shrinks_with_budget_and_bf16(tmp_path):
    sizes = []
    for budget in (0.1, 0.25, 0.5):
        model = tiny_vit()
        timm_reduce.reduce(model, 'fips', budget=budget, sparsifier='static', group_size=2)
        sizes.append(_mlp_file_bytes(model, tmp_path / str(budget))[0])
    assert sizes[0] < sizes[1] < sizes[2]
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=0.25, sparsifier='static', group_size=2, storage_dtype='bfloat16')
    half, _ = _mlp_file_bytes(model, tmp_path / 'bf16')
    assert half < sizes[1]
    loaded = timm.create_model(f'local-dir:{tmp_path / "bf16"}', pretrained=True)
    for a, b in zip(fips_layers(model).values(), fips_layers(loaded).values()):
        assert torch.equal(b.factor, a.factor.detach().to(torch.bfloat16).float())


def test_dense_factors_store_no_bitmask(tmp_path):
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=0.25, sparsifier='dense', group_size=2)
    timm_reduce.save_pretrained(model, tmp_path)
    keys = safetensors.torch.load_file(str(tmp_path / 'model.safetensors')).keys()
    assert not any(k.endswith('factor.bits') for k in keys)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()(x), model(x))


def test_summary_reports_ranks_sparsity_and_bytes():
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=0.25, sparsifier='static', group_size=2)
    info = timm_reduce.summary(model, macs=False)
    rows = {r['path']: r for r in info['layers']}
    bases = [r for r in rows.values() if r['kind'] == 'fips_basis']
    factors = [r for r in rows.values() if r['kind'] == 'fips_factor']
    assert len(bases) == 2 and len(factors) == 8
    assert bases[0]['group'] == ['blocks.0', 'blocks.1'] and bases[0]['rank'] == factors[0]['rank']
    stored = sum(r['stored_params'] for r in rows.values())
    assert stored <= 0.25 * 8 * 32 * 128
    assert sum(r['sparsity'] * 32 * 128 for r in factors) / 8 / (32 * 128) > 0.7
    text = timm_reduce.format_summary(info)
    assert 'fips_basis' in text and 'sparsity' in text


def test_corrupt_file_is_refused(tmp_path):
    model = tiny_vit()
    timm_reduce.reduce(model, 'fips', budget=0.25, sparsifier='static', group_size=2)
    timm_reduce.save_pretrained(model, tmp_path)
    path = tmp_path / 'model.safetensors'
    state = safetensors.torch.load_file(str(path))
    state['blocks.0.mlp.fc1.factor.values'] = state['blocks.0.mlp.fc1.factor.values'][:-1]
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(timm_reduce.ReduceError, match='corrupt'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True)


def test_plain_training_loop_cannot_leave_the_compact_form(tmp_path):
    """An optimizer without the sparsity hooks (a user's own loop) updates masked entries, but they never reach
    the output: the saved compact form (unmasked values only) reproduces the trained model exactly."""
    model = timm_reduce.reduce(tiny_vit(), 'fips', budget=0.5, group_size=2, sparsifier='static', sparsity=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = images(model, 4)
    for _ in range(3):
        opt.zero_grad()
        model.train()(x).square().mean().backward()
        opt.step()
    layers = fips_layers(model).values()
    assert any(float(layer.factor.detach()[~layer.mask].abs().sum()) > 0 for layer in layers)  # entries moved
    timm_reduce.save_pretrained(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
