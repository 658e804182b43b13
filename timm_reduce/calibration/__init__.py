"""Block-wise calibration, generic over strategies: options and report (`config`), the engine (`engine`: `calibrate`,
`compress`), its checkpoints (`checkpoint`) and the distributed helpers (`distributed`)."""
from .config import CalibrationConfig, CalibrationReport, calibration_report, estimate_memory
from .engine import calibrate, compress

__all__ = ['CalibrationConfig', 'CalibrationReport', 'calibrate', 'calibration_report', 'compress', 'estimate_memory']
