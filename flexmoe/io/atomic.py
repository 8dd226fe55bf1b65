"""Atomic outputs: build beside the target, fsync, rename. A killed run leaves no half-written target.

Temporary siblings are named `.{target}.flexmoe-tmp.{pid}`; a later run removes those whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flexmoe.errors import OutputExistsError
from flexmoe.io import manifest

_TMP_TAG = ".flexmoe-tmp."
_OLD_TAG = ".flexmoe-old."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(target: Path, tag: str) -> list[Path]:
    prefix = f".{target.name}{tag}"
    out = []
    for p in target.parent.iterdir() if target.parent.is_dir() else ():
        pid = p.name[len(prefix):]
        if p.name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            out.append(p)
    return out


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _remove_stale_siblings(target: Path) -> None:
    for p in _stale_siblings(target, _TMP_TAG):
        _remove(p)
    for p in _stale_siblings(target, _OLD_TAG):
        # A run killed between its two renames left the previous target only here: put it back, never delete it.
        if not target.exists() and not target.is_symlink():
            os.rename(p, target)
        else:
            _remove(p)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless `overwrite`; call before any slow work so the user learns early."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists: choose another --out or pass --overwrite")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, *, seal: str | None = None) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; on success it replaces `out` in one rename, on error it vanishes.

    With `seal` (the folder's JSON metadata file name) the finished folder's manifest (`flexmoe.io.manifest`) is
    recorded in that file before the rename.

    With `overwrite`, an existing `out` (which may also be one of the inputs, as in `--in-place`) is swapped
    out only after the new one is complete.
    """
    out = Path(out)
    _remove_stale_siblings(out)  # first: it may restore a previous output that check_output must then see
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if seal is not None:
            manifest.seal(tmp, seal)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp)
        if overwrite and out.exists():
            old = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _remove(old)
        else:
            try:
                os.rename(tmp, out)  # refused for an existing (non-empty) folder: no writer clobbers another's
            except OSError as e:
                if out.exists():
                    raise OutputExistsError(f"output {out} was written by another run while this one worked; "
                                            "nothing of this run was kept: choose another --out or pass --overwrite"
                                            ) from e
                raise
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        manifest.forget(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temp file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
