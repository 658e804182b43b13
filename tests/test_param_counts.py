"""Closed-form parameter counts on full-size ViT-B/16 (built on the meta device: no memory, no init)."""
import pytest
import timm
import torch

import timm_reduce

D, H, DEPTH = 768, 3072, 12
MLP = (D * H + H) + (H * D + D)  # 4,722,432 per block
TOTAL = 86_567_656


def vit_b() -> torch.nn.Module:
    with torch.device('meta'):
        return timm.create_model('vit_base_patch16_224')


def test_original():
    info = timm_reduce.summary(vit_b(), macs=False)
    assert info['params'] == info['unique_params'] == TOTAL
    assert info['mlp_params'] == DEPTH * MLP == 56_669_184


def test_grouped_pairs():
    model = timm_reduce.reduce(vit_b(), 'grouped', group_size=2)
    info = timm_reduce.summary(model, macs=False)
    assert info['unique_params'] == TOTAL - 6 * MLP == 58_233_064
    assert info['params'] == TOTAL  # the forward pass still uses 12 MLPs
    assert info['mlp_params_before'] == DEPTH * MLP and info['params_before'] == TOTAL


@pytest.mark.parametrize('strategy, options', [('shallow', {'keep': 0.5}), ('thin', {'mlp_ratio': 2})])
def test_half_width(strategy, options):
    model = timm_reduce.reduce(vit_b(), strategy, **options)
    half = (D * H // 2 + H // 2) + (H // 2 * D + D)
    assert timm_reduce.summary(model, macs=False)['unique_params'] == TOTAL - DEPTH * (MLP - half) == 58_237_672


def test_grouped_short_last_group():
    model = timm_reduce.reduce(vit_b(), 'grouped', group_size=5)  # groups of 5, 5, 2
    assert timm_reduce.summary(model, macs=False)['unique_params'] == TOTAL - 9 * MLP
