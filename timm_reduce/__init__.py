"""timm_reduce: make timm vision transformers smaller by sharing, pruning and decomposing their MLPs."""
from .version import __version__  # noqa: F401  (re-exported)

from .errors import HubError, ReduceError, UnsupportedModelError
from .core.spec import ReduceSpec
from .core.registry import Strategy, get_strategy, list_strategies, register_strategy
from .core.discovery import MlpSite, find_mlp_sites
from .core.sharing import unique_parameters
from .core.record import get_record
from .core.api import materialize, reduce
from .core.statistics import MlpStatistics, collect_statistics
from .persistence.serialization import load_pretrained, save_pretrained
from .persistence.hub import push_to_hub
from .summary import format_summary, summary
from .calibration import CalibrationConfig, CalibrationReport, calibrate, calibration_report, compress
from . import strategies  # noqa: F401  (registers the built-in strategies)
from .persistence import entrypoint  # noqa: F401  (registers the `timm_reduce` timm model)

__all__ = [
    'CalibrationConfig', 'CalibrationReport', 'HubError', 'MlpSite', 'MlpStatistics', 'ReduceError', 'ReduceSpec',
    'Strategy', 'UnsupportedModelError', 'calibrate', 'calibration_report', 'collect_statistics', 'compress',
    'find_mlp_sites', 'format_summary', 'get_record', 'get_strategy', 'list_strategies', 'load_pretrained',
    'materialize', 'push_to_hub', 'reduce', 'register_strategy', 'save_pretrained', 'summary', 'unique_parameters',
]
