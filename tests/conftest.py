"""Tiny timm models shared by the tests (built in milliseconds, no download)."""
from __future__ import annotations

import pytest
import timm
import torch

TINY = {
    'vit': ('vit_tiny_patch16_224',
            dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)),
    'deit_distilled': ('deit_tiny_distilled_patch16_224',
                       dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)),
    'swin': ('swin_tiny_patch4_window7_224',
             dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 3), num_heads=(2, 4),
                  num_classes=5)),
    'eva_glu': ('eva02_tiny_patch14_224',  # SwiGLU packed into one fc1: timm's GluMlp
                dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, num_classes=5)),
    'eva_swiglu': ('eva02_tiny_patch14_224',  # scale_mlp -> SwiGLU with fc1_g/fc1_x and a hidden-sized norm
                   dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                        scale_mlp=True)),
    'beit': ('beit_base_patch16_224',
             dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)),
}


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny eval-mode model of `family` with deterministic random weights."""
    name, kwargs = TINY[family]
    torch.manual_seed(seed)
    return timm.create_model(name, **{**kwargs, **overrides}).eval()


def tiny_input(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    from timm_reduce.summary import model_input_size

    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model_input_size(model), generator=g)


def perturb_blocks(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make the weights non-i.i.d.: hidden units get very different scales, as in trained models."""
    from timm_reduce import find_mlp_sites

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in find_mlp_sites(model):
            mlp = site.mlp
            h = mlp.fc2.in_features
            scale = torch.exp(2.0 * torch.randn(h, generator=g))
            mlp.fc2.weight.mul_(scale)
            for p in mlp.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test process: the tensors are tiny, and on a shared or oversubscribed 2-core machine
    (torchrun tests run 2 processes) thread barriers made a 10-step tiny-ViT loop take 9.7 s instead of 0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(TINY))
def family(request) -> str:
    return request.param
