import pytest
import timm

import timm_reduce
from timm_reduce import UnsupportedModelError, find_mlp_sites
from timm_reduce.core.discovery import mlp_kind, resolve_groups
from timm_reduce.errors import ReduceError

from conftest import TINY, tiny


EXPECTED = {  # family -> (number of blocks, MLP kind, stages)
    'vit': (4, 'mlp', ['blocks']),
    'deit_distilled': (3, 'mlp', ['blocks']),
    'swin': (5, 'mlp', ['layers.0.blocks', 'layers.1.blocks']),
    'eva_glu': (3, 'glu', ['blocks']),
    'eva_swiglu': (3, 'swiglu', ['blocks']),
    'beit': (3, 'mlp', ['blocks']),
}


def test_every_family_is_discovered(family):
    model = tiny(family)
    sites = find_mlp_sites(model)
    n, kind, stages = EXPECTED[family]
    assert len(sites) == n
    assert {mlp_kind(s.mlp) for s in sites} == {kind}
    assert sorted({s.stage for s in sites}) == stages
    assert [s.index for s in sites] == list(range(n))
    assert all(model.get_submodule(s.path) is s.block for s in sites)


def test_depth_is_read_not_assumed():
    name, kwargs = TINY['vit']
    for depth in (1, 7):
        assert len(find_mlp_sites(timm.create_model(name, **{**kwargs, 'depth': depth}))) == depth


def test_cnn_is_unsupported_with_class_name():
    with pytest.raises(UnsupportedModelError, match='ResNet'):
        timm_reduce.reduce(timm.create_model('resnet18', num_classes=3), 'grouped')


def test_fused_mlp_is_unsupported():
    from timm.models.vision_transformer import ParallelScalingBlock

    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, block_fn=ParallelScalingBlock)
    with pytest.raises(UnsupportedModelError, match='VisionTransformer.*fuse'):
        find_mlp_sites(model)


def test_groups_stay_inside_stages():
    sites = find_mlp_sites(tiny('swin'))  # stages of 2 and 3 blocks
    assert resolve_groups(sites, 2) == [[0, 1], [2, 3], [4]]
    assert resolve_groups(sites, 2, within_stage=False) == [[0, 1], [2, 3], [4]]
    assert resolve_groups(sites, 3) == [[0, 1], [2, 3, 4]]
    assert resolve_groups(sites, 3, within_stage=False) == [[0, 1, 2], [3, 4]]


@pytest.mark.parametrize('groups, fragment', [
    ([[0, 1], [2]], 'do not cover blocks [3]'),
    ([[0, 1], [1, 2, 3]], 'more than once'),
    ([[0, 1, 2, 3, 9]], 'do not exist'),
    ([[0, 1, 2, 3], []], 'empty'),
])
def test_bad_explicit_groups(groups, fragment):
    sites = find_mlp_sites(tiny('vit'))
    with pytest.raises(ReduceError, match=fragment.replace('[', r'\[').replace(']', r'\]')):
        resolve_groups(sites, groups=groups)


def test_grouped_across_swin_stages_refuses_mismatched_shapes():
    with pytest.raises(ReduceError, match='different types or shapes'):
        timm_reduce.reduce(tiny('swin'), 'grouped', group_size=3, within_stage=False)
