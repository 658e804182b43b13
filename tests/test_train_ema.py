"""SharedEma: one EMA update per tensor and step, also for tensors shared between blocks."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

import timm_reduce
from timm_reduce.core.sharing import alias_map
from timm_reduce.training import SharedEma
from train_utils import MODEL_KWARGS


def _grouped_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm_reduce.reduce(timm.create_model('vit_tiny_patch16_224', **MODEL_KWARGS), 'grouped:group_size=2')


@pytest.mark.parametrize('exclude_buffers', [False, True])
def test_ema_updates_each_shared_tensor_once_per_step(exclude_buffers):
    model = _grouped_model()
    assert alias_map(model.state_dict())  # blocks 0/1 and 2/3 share their MLP tensors
    decay = 0.5
    ema = SharedEma(model, decay=decay, exclude_buffers=exclude_buffers)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():  # shared tensors are listed once here
            p.add_(torch.randn_like(p))
    ema.update(model)
    after = ema.module.state_dict()
    now = model.state_dict()
    for key in after:  # hand computation: ema <- decay * ema + (1 - decay) * model, once
        torch.testing.assert_close(after[key], decay * before[key] + (1 - decay) * now[key], msg=key)
    assert alias_map(after) == alias_map(now)  # the EMA copy still shares like the model


def test_plain_model_ema_v3_would_update_shared_tensors_twice():
    """The reference the fix is needed against: ModelEmaV3 lerps a shared tensor once per alias."""
    model = _grouped_model()
    ema = ModelEmaV3(model, decay=0.5)
    shared_key = 'blocks.0.mlp.fc1.weight'
    assert alias_map(model.state_dict())['blocks.1.mlp.fc1.weight'] == shared_key
    before = ema.module.state_dict()[shared_key].clone()
    with torch.no_grad():
        model.get_parameter(shared_key).add_(1.0)
    ema.update(model)
    target = model.state_dict()[shared_key]
    twice = 0.25 * before + 0.75 * target
    torch.testing.assert_close(ema.module.state_dict()[shared_key], twice)


def test_ema_refuses_a_model_reduced_after_it_was_created():
    model = timm.create_model('vit_tiny_patch16_224', **MODEL_KWARGS)
    ema = SharedEma(model, decay=0.9)
    timm_reduce.reduce(model, 'grouped')
    with pytest.raises(RuntimeError, match='create the EMA after the reduction'):
        ema.update(model)
