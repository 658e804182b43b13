"""Reading calibration data: this rank's share of the batches, each checked to be an image tensor."""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable, NamedTuple

import torch
from torch import nn

from ..errors import ReduceError

__all__ = ['Collected', 'collect_batches', 'expected_input']

_logger = logging.getLogger(__name__)


def _batch_images(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ReduceError(f'calibration data: batch {index} is a {type(batch).__name__}; expected an image tensor '
                          f'(B, C, H, W) or an (images, targets) tuple, as a DataLoader gives.')
    if not batch.is_floating_point() or batch.ndim < 2:
        raise ReduceError(f'calibration data: batch {index} is a {batch.dtype} tensor of shape {tuple(batch.shape)}; '
                          f'expected float images (B, C, H, W) after the model\'s transforms.')
    finite = torch.isfinite(batch)
    if not bool(finite.all()):
        bad = (~finite).reshape(batch.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise ReduceError(f'calibration data: batch {index} holds {int((~finite).sum())} NaN or infinite value(s) '
                          f'(image(s) {", ".join(map(str, bad[:5]))}{", ..." if len(bad) > 5 else ""} of the batch); '
                          f'calibrating on them would make every weight NaN. Remove or repair those images.')
    return batch


def expected_input(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """(channels, (H, W)) that `model` takes; H, W is None when the model accepts any image size.

    The model's own patch embedding is the authority (its conv's input channels, unless a CNN stem comes first; its
    `img_size` when it enforces it: `strict_img_size` without `dynamic_img_pad` / `dynamic_img_size`); timm's input
    config fills in the rest.
    """
    from ..summary import model_input_size

    try:
        config_c, *config_hw = model_input_size(model)
    except Exception:  # a model timm's config does not describe: rely on the patch embedding only
        config_c, config_hw = None, None
    embed = getattr(model, 'patch_embed', None)
    proj = getattr(embed, 'proj', None)
    hybrid = getattr(embed, 'backbone', None) is not None  # a CNN stem feeds `proj` (HybridEmbed): not the image
    channels = proj.in_channels if isinstance(proj, nn.Conv2d) and not hybrid else config_c
    if embed is not None and hasattr(embed, 'strict_img_size'):
        fixed = (embed.strict_img_size and not getattr(embed, 'dynamic_img_pad', False)
                 and not getattr(model, 'dynamic_img_size', False) and getattr(embed, 'img_size', None) is not None)
        size = tuple(int(v) for v in embed.img_size) if fixed else None
    else:
        from timm.models import get_model_input_config

        try:
            fixed = bool(get_model_input_config(model).get('fixed_input_size', False))
        except Exception:
            fixed = False
        size = tuple(int(v) for v in config_hw) if fixed and config_hw else None
    return channels, size


def _check_shape(images: torch.Tensor, index: int, expected: tuple[int | None, tuple[int, int] | None]) -> None:
    channels, size = expected
    want = f"(B, {channels if channels is not None else 'C'}, {f'{size[0]}, {size[1]}' if size else 'H, W'})"
    shape = tuple(images.shape)
    if images.ndim != 4:
        raise ReduceError(f'calibration data: batch {index} has shape {shape} ({images.ndim} dimensions); the model '
                          f'takes image batches of shape {want}. Stack the images into a batch (a DataLoader does).')
    if channels is not None and shape[1] != channels:
        raise ReduceError(f'calibration data: batch {index} has shape {shape}, i.e. {shape[1]} channel(s); the model '
                          f'takes {channels}: {want}. Convert the images (e.g. to RGB) with the model\'s transforms.')
    if size is not None and shape[2:] != size:
        raise ReduceError(f'calibration data: batch {index} has {shape[2]}x{shape[3]} images (shape {shape}); the '
                          f'model takes {size[0]}x{size[1]}: {want}. Resize them with the model\'s eval transforms '
                          f'(timm.data.resolve_data_config(model=model) + timm.data.create_transform).')


def _batch_targets(batch: Any, index: int, images: torch.Tensor) -> torch.Tensor:
    """The class indices of an (images, targets) batch: integers of shape (B,)."""
    targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if not isinstance(targets, torch.Tensor):
        raise ReduceError(f'calibration data: batch {index} has no targets (it is '
                          f'{"an image tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__}); '
                          f'distill_ce_weight > 0 needs (images, targets) batches of class indices. Pass a labelled '
                          f'loader, or distill_ce_weight=0 (distillation without labels).')
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool \
            or tuple(targets.shape) != (images.shape[0],):
        raise ReduceError(f'calibration data: batch {index} has targets of {targets.dtype} {tuple(targets.shape)}; '
                          f'the cross-entropy of distill_ce_weight needs integer class indices of shape '
                          f'({images.shape[0]},), one per image.')
    return targets


def _digest(images: torch.Tensor) -> bytes:
    digest = hashlib.sha256(f'{tuple(images.shape)} {images.dtype}'.encode())
    digest.update(images.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


class Collected(NamedTuple):
    """What `collect_batches` read: this rank's images (and targets), the batches used in total, their digest."""

    batches: list[torch.Tensor]
    total: int
    digest: str | None
    targets: list[torch.Tensor] | None = None


def collect_batches(data: Iterable, limit: int | None, rank: int, world: int, model: nn.Module | None = None,
                    digest: bool = False, targets: bool = False) -> Collected:
    """This rank's share of the first `limit` batches of `data`, the number of batches used in total, (when
    `digest`) a SHA-256 of all the batches used (every rank's share: equal on every rank that reads the same data),
    and (when `targets`) this rank's class indices, batch by batch (then part of the digest).

    Every batch read must be float images of finite values; with `model`, of the rank, channels and (when the model
    enforces one) image size the model takes; with `targets`, an (images, targets) pair of B integer class indices.
    Errors name the batch.
    """
    if data is None:
        raise ReduceError('calibration needs data: pass data=<a DataLoader or an iterable of image batches or '
                          '(images, targets) tuples>. For a reduction without data use timm_reduce.reduce().')
    try:
        iterator = iter(data)
    except TypeError:
        raise ReduceError(f'calibration data must be iterable (a DataLoader, a list of batches), '
                          f'got {type(data).__name__}.') from None
    mine, labels, total, digests = [], [], 0, []
    expected = expected_input(model) if model is not None else None
    for i, batch in enumerate(iterator):
        if limit is not None and i >= limit:
            break
        images = _batch_images(batch, i)
        if expected is not None:
            _check_shape(images, i, expected)
        label = _batch_targets(batch, i, images) if targets else None
        if digest:
            digests.append(_digest(images) + (_digest(label) if label is not None else b''))
        if i % world == rank:
            mine.append(images)
            labels.append(label)
        total += 1
    usable = total // world
    if usable == 0:
        raise ReduceError(f'calibration data gave {total} batch(es); need at least {world} '
                          f'(one per process).' if total else 'calibration data is empty: it gave no batches.')
    if total % world:
        _logger.warning(f'calibration: {total} batches do not split evenly over {world} processes; '
                        f'using {usable * world}.')
    combined = hashlib.sha256(b''.join(digests[:usable * world])).hexdigest() if digest else None
    return Collected(mine[:usable], usable * world, combined, labels[:usable] if targets else None)


