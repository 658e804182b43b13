"""Find the MLP of every transformer block of a timm model, and cut the blocks into groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ..errors import ReduceError, UnsupportedModelError

__all__ = ['MlpSite', 'find_mlp_sites', 'mlp_kind', 'resolve_groups']

# Block attributes that mean "this block fuses its MLP into other projections" (e.g. ParallelScalingBlock).
_FUSED_MARKERS = ('mlp_out_proj', 'mlps', 'in_proj_mlp')


@dataclass
class MlpSite:
    """One transformer block that owns an MLP at `block.mlp`.

    Attributes:
        index: position among all sites, in model order.
        path: dotted path of the block (`blocks.3`, `layers.1.blocks.0`).
        stage: dotted path of the container holding the block (`blocks`, `layers.1.blocks`).
        block: the block module.
    """

    index: int
    path: str
    stage: str
    block: nn.Module

    @property
    def mlp(self) -> nn.Module:
        return self.block.mlp

    @mlp.setter
    def mlp(self, module: nn.Module) -> None:
        self.block.mlp = module


def mlp_kind(mlp: nn.Module) -> str:
    """`'mlp'` (fc1 -> act -> norm -> fc2), `'glu'` (packed gate/value fc1, GluMlp) or `'swiglu'` (fc1_g, fc1_x).

    Raises UnsupportedModelError for MLPs that are convolutional or gate across tokens.
    """
    kind = getattr(mlp, 'mlp_kind', None)  # reduced modules declare their kind
    if kind is not None:
        return kind
    name = type(mlp).__name__
    if hasattr(mlp, 'fc1_g') and hasattr(mlp, 'fc1_x') and hasattr(mlp, 'fc2'):
        return 'swiglu'
    if not (hasattr(mlp, 'fc1') and hasattr(mlp, 'fc2')):
        raise UnsupportedModelError(f'{name} is not an MLP with fc1/fc2 layers.')
    if isinstance(mlp.fc1, nn.Conv2d) or isinstance(mlp.fc2, nn.Conv2d):
        raise UnsupportedModelError(f'{name} uses 1x1 convolutions; timm_reduce supports Linear MLPs only.')
    if getattr(mlp, 'gate', None) is not None and not isinstance(mlp.gate, nn.Identity):
        raise UnsupportedModelError(f'{name} has a spatial gate (gMLP); timm_reduce does not support it.')
    if hasattr(mlp, 'chunk_dim') and hasattr(mlp, 'gate_last'):
        return 'glu'
    return 'mlp'


def find_mlp_sites(model: nn.Module) -> list[MlpSite]:
    """Every block with an `mlp` child, in model order. Depth and family are read from the model, never assumed.

    Raises:
        UnsupportedModelError: no MLP blocks (e.g. a CNN), or blocks whose MLP is fused into other projections.
    """
    sites: list[MlpSite] = []
    fused: list[str] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        if any(hasattr(module, m) for m in _FUSED_MARKERS) and not isinstance(getattr(module, 'mlp', None), nn.Module):
            fused.append(path)
            continue
        mlp = getattr(module, 'mlp', None)
        if isinstance(mlp, nn.Module) and path and id(module) not in seen:
            try:
                mlp_kind(mlp)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f'{type(model).__name__}: block {path!r}: {e}') from e
            seen.add(id(module))
            stage = path.rpartition('.')[0]
            sites.append(MlpSite(len(sites), path, stage, module))
    cls = type(model).__name__
    if fused:
        raise UnsupportedModelError(
            f'{cls} is unsupported: its blocks ({fused[0]}, ...) fuse the MLP into shared projections '
            f'(no separate `mlp` module to reduce).')
    if not sites:
        raise UnsupportedModelError(
            f'{cls} is unsupported: no transformer blocks with an `mlp` module were found. timm_reduce works on '
            f'ViT/DeiT, Swin, EVA, BEiT and other timm transformers whose blocks have `block.mlp`.')
    return sites


def resolve_groups(
        sites: Sequence[MlpSite],
        group_size: int | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        within_stage: bool = True,
) -> list[list[int]]:
    """Groups of site indices: explicit `groups`, or consecutive runs of `group_size` (a shorter last run is allowed).

    With `within_stage`, runs restart at every stage (Swin's `layers[i].blocks`), so a group never spans two stages.
    Explicit groups must cover every block exactly once.
    """
    n = len(sites)
    if groups is not None:
        flat = [i for g in groups for i in g]
        bad = [i for i in flat if not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ReduceError(f'groups name blocks {bad} that do not exist; the model has blocks 0..{n - 1}.')
        if any(len(g) == 0 for g in groups):
            raise ReduceError('groups must not contain an empty group.')
        dupes = sorted({i for i in flat if flat.count(i) > 1})
        if dupes:
            raise ReduceError(f'groups list blocks {dupes} more than once; each block belongs to exactly one group.')
        missing = sorted(set(range(n)) - set(flat))
        if missing:
            raise ReduceError(f'groups do not cover blocks {missing}; every block 0..{n - 1} must be in a group.')
        return [list(g) for g in groups]
    if group_size is None or group_size < 1:
        raise ReduceError(f'group_size must be an integer >= 1, got {group_size!r}.')
    result: list[list[int]] = []
    stages: dict[str, list[int]] = {}
    for s in sites:
        stages.setdefault(s.stage if within_stage else '', []).append(s.index)
    for members in stages.values():
        for start in range(0, len(members), group_size):
            result.append(members[start:start + group_size])
    return result
