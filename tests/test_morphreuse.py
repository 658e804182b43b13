"""MorphReuse: shape-keyed sharing with per-layer scales, and the shared-core variant."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import timm_reduce
from timm_reduce import ReduceError, materialize, reduce, save_pretrained, summary
from timm_reduce.core.api import mlp_unique_params
from timm_reduce.strategies.morphreuse.layers import MorphCoreMlp, MorphLinear, SharedCore, SharedLinear
from timm_reduce.core.sharing import count_unique
from timm_reduce.strategies.morphreuse.strategy import lstsq_scale

# ViT-B/16 (algorithms.md): d = 768, h = 3072, 12 blocks; everything outside the MLPs.
VIT_B_NON_MLP = 86_567_656 - 56_669_184


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                             num_classes=5)


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('swin_tiny_patch4_window7_224', img_size=32, patch_size=2, window_size=4, embed_dim=16,
                             depths=(2, 2), num_heads=(2, 4), num_classes=5)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def morph_linears(model: nn.Module) -> dict[str, MorphLinear]:
    """Every MorphLinear by block path + role, including users that only reference their bank."""
    return {f'{s.path}.{name}': getattr(s.mlp, name) for s in timm_reduce.find_mlp_sites(model)
            for name in ('fc1', 'fc2') if isinstance(getattr(s.mlp, name), MorphLinear)}


def perturb_(model: nn.Module, seed: int = 3) -> None:
    """Move every parameter away from its init, so a failed load cannot pass by coincidence."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------- closed-form parameter counts


def vit_b_meta() -> nn.Module:
    with torch.device('meta'):
        return timm.create_model('vit_base_patch16_224')


@pytest.mark.parametrize('options, expected', [
    # shared fc1 (h·d + h) + shared fc2 (d·h + d) + one scalar per layer (2 per block)
    ({}, VIT_B_NON_MLP + (3072 * 768 + 3072) + (768 * 3072 + 768) + 12 * 2),
    # per-channel: fc1 scale has h entries, fc2 scale d entries, per block
    ({'scale': 'channel'}, VIT_B_NON_MLP + (3072 * 768 + 3072) + (768 * 3072 + 768) + 12 * (3072 + 768)),
    # groups of 4 blocks: 3 banks each
    ({'scope': 'group', 'group_size': 4}, VIT_B_NON_MLP + 3 * ((3072 * 768 + 3072) + (768 * 3072 + 768)) + 12 * 2),
    # core c = 128, core hidden k = 320: per block 2·d·c projections;
    # one core: 2·c·k (W1, W2) + k (b1) + 2k (LN) + c (b2) + 1 (s)
    ({'variant': 'core'}, VIT_B_NON_MLP + 12 * 2 * 768 * 128 + (2 * 128 * 320 + 320 + 2 * 320 + 128 + 1)),
])
def test_vit_b_closed_form_counts(options: dict, expected: int) -> None:
    model = reduce(vit_b_meta(), 'morphreuse', **options)
    assert count_unique(model) == expected
    assert mlp_unique_params(model) == expected - VIT_B_NON_MLP


def test_vit_b_counts_literal() -> None:
    """The numbers quoted in the docs: 34,620,928 (scalar), 34,666,984 (channel), 32,340,777 (core)."""
    assert count_unique(reduce(vit_b_meta(), 'morphreuse')) == 34_620_928
    assert count_unique(reduce(vit_b_meta(), 'morphreuse', scale='channel')) == 34_666_984
    assert count_unique(reduce(vit_b_meta(), 'morphreuse', variant='core')) == 32_340_777


def test_swin_banks_keyed_by_shape() -> None:
    model = tiny_swin()
    dense_total, dense_mlp = count_unique(model), mlp_unique_params(model)
    reduce(model, 'morphreuse')
    layers = morph_linears(model)
    banks = {id(m.bank) for m in layers.values()}
    assert len(banks) == 4  # fc1 and fc2 of each of the two stage widths (16 and 32)
    for role in ('fc1', 'fc2'):
        for stage in (0, 1):
            same = {id(layers[f'layers.{stage}.blocks.{b}.{role}'].bank) for b in (0, 1)}
            assert len(same) == 1
    bank_params = sum(d * 4 * d + 4 * d + 4 * d * d + d for d in (16, 32))
    assert count_unique(model) == dense_total - dense_mlp + bank_params + 8  # 4 blocks x 2 scalar scales


# ---------------------------------------------------------------- sharing


@pytest.mark.parametrize('scale', ['scalar', 'channel'])
def test_one_storage_and_gradients_accumulate(scale: str) -> None:
    model = reduce(tiny_vit(), 'morphreuse', scale=scale)
    perturb_(model)
    layers = morph_linears(model)
    for role in ('fc1', 'fc2'):
        group = [m for k, m in layers.items() if k.endswith(role)]
        assert len({m.bank.weight.untyped_storage().data_ptr() for m in group}) == 1
        assert sum(m.is_owner for m in group) == 1
        assert len([k for k in model.state_dict() if k.endswith(f'{role}.shared.weight')]) == 1
    # reference: the materialised model has one independent Linear per layer with W_l = a_l ⊙ W
    dense = materialize(model)
    x = images()
    model(x).square().sum().backward()
    dense(x).square().sum().backward()
    sites = timm_reduce.find_mlp_sites(dense)
    for role in ('fc1', 'fc2'):
        group = [(layers[f'{s.path}.{role}'], getattr(s.mlp, role)) for s in sites]
        bank = group[0][0].bank
        a = [m.scale.detach() if scale == 'scalar' else m.scale.detach()[:, None] for m, _ in group]
        grad_w = sum(a_l * lin.weight.grad for a_l, (_, lin) in zip(a, group))
        grad_b = sum(m.scale.detach() * lin.bias.grad for m, lin in group)
        torch.testing.assert_close(bank.weight.grad, grad_w)
        torch.testing.assert_close(bank.bias.grad, grad_b)
        for m, lin in group:  # dL/da = Σ over the layer's rows of <G, W> + g·b
            terms = lin.weight.grad * bank.weight.detach()
            per_row = terms.sum(1) + lin.bias.grad * bank.bias.detach()
            torch.testing.assert_close(m.scale.grad, per_row.sum() if scale == 'scalar' else per_row)


def test_core_gradients_accumulate() -> None:
    model = reduce(tiny_vit(), 'morphreuse', variant='core', core_dim=16)
    perturb_(model)
    untied = copy.deepcopy(model)
    cores = []
    for site in timm_reduce.find_mlp_sites(untied):  # reference: every block gets its own copy of the core
        core = copy.deepcopy(site.mlp.core)
        site.mlp.__dict__['_shared_ref'] = core
        site.mlp.__dict__['_modules']['shared'] = core
        cores.append(core)
    assert count_unique(untied) > count_unique(model)
    x = images()
    out, out_untied = model(x), untied(x)
    torch.testing.assert_close(out, out_untied, rtol=0, atol=0)
    out.square().sum().backward()
    out_untied.square().sum().backward()
    core = timm_reduce.find_mlp_sites(model)[0].mlp.core
    for name, p in core.named_parameters():
        torch.testing.assert_close(p.grad, sum(c.get_parameter(name).grad for c in cores))


def test_two_models_are_independent() -> None:
    a, b = reduce(tiny_vit(0), 'morphreuse'), reduce(tiny_vit(0), 'morphreuse')
    ids_a = {p.untyped_storage().data_ptr() for p in a.parameters()}
    ids_b = {p.untyped_storage().data_ptr() for p in b.parameters()}
    assert not ids_a & ids_b
    x = images()
    before = b(x)
    with torch.no_grad():
        next(iter(morph_linears(a).values())).bank.weight.add_(1.0)
    torch.testing.assert_close(b(x), before, rtol=0, atol=0)
    assert not torch.equal(a(x), before)
    assert count_unique(a) == count_unique(b)


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
@pytest.mark.parametrize('variant', ['shape', 'core'])
def test_copies_keep_sharing(how: str, variant: str) -> None:
    model = reduce(tiny_vit(), 'morphreuse', variant=variant, **({'core_dim': 16} if variant == 'core' else {}))
    clone = copy.deepcopy(model) if how == 'deepcopy' else pickle.loads(pickle.dumps(model))

    def users(m: nn.Module) -> list:
        return [s.mlp.fc1 if variant == 'shape' else s.mlp for s in timm_reduce.find_mlp_sites(m)]

    shared_clone = {id(u.shared_module) for u in users(clone)}
    assert len(shared_clone) == 1 and not shared_clone & {id(u.shared_module) for u in users(model)}
    assert count_unique(clone) == count_unique(model)
    x = images()
    before = model(x)
    torch.testing.assert_close(clone(x), before, rtol=0, atol=0)
    last, tokens = users(clone)[-1], torch.randn(3, 32)
    last_before = last(tokens)
    with torch.no_grad():  # a change made through the owner reaches the last user of the clone, not the original
        for p in users(clone)[0].shared_module.parameters():
            p.add_(0.5)
    assert not torch.equal(last(tokens), last_before)
    assert not torch.equal(clone(x), before)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_sharing_survives_assign_load_and_dtype_moves() -> None:
    model = reduce(tiny_vit(), 'morphreuse')
    source = reduce(tiny_vit(7), 'morphreuse')
    model.load_state_dict(source.state_dict(), assign=True)  # replaces the Parameter objects of the owner's bank
    assert model.blocks[3].mlp.fc2.bank.weight is model.blocks[0].mlp.fc2.bank.weight
    x = images()
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    model.double()
    assert model.blocks[2].mlp.fc1.bank.weight.dtype == torch.float64
    assert model(x.double()).dtype == torch.float64


def test_ema_lerps_shared_tensor_once() -> None:
    from timm.utils import ModelEmaV3

    model = reduce(tiny_vit(), 'morphreuse')
    ema = ModelEmaV3(model, decay=0.5)
    bank = model.blocks[0].mlp.fc1.bank
    start = bank.weight.detach().clone()
    with torch.no_grad():
        bank.weight.add_(1.0)
    ema.update(model)
    ema_bank = ema.module.blocks[0].mlp.fc1.bank
    torch.testing.assert_close(ema_bank.weight, start + 0.5)  # lerped once, not once per user (4 blocks)
    assert ema.module.blocks[3].mlp.fc1.bank is ema_bank and ema_bank is not bank


def test_standard_optimizer_trains_everything_and_keeps_sharing() -> None:
    model = reduce(tiny_vit(), 'morphreuse', scale='channel')
    layers = morph_linears(model)
    before = {k: (m.bank.weight.detach().clone(), m.scale.detach().clone()) for k, m in layers.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(images()).square().sum().backward()
    opt.step()
    for k, m in layers.items():
        assert not torch.equal(m.bank.weight, before[k][0]) and not torch.equal(m.scale, before[k][1])
    assert len({id(m.bank) for k, m in layers.items() if k.endswith('fc1')}) == 1


# ---------------------------------------------------------------- initialisation from a pretrained model


def distinct_layers_vit() -> nn.Module:
    """A tiny ViT whose MLP layers differ in magnitude per block (like trained layers, unlike an i.i.d. init)."""
    model = tiny_vit()
    with torch.no_grad():
        for site in timm_reduce.find_mlp_sites(model):
            for layer in (site.mlp.fc1, site.mlp.fc2):
                layer.weight.mul_(0.5 + site.index)
                layer.bias.normal_(std=0.1 * (1 + site.index))
    return model


def test_shared_init_is_mean_and_scale_is_least_squares() -> None:
    model = distinct_layers_vit()
    originals = {f'{s.path}.{r}': copy.deepcopy(getattr(s.mlp, r)) for s in timm_reduce.find_mlp_sites(model)
                 for r in ('fc1', 'fc2')}
    reduce(model, 'morphreuse', scale='scalar')
    layers = morph_linears(model)
    for role in ('fc1', 'fc2'):
        group = {k: v for k, v in originals.items() if k.endswith(role)}
        bank = layers[next(iter(group))].bank
        torch.testing.assert_close(bank.weight, torch.stack([g.weight for g in group.values()]).mean(0))
        torch.testing.assert_close(bank.bias, torch.stack([g.bias for g in group.values()]).mean(0))
        shared = torch.cat([bank.weight, bank.bias[:, None]], 1).double().reshape(-1, 1)
        for k, orig in group.items():  # independent reference: a least-squares solver on [W | b]
            target = torch.cat([orig.weight, orig.bias[:, None]], 1).double().reshape(-1, 1)
            expected = torch.linalg.lstsq(shared, target).solution.squeeze()
            torch.testing.assert_close(layers[k].scale.double(), expected, rtol=1e-5, atol=0)


def test_lstsq_scale_per_channel_matches_solver() -> None:
    g = torch.Generator().manual_seed(0)
    shared, target = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    shared[2] = 0  # an all-zero shared row keeps scale 1
    got = lstsq_scale(target, shared, per_row=True)
    for i in range(6):
        if i == 2:
            assert got[i] == 1
            continue
        expected = torch.linalg.lstsq(shared[i].double()[:, None], target[i].double()[:, None]).solution.squeeze()
        torch.testing.assert_close(got[i], expected)


@pytest.mark.parametrize('scale', ['scalar', 'channel'])
def test_lstsq_scale_init_beats_ones(scale: str) -> None:
    base = distinct_layers_vit()
    originals = {f'{s.path}.{r}': copy.deepcopy(getattr(s.mlp, r)) for s in timm_reduce.find_mlp_sites(base)
                 for r in ('fc1', 'fc2')}

    def error(model: nn.Module) -> float:
        total = 0.0
        for k, m in morph_linears(model).items():
            w, b = m.effective_weight(), m.effective_bias()
            total += ((w - originals[k].weight).square().sum() + (b - originals[k].bias).square().sum()).item()
        return total

    fitted = error(reduce(copy.deepcopy(base), 'morphreuse', scale=scale))
    ones = error(reduce(copy.deepcopy(base), 'morphreuse', scale=scale, scale_init='ones'))
    assert fitted < 0.9 * ones


def test_init_first_with_ones_is_the_first_layer() -> None:
    model = tiny_vit()
    first = copy.deepcopy(model.blocks[0].mlp.fc1)
    reduce(model, 'morphreuse', init='first', scale_init='ones')
    for block in model.blocks:
        torch.testing.assert_close(block.mlp.fc1.effective_weight(), first.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- round trips, materialize, summary


ROUND_TRIPS = [
    (tiny_vit, {}),
    (tiny_vit, {'scale': 'channel', 'scope': 'group', 'group_size': 3}),
    (tiny_vit, {'variant': 'core', 'core_dim': 16, 'expand': 2.0, 'train': 'adapters'}),
    (tiny_swin, {'scale': 'channel'}),
    (tiny_swin, {'variant': 'core', 'core_dim': 8}),
]


@pytest.mark.parametrize('make, options', ROUND_TRIPS)
def test_save_load_round_trip_exact(make, options: dict, tmp_path) -> None:
    model = reduce(make(), 'morphreuse', **options)
    perturb_(model)
    model.eval()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'timm_reduce'
    stored = safetensors.torch.load_file(str(tmp_path / 'model.safetensors'))
    assert sum(t.numel() for t in stored.values()) == count_unique(model)  # every shared tensor stored once
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert count_unique(loaded) == count_unique(model)
    users = [s.mlp.fc1 if isinstance(s.mlp.fc1, MorphLinear) else s.mlp for s in timm_reduce.find_mlp_sites(loaded)]
    assert len({id(u.shared_module) for u in users}) == len({id(u.shared_module) for u in (
        s.mlp.fc1 if isinstance(s.mlp.fc1, MorphLinear) else s.mlp for s in timm_reduce.find_mlp_sites(model))})
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == grads


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
def test_materialize_exact(make, tmp_path) -> None:
    model = reduce(make(), 'morphreuse', scale='channel')
    perturb_(model)
    model.eval()
    dense = materialize(model).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=0, atol=0)
    assert not any(isinstance(m, (MorphLinear, SharedLinear)) for m in dense.modules())
    for site in timm_reduce.find_mlp_sites(dense):
        assert type(site.mlp).__name__ == 'Mlp' and type(site.mlp.fc1) is nn.Linear and type(site.mlp.fc2) is nn.Linear
    assert count_unique(dense) == sum(p.numel() for _, p in dense.named_parameters(remove_duplicate=False))
    assert count_unique(dense) == count_unique(make())  # the dense size of the base
    assert any(isinstance(m, MorphLinear) for m in model.modules())  # the source is untouched
    save_pretrained(model, tmp_path, dense=True)
    assert json.loads((tmp_path / 'config.json').read_text())['architecture'] != 'timm_reduce'  # plain timm
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('layer, banks, expected_mlp', [
    # SwiGLU: fc1_g and fc1_x (d -> h) get a bank each, fc2 (h -> d) one; channel scales h + h + d per block
    ('SwiGLU', 3, 2 * (128 * 32 + 128) + (32 * 128 + 32) + 4 * (128 + 128 + 32)),
    # GluMlp: packed fc1 (d -> 2·(h/2)) is one bank, fc2 takes h/2 = 64 inputs; scales 128 + 32 per block
    ('GluMlp', 2, (128 * 32 + 128) + (32 * 64 + 32) + 4 * (128 + 32)),
])
def test_gated_mlps(layer: str, banks: int, expected_mlp: int) -> None:
    import timm.layers

    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                              num_classes=5, mlp_layer=getattr(timm.layers, layer))
    non_mlp = count_unique(model) - mlp_unique_params(model)
    reduce(model, 'morphreuse', scale='channel')
    users = [m for m in model.modules() if isinstance(m, MorphLinear)]
    assert len(users) == 4 * banks and len({id(m.bank) for m in users}) == banks
    assert mlp_unique_params(model) == expected_mlp and count_unique(model) == non_mlp + expected_mlp
    perturb_(model)
    x = images()
    torch.testing.assert_close(materialize(model)(x), model(x), rtol=0, atol=0)


def test_materialize_core_variant_is_refused() -> None:
    model = reduce(tiny_vit(), 'morphreuse', variant='core', core_dim=8)
    with pytest.raises(ReduceError, match="'core' variant has no plain-timm form"):
        materialize(model)


def test_summary_counts_unique_params() -> None:
    model = tiny_vit()
    dense_total, dense_mlp = count_unique(model), mlp_unique_params(model)
    reduce(model, 'morphreuse', scale='channel')
    info = summary(model, macs=False)
    d, h, blocks = 32, 128, 4
    expected_mlp = (h * d + h) + (d * h + d) + blocks * (h + d)
    assert info['mlp_params'] == expected_mlp
    assert info['unique_params'] == dense_total - dense_mlp + expected_mlp
    assert info['bytes'] == 4 * info['unique_params']
    assert info['mlp_params_before'] == dense_mlp


# ---------------------------------------------------------------- options


def test_train_option_sets_requires_grad() -> None:
    m = reduce(tiny_vit(), 'morphreuse', train='scales')
    assert all(m.scale.requires_grad and not m.bank.weight.requires_grad for m in morph_linears(m).values())
    m = reduce(tiny_vit(), 'morphreuse', train='shared')
    assert all(not m.scale.requires_grad and m.bank.bias.requires_grad for m in morph_linears(m).values())
    m = reduce(tiny_vit(), 'morphreuse', variant='core', core_dim=8, train='core')
    assert all(not b.mlp.fc1.weight.requires_grad and b.mlp.core.alpha.requires_grad for b in m.blocks)
    assert m.blocks[0].attn.qkv.weight.requires_grad  # only MorphReuse parameters are touched


def test_core_defaults_and_gate() -> None:
    model = reduce(tiny_vit(), 'morphreuse', variant='core')
    core = model.blocks[0].mlp.core
    assert isinstance(core, SharedCore) and (core.dim, core.hidden) == (128, 320)
    torch.testing.assert_close(core.gate(), 2 * torch.sigmoid(torch.tensor(-3.0)))
    assert all(isinstance(b.mlp, MorphCoreMlp) and b.mlp.core is core for b in model.blocks)
    assert model.blocks[1].mlp.fc1.bias is None and model.blocks[1].mlp.fc2.weight.shape == (32, 128)
    z = torch.randn(3, 128)
    with torch.no_grad():  # hand computation of the core formula
        inner = core.fc2(nn.functional.gelu(nn.functional.layer_norm(core.fc1(z), (320,), core.norm.weight,
                                                                      core.norm.bias)))
        torch.testing.assert_close(core(z), z + 2 * torch.sigmoid(core.alpha) * inner)


def test_spec_text_and_grouped_then_morphreuse() -> None:
    model = reduce(tiny_vit(), 'morphreuse:scope=group,group_size=2,scale=channel')
    assert len({id(m.bank) for m in morph_linears(model).values()}) == 4  # 2 groups x fc1/fc2
    model = reduce(reduce(tiny_vit(), 'grouped', group_size=2), 'morphreuse')
    assert model.blocks[0].mlp is model.blocks[1].mlp and len(morph_linears(model)) == 8
    assert count_unique(model) == count_unique(tiny_vit()) - mlp_unique_params(tiny_vit()) + (
        (128 * 32 + 128) + (32 * 128 + 32) + 2 * 2)  # 2 unique MLPs, 2 scalars each


@pytest.fixture(scope='module')
def shared_vit() -> nn.Module:
    return tiny_vit()


@pytest.mark.parametrize('options, message', [
    ({'variant': 'lora'}, "variant='lora'"),
    ({'scale': 'vector'}, "scale='vector' is not allowed; choose one of 'scalar', 'channel'"),
    ({'scope': 'group'}, "scope='group' needs group_size"),
    ({'scope': 'group', 'group_size': 0}, 'group_size must be an integer >= 1'),
    ({'group_size': 2}, "group_size only apply with scope='group'"),
    ({'core_dim': 64}, "core_dim do not apply to variant='shape'"),
    ({'variant': 'core', 'scale': 'channel'}, "scale do not apply to variant='core'"),
    ({'variant': 'core', 'scale_init': 'ones', 'init': 'mean'}, "init, scale_init do not apply to variant='core'"),
    ({'train': 'core'}, "train='core' is not allowed for variant='shape'; choose one of 'all', 'scales', 'shared'"),
    ({'variant': 'core', 'train': 'scales'}, "train='scales' is not allowed for variant='core'"),
    ({'variant': 'core', 'core_dim': 0}, 'core_dim must be an integer >= 1'),
    ({'variant': 'core', 'expand': 0}, 'expand must be a number > 0'),
    ({'variant': 'core', 'alpha_init': float('nan')}, 'alpha_init must be a finite number'),
    ({'init': 'zeros'}, "init='zeros' is not allowed"),
    ({'ranks': 4}, "Unknown option(s) ranks for strategy 'morphreuse'"),
])
def test_bad_options(options: dict, message: str, shared_vit: nn.Module) -> None:
    with pytest.raises(ReduceError) as info:
        reduce(shared_vit, 'morphreuse', **options)
    assert message in str(info.value)
    assert not any(isinstance(m, MorphLinear) for m in shared_vit.modules())  # refused before any change


def test_reduce_twice_is_refused() -> None:
    model = reduce(tiny_vit(), 'morphreuse')
    with pytest.raises(ReduceError, match='already reduced by morphreuse'):
        reduce(model, 'morphreuse')
    model = reduce(tiny_vit(), 'morphreuse', variant='core', core_dim=8)
    with pytest.raises(ReduceError, match='already reduced by morphreuse'):
        reduce(model, 'morphreuse', variant='core', core_dim=8)


@pytest.mark.parametrize('scale', ['scalar', 'channel'])
def test_summary_counts_the_shared_bank_once_per_use(scale):
    """`params` is what the forward pass computes with: every block uses a full-size (W, b), whether its layer owns
    the bank or only references it, so the count is the original's plus the per-layer scales (closed form)."""
    original = tiny_vit()
    model = reduce(tiny_vit(), f'morphreuse:variant=shape,scale={scale}')
    depth, dim, hidden = len(original.blocks), original.embed_dim, original.blocks[0].mlp.fc1.out_features
    scales = depth * (2 if scale == 'scalar' else hidden + dim)
    info = summary(model, macs=False)
    assert info['params'] == summary(original, macs=False)['params'] + scales
    assert info['unique_params'] < info['params']  # the bank is stored once
    per_block = [b['params'] for b in info['blocks']]
    assert per_block == [per_block[0]] * depth  # owner and referencing blocks alike
    assert per_block[0] == 2 * dim * hidden + hidden + dim + scales // depth
