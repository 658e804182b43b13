"""Push reduced models to the Hugging Face Hub. All network code of timm_reduce lives in this module.

    timm_reduce.push_to_hub(model, 'user/tiny-grouped')          # save, verify, upload in one commit
    timm_reduce.hub.push_folder('out/', 'user/tiny-grouped')     # an already saved folder (`timm-reduce push`)
    model = timm.create_model('hf-hub:user/tiny-grouped', pretrained=True)   # after `import timm_reduce`

Every upload is prepared and verified locally first (the folder must rebuild the model strictly; a model pushed
from memory must give the same outputs after the round trip), then sent as a single Hub commit, so a failure
leaves either the previous revision or the complete new one on the Hub, never a half-written model.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from ..version import __version__
from ..core.finite import non_finite
from .card import CARD_NAME, is_generated_card, render_model_card
from ..errors import HubError, ReduceError
from .serialization import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained

__all__ = ['push_to_hub', 'push_folder', 'check_repo_id', 'load_folder']

_logger = logging.getLogger(__name__)

_LOGIN_HELP = ('Log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`), set the HF_TOKEN '
               'environment variable, or pass token=... (CLI: --token) with a write token from '
               'https://huggingface.co/settings/tokens.')
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


def check_repo_id(repo_id: Any) -> str:
    """Validate a Hub model repo id locally (no network): `namespace/name`.

    Raises:
        HubError: saying what is wrong and what is allowed.
    """
    allowed = ("expected 'namespace/name' (your user or organisation, a slash, the model name), using letters, "
               "digits, '-', '_' and '.', not starting with '-' or '.', without '--' or '..', at most 96 characters, "
               "e.g. 'alice/vit-small-grouped'")
    if not isinstance(repo_id, str):
        raise HubError(f'Invalid Hub repo id {repo_id!r} ({type(repo_id).__name__}): {allowed}.')
    parts = repo_id.split('/')
    if len(parts) != 2 or not all(_NAME_RE.match(p) for p in parts):
        raise HubError(f'Invalid Hub repo id {repo_id!r}: {allowed}.')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f'Invalid Hub repo id {repo_id!r}: {e} ({allowed}).') from e
    return repo_id


def _require_token(token: str | None) -> str:
    if hf_constants.is_offline_mode():
        raise HubError('Cannot push: HF_HUB_OFFLINE is set, so huggingface_hub refuses network access. '
                       'Unset HF_HUB_OFFLINE to upload.')
    token = token if token is not None else get_token()
    if not token:
        raise HubError(f'Cannot push: no Hugging Face token found. {_LOGIN_HELP}')
    return token


def load_folder(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in `folder` (strictly, as `timm.create_model('local-dir:...')` does) and its config.

    Raises:
        ReduceError: the folder is not a saved model, or its weights do not fit its config.
    """
    model = load_pretrained(folder)
    return model.eval(), json.loads((Path(folder) / CONFIG_NAME).read_text())


def _refuse_non_finite_file(path: Path) -> None:
    """Refuse a weights file holding NaN or infinite values (read one tensor at a time), naming the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework='pt', device='cpu') as f:
        bad = [f'{key} ({count} of {size} values)'
               for key, count, size in non_finite((key, f.get_tensor(key)) for key in f.keys())]
    if bad:
        raise ReduceError(f'Refusing to push {path.parent}: {path.name} holds NaN or infinite values in '
                          f'{", ".join(bad[:3])}{f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""}. '
                          'Nothing was sent. Repair the weights and save the model again.')


def _max_output_diff(reference: nn.Module, loaded: nn.Module) -> float:
    from ..summary import model_input_size

    param = next(reference.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model_input_size(loaded), generator=generator)
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad():
            want = reference(x.to(device=param.device, dtype=param.dtype)).float().cpu()
            got = loaded(x.to(dtype=next(loaded.parameters()).dtype)).float()
    finally:
        reference.train(was_training)
    return (want - got).abs().max().item()


def _commit_message(config: dict[str, Any]) -> str:
    block = config.get('timm_reduce') or {}
    steps = ' -> '.join(step['strategy'] for step in block.get('recipe', [])) or 'no reduction'
    base = block.get('base') or config.get('architecture')
    return f'Upload {base} reduced with timm_reduce ({steps}{", dense" if block.get("dense") else ""})'


def _upload(
        folder: Path,
        card: str | None,
        repo_id: str,
        *,
        token: str,
        private: bool,
        revision: str | None,
        commit_message: str,
        create_pr: bool,
) -> CommitInfo:
    """Create the repo if needed, then upload config, weights and card as ONE commit."""
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in (CONFIG_NAME, WEIGHTS_NAME)]
    card_bytes = card.encode('utf-8') if card is not None else (folder / CARD_NAME).read_bytes()
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_bytes))
    api = HfApi(token=token, library_name='timm_reduce', library_version=__version__)
    where = f'{repo_id}@{revision}' if revision else repo_id
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision,
                                 create_pr=create_pr)
    except LocalTokenNotFoundError as e:
        raise HubError(f'Cannot push to {where}: no Hugging Face token. {_LOGIN_HELP}') from e
    except HfHubHTTPError as e:
        status = getattr(e.response, 'status_code', None)
        if status in (401, 403):
            raise HubError(f'The Hub refused the upload to {where} (HTTP {status}): the token is invalid or has no '
                           f'write access to that namespace. {_LOGIN_HELP} Nothing was committed.') from e
        raise HubError(f'The Hub rejected the upload to {where} (HTTP {status}): {e}. Nothing was committed; '
                       'your local files are unchanged.') from e
    except Exception as e:  # connection drops, timeouts: the HTTP client's own exception types vary by version
        raise HubError(f'Upload to {where} failed: {type(e).__name__}: {e}. Nothing partial was committed: the files '
                       'go up as one commit, so the repository keeps its previous revision (or, had the Hub already '
                       'accepted the commit, holds the complete new one). Your local files are unchanged; check the '
                       'connection and retry.') from e
    _logger.info(f'Pushed to {getattr(info, "commit_url", where)}')
    return info


def push_folder(
        folder: str | os.PathLike,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        create_pr: bool = False,
) -> CommitInfo:
    """Upload a folder written by `save_pretrained` (config.json, model.safetensors, README.md) in one commit.

    The folder is not modified. It must rebuild its model strictly before anything is sent. Its README.md is
    uploaded as is when a user wrote it; a missing or timm_reduce-generated card is (re)rendered with `repo_id`
    in the loading instructions. Other files in the folder are not uploaded.

    Args:
        folder: the saved model folder.
        repo_id: `namespace/name` of the Hub model repository (created if missing).
        private: create the repository as private (an existing repository keeps its visibility).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: default describes the base and recipe.
        token: Hub token; default the logged-in token or HF_TOKEN.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        huggingface_hub's CommitInfo (`commit_url`, `oid`, ...).

    Raises:
        HubError: invalid repo id, no token, the Hub refused or the network failed (nothing committed).
        ReduceError: the folder is not a loadable saved model, or its weights hold NaN or infinite values.
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    model, config = load_folder(folder)
    _refuse_non_finite_file(folder / WEIGHTS_NAME)
    token = _require_token(token)
    card = None
    existing = folder / CARD_NAME
    if not existing.is_file() or is_generated_card(existing.read_text('utf-8', errors='replace')):
        card = render_model_card(model, config, repo_id=repo_id)
    return _upload(folder, card, repo_id, token=token, private=private, revision=revision,
                   commit_message=commit_message or _commit_message(config), create_pr=create_pr)


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        *,
        dense: bool = False,
        metadata: dict[str, Any] | None = None,
        create_pr: bool = False,
        atol: float = 1e-4,
) -> CommitInfo:
    """Save `model` like `save_pretrained`, check the saved copy, and upload it to the Hub in one commit.

    The upload holds config.json (timm's format; `architecture: timm_reduce` with the recipe in `model_args`,
    or a plain timm architecture for thin/uniform-shallow/dense models), a de-duplicated model.safetensors and a
    model card README.md. Afterwards `timm.create_model('hf-hub:<repo_id>', pretrained=True)` rebuilds the model
    (with `import timm_reduce`, or with stock timm alone for plain and dense uploads).

    Args:
        model: a timm model, reduced or not. It is not modified.
        repo_id: `namespace/name` of the Hub model repository (created if missing).
        private: create the repository as private (an existing repository keeps its visibility).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: default describes the base and recipe.
        token: Hub token; default the logged-in token or HF_TOKEN.
        dense: upload the plain timm form (`materialize(model)`) that stock timm loads without timm_reduce.
        metadata: JSON-able extras stored in config.json and rendered on the card (`description`, `license`,
            `base_model`, `datasets`, `calibration_data`, `accuracy`, anything else).
        create_pr: open a pull request instead of committing to the branch.
        atol: largest allowed output difference between `model` and the saved copy before uploading.

    Returns:
        huggingface_hub's CommitInfo (`commit_url`, `oid`, ...).

    Raises:
        HubError: invalid repo id, no token, the Hub refused or the network failed (nothing committed).
        ReduceError: the model cannot be saved (e.g. NaN weights), or the saved copy does not reproduce it.
    """
    check_repo_id(repo_id)
    token = _require_token(token)
    with tempfile.TemporaryDirectory(prefix='timm_reduce_push_') as tmp:
        folder = Path(tmp)
        save_pretrained(model, folder, dense=dense, metadata=metadata, model_card=False)
        loaded, config = load_folder(folder)
        diff = _max_output_diff(model, loaded)
        if not diff <= atol:
            raise ReduceError(f'Refusing to push: the saved copy gives outputs up to {diff:.3g} away from the model '
                              f'(allowed {atol:g}). Nothing was uploaded.')
        card = render_model_card(loaded, config, repo_id=repo_id)
        return _upload(folder, card, repo_id, token=token, private=private, revision=revision,
                       commit_message=commit_message or _commit_message(config), create_pr=create_pr)

