"""Outputs that appear whole or not at all: a folder written under a temporary name beside its destination and
renamed into place when complete.

    with atomic_folder("runs/x/bundle", overwrite=True) as tmp:
        write_everything(tmp)              # an exception here deletes tmp and leaves runs/x/bundle as it was

A rename within one filesystem is atomic, so a reader sees the old output or the new one, never a half-written
one, and a failed or killed writer leaves at most a hidden `.<name>.*` folder behind, never a partial output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's file-mode creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path, *, directory: bool = True) -> None:
    """Give a mkdtemp / mkstemp path (private, 0700 / 0600) the mode an ordinary new one would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh empty folder beside `path`; when the body succeeds it becomes `path`, on any exception it
    is deleted. An existing `path` is refused up front (FileExistsError) unless `overwrite`; with it, the old
    output is moved aside before the new one is renamed in, so `path` is never missing both."""
    path = Path(path).absolute()
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        usual_mode(tmp)
        yield tmp
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if not path.exists() and not path.is_symlink():
        os.rename(tmp, path)
        return
    if not overwrite:  # it appeared while we were writing
        raise FileExistsError(f"{path} appeared while it was being written")
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "content")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.replace(old / "content", path)  # put the old output back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
