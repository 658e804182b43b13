"""How persistence puts files on disk: a saved folder is replaced whole, and files get the modes `open()` gives.

`write_folder` writes every new file into a hidden sibling folder, carries the folder's other entries over (hard
links: no data is copied), then swaps the two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere
rename the old folder aside, rename the new one in, and put the old one back if that fails). So the folder holds the
complete previous save or the complete new one, never a mix, even if the process dies at any point (with the
rename fallback, a process killed between its two renames leaves the previous save whole next to the folder). Where
the folder cannot be swapped (a mount point, the process's working directory, a parent that is not writable, a move
the system refuses) the files are replaced one by one, with a warning, as docs/threat-model.md says.

Every file and folder is created with mode `0o666`/`0o777` minus the process umask, like `open()` and `mkdir`
(`tempfile.mkstemp` would give 0600). A replaced folder keeps its own mode bits.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Callable

from ..errors import ReduceError

__all__ = ['new_temp_file', 'new_file_mode', 'write_folder']

_logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
# the folder itself may not be moved (sticky parent, owned by another user, busy, another file system)
_NOT_MOVABLE = {errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV}


class _CannotSwap(Exception):
    """The folder could not be moved; nothing was changed."""


def new_temp_file(directory: Path, name: str) -> Path:
    """Create an empty `.NAME.<random>.tmp` in `directory` with the mode `open()` gives a new file (0o666 & ~umask)."""
    for _ in range(100):
        path = Path(directory) / f'.{name}.{secrets.token_hex(4)}.tmp'
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f'Could not create a temporary file for {name} in {directory}.')


def new_file_mode(directory: Path) -> int:
    """The mode `open()` gives a new file here (0o666 & ~umask, read without changing the process umask)."""
    probe = new_temp_file(directory, 'mode')
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        probe.unlink()


def _new_dir(parent: Path, prefix: str, like: os.stat_result | None) -> Path:
    """A fresh folder `PARENT/PREFIX<random>`: mode of `like` (the folder it will replace), else 0o777 & ~umask."""
    for _ in range(100):
        path = parent / f'{prefix}{secrets.token_hex(4)}'
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        if like is not None:
            try:
                os.chmod(path, stat.S_IMODE(like.st_mode))
                if like.st_gid != os.stat(path).st_gid:
                    try:
                        os.chown(path, -1, like.st_gid)
                    except OSError:  # not a member of that group: the new folder keeps the default group
                        pass
            except BaseException:
                os.rmdir(path)
                raise
        return path
    raise FileExistsError(f'Could not create a temporary folder next to {parent / prefix}.')


def _free_name(parent: Path, prefix: str) -> Path:
    for _ in range(100):
        path = parent / f'{prefix}{secrets.token_hex(4)}'
        if not os.path.lexists(path):
            return path
    raise FileExistsError(f'No free name for {parent / prefix}.')


def _renameat2() -> Callable | None:
    if not sys.platform.startswith('linux'):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl without it
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step. False (nothing changed) where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (and Windows for folders) cannot sync a folder
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


def _in_place_reason(directory: Path) -> str | None:
    """Why `directory` (an existing folder) cannot be swapped, or None."""
    parent = directory.parent
    if os.stat(directory).st_dev != os.stat(parent).st_dev:
        return 'it is a mount point'
    if not os.access(parent, os.W_OK | os.X_OK):
        return f'its parent {parent} is not writable'
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return None
    if cwd == directory or directory in cwd.parents:
        return 'it holds the working directory of this process'
    return None


def _write_in_place(directory: Path, writers: dict[str, Callable[[Path], None]], reason: str) -> None:
    """Fallback: all files written to temporary names first, then renamed one by one (a crash between two renames
    can leave a mix; a failed write leaves the previous save intact)."""
    _logger.warning(f'Saving into {directory} file by file ({reason}): a crash while the files are being renamed '
                    'can leave new and old files mixed. Save into a folder below it to get an all-or-nothing save.')
    temps: dict[str, Path] = {}
    mode = new_file_mode(directory)
    try:
        for name, write in writers.items():
            temps[name] = new_temp_file(directory, name)
            write(temps[name])
            os.chmod(temps[name], mode)  # writers that replace the file (safetensors) leave 0600
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
        temps.clear()
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _carry_over(directory: Path, new: Path, replaced: set[str]) -> list[str]:
    """Hard-link every entry of `directory` that the new save does not replace into `new` (no data copied; the
    user's files stay where they are). Returns the entries that cannot be linked (folders, other file systems):
    they are moved once the new folder is in place."""
    later = []
    for entry in os.scandir(directory):
        if entry.name in replaced:
            continue
        if entry.is_dir(follow_symlinks=False):
            later.append(entry.name)
            continue
        try:
            os.link(entry.path, new / entry.name, follow_symlinks=False)
        except OSError:
            later.append(entry.name)
    return later


def _swap(new: Path, directory: Path) -> Path:
    """Put `new` at `directory`; returns where the previous folder now is."""
    try:
        if _exchange(new, directory):
            return new
        old = _free_name(directory.parent, f'.{directory.name}.timm_reduce-old-')
        os.rename(directory, old)
    except OSError as e:
        if e.errno in _NOT_MOVABLE:
            raise _CannotSwap(str(e)) from e
        raise
    try:
        os.rename(new, directory)
    except BaseException as e:
        try:
            os.rename(old, directory)
        except BaseException as restore_error:
            raise ReduceError(f'Saving into {directory} failed ({e}) and the previous save could not be put back '
                              f'({restore_error}): it is complete at {old}; move it back to {directory}.') from e
        raise
    return old


def _remove_folder(folder: Path, directory: Path, replaced: set[str]) -> None:
    """Delete `folder` (the previous save, or an unfinished new one): only its files named in `replaced` and the
    links to entries that are also in `directory`. Anything else is left in place, with a warning."""
    if not folder.is_dir():
        return
    kept = []
    for entry in os.scandir(folder):
        target = directory / entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                kept.append(entry.name)
                continue
            linked = os.path.lexists(target) and os.path.samestat(entry.stat(follow_symlinks=False), os.lstat(target))
            if entry.name in replaced or linked:
                os.unlink(entry.path)
            else:
                kept.append(entry.name)
        except OSError as e:
            _logger.warning(f'Could not remove {entry.path}: {e}')
            kept.append(entry.name)
    if kept:
        _logger.warning(f'Kept {folder} next to the saved folder {directory}: it holds {sorted(kept)[:10]}, which '
                        f'{directory} does not. Move what you need into {directory}, then delete {folder}.')
        return
    try:
        os.rmdir(folder)
    except OSError as e:
        _logger.warning(f'Could not remove {folder}: {e}')


def _retire(old: Path, directory: Path, later: list[str], replaced: set[str]) -> None:
    """Move the entries that could not be linked into the new folder, then delete the previous save."""
    for name in later:
        try:
            os.rename(old / name, directory / name)
        except OSError as e:
            _logger.warning(f'Could not move {name} into the new save at {directory} ({e}); it is in {old}.')
    _remove_folder(old, directory, replaced)


def write_folder(directory: str | os.PathLike, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write the files `{name: write(path)}` into `directory`, all or nothing.

    The folder afterwards holds the complete previous content or the complete new files, never a mix; its other
    entries (files, sub-folders of the user) are kept. Returns the folder written (a symlink is followed).
    """
    directory = Path(os.path.abspath(directory))
    if directory.is_symlink():  # replace the folder the link points to, keep the user's link
        directory = directory.resolve()
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    existing = os.stat(directory) if directory.is_dir() else None
    if existing is not None:
        reason = _in_place_reason(directory)
        if reason is not None:
            _write_in_place(directory, writers, reason)
            return directory
    try:
        return _write_and_swap(directory, writers, existing)
    except _CannotSwap as e:
        _write_in_place(directory, writers, f'the folder cannot be moved: {e}')
        return directory


def _write_and_swap(directory: Path, writers: dict[str, Callable[[Path], None]],
                    existing: os.stat_result | None) -> Path:
    parent = directory.parent
    replaced = set(writers)
    new = _new_dir(parent, f'.{directory.name}.timm_reduce-new-', existing)
    staged: Path | None = new  # removed on any failure, but only our own files and links (see _remove_folder)
    try:
        mode = new_file_mode(new)
        for name, write in writers.items():
            write(new / name)
            os.chmod(new / name, mode)  # writers that create files their own way (safetensors) leave 0600
            _fsync(new / name)
        later = _carry_over(directory, new, replaced) if existing is not None else []
        _fsync(new, directory=True)
        if existing is None:
            os.rename(new, directory)
            old = None
        else:
            old = _swap(new, directory)
        staged = None
    finally:
        if staged is not None:
            _remove_folder(staged, directory, replaced)
    # the new save is in place: nothing below may fail the save
    try:
        _fsync(parent, directory=True)
    except OSError as e:
        _logger.warning(f'Saved {directory}, but syncing {parent} to disk failed: {e}')
    if old is not None:
        _retire(old, directory, later, replaced)
    return directory
