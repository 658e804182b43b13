"""ThinMLP: a smaller `mlp_ratio` for every block, trained from scratch."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ReduceError
from ..core.hidden_units import rebuild_units
from ..core.registry import register_strategy

MAX_MLP_RATIO = 64.0  # timm's widest MLPs use about 5; far beyond that is a typo that would allocate gigabytes


@dataclass
class ThinConfig:
    """Options of `thin`.

    Attributes:
        mlp_ratio: hidden width / embedding width of every MLP, in (0, 64]. 2.0 halves a ViT's usual 4.0.
    """

    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            raise ReduceError(f'thin: mlp_ratio must be > 0 and at most {MAX_MLP_RATIO:g}, got {self.mlp_ratio}.')


def _creation_kwargs(config: ThinConfig) -> dict:
    return {'mlp_ratio': config.mlp_ratio}


@register_strategy('thin', ThinConfig, description='smaller mlp_ratio; from scratch (weights re-initialised)',
                   creation_kwargs=_creation_kwargs, reads_weights=False)
def apply_thin(model: nn.Module, sites: list, config: ThinConfig) -> None:
    """Rebuild every MLP at `int(dim * mlp_ratio)` hidden units.

    At creation time (`timm.create_model('timm_reduce', base=..., reduce='thin:mlp_ratio=2')`) timm builds the
    thin model itself. On an existing model the MLPs are rebuilt with fresh weights (truncated normal, std 0.02,
    zero bias, timm's ViT default): thin is a from-scratch strategy, the old MLP weights are discarded.
    """
    for site in sites:
        units = int(site.mlp.fc2.out_features * config.mlp_ratio)
        if units < 1:
            raise ReduceError(f'thin: mlp_ratio={config.mlp_ratio} leaves block {site.path} with no hidden units.')
        rebuild_units(site.mlp, units)
