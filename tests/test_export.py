"""ONNX / TorchScript export of the materialised model, checked against the reduced PyTorch model."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import timm_reduce
from timm_reduce import cli
from timm_reduce.errors import ReduceError
from timm_reduce.persistence.export import export_model

from _hub_fakes import example_ids, get_example, reduced_example, sample_input


def _torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('example', example_ids())
def test_onnx_export_matches_pytorch_within_1e4(example: str, tmp_path: Path) -> None:
    model = reduced_example(example)
    result = export_model(model, tmp_path / 'model.onnx', 'onnx')
    assert result.path == tmp_path / 'model.onnx' and result.max_abs_diff <= 1e-4
    assert result.materialized == get_example(example)[1].dense  # no plain form: the reduced graph is exported
    # an independent check on a fresh batch size, run here with onnxruntime directly
    x = sample_input(batch=5, seed=11)
    session = onnxruntime.InferenceSession(str(result.path), providers=['CPUExecutionProvider'])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = _torch_outputs(model, x).numpy()
    assert got.shape == want.shape == (5, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_torchscript_export_matches_pytorch(tmp_path: Path) -> None:
    model = reduced_example('grouped')
    result = export_model(model, tmp_path / 'model.pt', 'torchscript')
    assert result.max_abs_diff <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        loaded = torch.jit.load(str(result.path))
    x = sample_input(batch=4, seed=12)
    torch.testing.assert_close(_torch_outputs(loaded, x), _torch_outputs(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('fmt, name', [('onnx', 'model.onnx'), ('torchscript', 'model.torchscript.pt')])
def test_cli_export_reports_the_difference(fmt: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = timm_reduce.save_pretrained(reduced_example('shallow'), tmp_path / 'out')
    assert cli.main(['export', str(folder), '--format', fmt]) == 0
    out = capsys.readouterr().out
    assert f'exported {fmt} of the materialised model to {folder / name}' in out and 'max abs diff vs PyTorch' in out
    assert (folder / name).is_file()
    target = tmp_path / 'elsewhere' / 'm.bin'
    assert cli.main(['export', str(folder), '--format', fmt, '--output', str(target)]) == 0
    assert target.is_file()


def test_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm_reduce.persistence.export as export

    real = export._run_onnx
    monkeypatch.setattr(export, '_run_onnx', lambda path, x: real(path, x) + 1e-2)  # a runtime that computes wrong
    target = tmp_path / 'model.onnx'
    target.write_bytes(b'previous export')
    with pytest.raises(ReduceError, match='differs from the PyTorch model by up to 0.01'):
        export_model(reduced_example('grouped'), target)
    assert target.read_bytes() == b'previous export'
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']  # no temporary left behind


def test_bad_export_requests_say_what_is_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = reduced_example('grouped')
    with pytest.raises(ReduceError, match="Unknown export format 'tflite'; allowed: onnx, torchscript"):
        export_model(model, tmp_path / 'm', 'tflite')  # type: ignore[arg-type]
    with pytest.raises(ReduceError, match='is a directory'):
        export_model(model, tmp_path)
    assert cli.main(['export', str(tmp_path / 'missing'), '--format', 'onnx']) == 2
    assert 'is not a saved model folder' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(['export', str(tmp_path), '--format', 'tflite'])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
