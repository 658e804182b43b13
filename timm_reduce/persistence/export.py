"""Export a (reduced) model to ONNX or TorchScript, checked against the PyTorch model it came from.

    result = timm_reduce.export.export_model(model, 'model.onnx', format='onnx')
    print(result.max_abs_diff)

The exported graph is that of `materialize(model)` (plain layers, shared weights expanded), so any runtime runs
it. A model without a plain form (e.g. MorphReuse's core variant) is exported as it is: its layers are standard
operations too. The outputs are compared with the original PyTorch model on random inputs of a different batch size
than the one traced (checking that the batch dimension stayed dynamic); the file is put in place only if they match.
"""
from __future__ import annotations

import copy
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..core.api import materialize
from ..errors import ReduceError
from .files import new_temp_file

__all__ = ['ExportResult', 'export_model', 'EXPORT_FORMATS']

_logger = logging.getLogger(__name__)

ExportFormat = Literal['onnx', 'torchscript']
EXPORT_FORMATS: tuple[str, ...] = ('onnx', 'torchscript')
DEFAULT_FILENAMES = {'onnx': 'model.onnx', 'torchscript': 'model.torchscript.pt'}


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote and how closely it matches PyTorch.

    Attributes:
        path: the exported file.
        format: `'onnx'` or `'torchscript'`.
        max_abs_diff: largest absolute difference between exported and PyTorch outputs on the check inputs.
        atol: the tolerance it was checked against.
        input_shape: the shape of the check input (N, C, H, W).
        materialized: True when the graph is `materialize(model)`; False when the model has no plain form and
            its reduced layers were exported as they are.
    """

    path: Path
    format: str
    max_abs_diff: float
    atol: float
    input_shape: tuple[int, ...]
    materialized: bool = True


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnx
    except ImportError as e:
        raise ReduceError("ONNX export needs the onnx package: pip install 'timm_reduce[export]'.") from e
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)  # the legacy exporter announces its end
        # the TorchScript-based exporter (dynamo=False): needs no onnxscript and keeps the batch dimension dynamic
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=['input'], output_names=['output'],
                          dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})
    onnx.checker.check_model(str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError as e:
        raise ReduceError("Checking an ONNX export needs onnxruntime: pip install 'timm_reduce[export]'.") from e
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=FutureWarning, message='.*torch.jit.*deprecated')
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning, message='.*torch.jit.*deprecated')
        loaded = torch.jit.load(str(path), map_location='cpu')
    with torch.no_grad():
        return loaded(x)


def export_model(
        model: nn.Module,
        output: str | os.PathLike,
        format: ExportFormat = 'onnx',
        *,
        atol: float = 1e-4,
        batch_size: int = 2,
        opset: int = 17,
) -> ExportResult:
    """Export `materialize(model)` (or `model` itself when it has no plain form) to `output`; check it against `model`.

    Args:
        model: a timm model, reduced or not (not modified).
        output: the file to write; replaced only when the export passed the check.
        format: `'onnx'` (checked with onnxruntime) or `'torchscript'` (traced; checked with torch.jit.load).
        atol: largest allowed absolute output difference.
        batch_size: batch of the traced example; the check runs at `batch_size + 1`.
        opset: ONNX opset version.

    Returns:
        An ExportResult with the largest absolute difference found.

    Raises:
        ReduceError: unknown format, missing onnx/onnxruntime, or outputs differing by more than `atol`
            (then `output` is left as it was).
    """
    from ..summary import model_input_size

    if format not in EXPORT_FORMATS:
        raise ReduceError(f'Unknown export format {format!r}; allowed: {", ".join(EXPORT_FORMATS)}.')
    if batch_size < 1:
        raise ReduceError(f'batch_size must be >= 1, got {batch_size}.')
    output = Path(output)
    if output.is_dir():
        raise ReduceError(f'Export output {output} is a directory; give a file name such as '
                          f'{output / DEFAULT_FILENAMES[format]}.')
    try:
        dense, materialized = materialize(model), True
    except ReduceError as e:  # no plain form: trace the reduced model itself, still checked below
        _logger.info(f'{e} Exporting the reduced layers as they are.')
        dense, materialized = copy.deepcopy(model), False
    dense = dense.cpu().float().eval()
    input_size = model_input_size(dense)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, *input_size, generator=generator)
    check = torch.randn(batch_size + 1, *input_size, generator=generator)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            want = model(check.to(device=param.device, dtype=param.dtype)).float().cpu()
    finally:
        model.train(was_training)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(output.parent, output.name)  # mode 0o666 & ~umask, as open() gives (mkstemp: 0600)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        with torch.no_grad():
            if format == 'onnx':
                _export_onnx(dense, example, tmp, opset)
                got = _run_onnx(tmp, check)
            else:
                _export_torchscript(dense, example, tmp)
                got = _run_torchscript(tmp, check)
        if got.shape != want.shape:
            raise ReduceError(f'The {format} export gives outputs of shape {tuple(got.shape)}, PyTorch '
                              f'{tuple(want.shape)}; {output} was not written.')
        diff = (got.float() - want).abs().max().item()
        if not diff <= atol:
            raise ReduceError(f'The {format} export differs from the PyTorch model by up to {diff:.3g} '
                              f'(allowed {atol:g}); {output} was not written.')
        os.chmod(tmp, mode)  # an exporter that writes a new file in its place would leave its own mode
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    _logger.info(f'Exported {format} to {output}: max abs diff {diff:.3g} vs PyTorch')
    return ExportResult(output, format, diff, atol, tuple(check.shape), materialized)
