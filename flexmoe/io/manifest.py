"""Content manifests: each file's size and sha256, kept in the folder's own flexmoe JSON under "files".

Every folder flexmoe writes (anchor, expert package, merged or tuned checkpoint, baselines) is sealed just before
its atomic rename: `seal` records each file of the finished temporary folder in the metadata file, which cannot
list itself. Tensor shards are hashed while the ShardWriter writes them (`TailHasher`); only the other files
(JSON, tokenizer, files written by transformers) are read back to be hashed.

Readers check the sizes of every listed file at once (`check`), and the hashes of the files under
`SMALL_FILE_BYTES`. A larger file is hashed by the verb that copies or reads it, while it does: `ReadHasher`
hashes it in a thread of its own from the moment the verb first reads it (the two read the same pages of the page
cache), `copy_checked` while copying it; a mismatch fails the verb before its output is renamed into place. The
full check of every byte is `flexmoe verify`. Folders written before manifests existed have no "files" key: they
are read as before, and `verify` says what it could not check.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flexmoe.errors import IntegrityError

MANIFEST_KEY = "files"
# Files below this size are hashed by every reader up front; larger ones (tensor shards) by the verbs that copy or
# read them, while they do. A module constant, so tests can lower it to make small files "large".
SMALL_FILE_BYTES = 64 * 2**20
MAX_HASH_THREADS = 8  # files hashed at once by `check` (flexmoe verify): beyond that the disk sets the pace
_CHUNK = 8 * 2**20
_READ_CHUNK = 4 * 2**20  # ReadHasher / copy_checked: one such buffer per file being checked


def _writeback_starter():
    """Linux's sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE), or None: starts writing pages to disk without
    waiting, so the fsync that ends every atomic output finds little left to write."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint], ctypes.c_int
    return lambda fd, offset, n: fn(fd, offset, n, 2)


_start_writeback = _writeback_starter()


def _hash_range(f, h, nbytes: int, buf: memoryview) -> int:
    """Hash up to `nbytes` of the open unbuffered file `f` into `h` through `buf`; returns the bytes read."""
    done = 0
    while done < nbytes:
        n = f.readinto(buf[: min(len(buf), nbytes - done)])
        if not n:
            break
        h.update(buf[:n])
        done += n
    return done


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


class TailHasher:
    """sha256 of a file that another thread is still writing, computed behind the writer in a thread of its own.

    The writer calls `advance(n)` once the first n bytes are on disk (page cache) and `finish()` when the file is
    complete; the thread reads and hashes the new bytes meanwhile (reads and hashlib release the GIL), so the
    hash costs almost no time on top of the write and no second pass afterwards. Behind the hash it starts the
    writeback of what it hashed (Linux), so the disk writes overlap the hashing instead of following it at the
    final fsync.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._h, self._done, self._target, self._closed = hashlib.sha256(), 0, 0, False
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"sha256 {self.path.name}", daemon=True)
        self._thread.start()

    def advance(self, upto: int) -> None:
        with self._cond:
            self._target = max(self._target, upto)
            self._cond.notify()

    def _run(self) -> None:
        try:
            buf = memoryview(bytearray(_CHUNK))  # read into one buffer: no fresh 8 MiB object (page faults) per chunk
            with open(self.path, "rb", buffering=0) as f:
                while True:
                    with self._cond:
                        while self._done >= self._target and not self._closed:
                            self._cond.wait()
                        if self._done >= self._target and self._closed:
                            return
                        want = min(self._target - self._done, _CHUNK)
                    got = _hash_range(f, self._h, want, buf)
                    if got != want:
                        raise OSError(f"{self.path}: shorter than written ({self._done + got} bytes)")
                    if _start_writeback is not None:  # hashed bytes go to disk now, while the rest is hashed
                        _start_writeback(f.fileno(), self._done, got)
                    self._done += got
        except BaseException as e:  # reported by finish()
            self._error = e

    def finish(self, size: int) -> FileEntry:
        """Wait for the hash of the complete file of `size` bytes, and remember it for `hash_file`."""
        self.advance(size)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        entry = FileEntry(size=self._done, sha256=self._h.hexdigest())
        _known[_identity(self.path)] = (self.path, entry)
        return entry

    def abandon(self) -> None:
        with self._cond:
            self._closed, self._target = True, self._done
            self._cond.notify()
        self._thread.join()


class ReadHasher:
    """sha256 of an input file, read from start to end in a thread of its own while a verb reads the same file.

    Started when the verb first reads the file (`LazyReader.hash_reads`), so both read the same pages while they
    are in the page cache, and the hash takes another core instead of a pass of its own; `check` waits for it and
    compares it with the manifest. Works for any order of the verb's reads.
    """

    def __init__(self, path: Path, want: FileEntry, remake: str):
        self.path, self.want, self.remake = Path(path), want, remake
        self._stop = False
        self._got: FileEntry | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"sha256 {self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        h, size, buf = hashlib.sha256(), 0, memoryview(bytearray(_READ_CHUNK))
        try:
            with open(self.path, "rb", buffering=0) as f:
                while not self._stop:
                    n = _hash_range(f, h, len(buf), buf)
                    size += n
                    if n < len(buf):
                        break
        except BaseException as e:  # reported by check()
            self._error = e
            return
        self._got = FileEntry(size=size, sha256=h.hexdigest())

    def check(self) -> None:
        """Wait for the hash; `IntegrityError` (naming the file, both hashes and the fix) if it is not the recorded one."""
        self._thread.join()
        if isinstance(self._error, OSError):
            raise IntegrityError(f"{self.path}: cannot read it ({self._error.strerror or self._error}); "
                                 f"re-copy it from its source, or re-run {self.remake}")
        if self._error is not None:
            raise self._error
        if self._got is None:  # abandoned before it finished
            raise IntegrityError(f"{self.path}: its hash was abandoned before it was checked")
        got, want = self._got, self.want
        if got.size != want.size:
            raise _damaged(self.path.parent, self.path.name, f"{want.size} bytes", f"{got.size} bytes", self.remake)
        if got.sha256 != want.sha256:
            raise _damaged(self.path.parent, self.path.name, f"sha256 {want.sha256[:12]}…", f"sha256 {got.sha256[:12]}…",
                           self.remake)

    def abandon(self) -> None:
        self._stop = True
        self._thread.join()


def copy_checked(src: Path, dst: Path, want: FileEntry, remake: str) -> None:
    """Copy `src` to `dst`, hashing the bytes as they pass; `IntegrityError` if they are not what `want` records
    (the caller's atomic output folder, and with it `dst`, is then discarded)."""
    h, size, buf = hashlib.sha256(), 0, memoryview(bytearray(_READ_CHUNK))
    with open(src, "rb", buffering=0) as fin, open(dst, "wb") as fout:
        while n := fin.readinto(buf):
            h.update(buf[:n])
            fout.write(buf[:n])
            size += n
    if size != want.size:
        raise _damaged(src.parent, src.name, f"{want.size} bytes", f"{size} bytes", remake)
    if h.hexdigest() != want.sha256:
        raise _damaged(src.parent, src.name, f"sha256 {want.sha256[:12]}…", f"sha256 {h.hexdigest()[:12]}…", remake)


# Hashes computed while writing (TailHasher), by file identity, with the path written: `seal` then reads none of
# those bytes again; `forget` drops what no seal took (an output that failed, or one written without a manifest).
_known: dict[tuple, tuple[Path, FileEntry]] = {}


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def hash_file(path: Path, *, written: bool = False) -> FileEntry:
    """Size and sha256 of `path`, read from disk; with `written`, the hash `TailHasher` took while writing it, if
    the file is still the one it wrote (sealing only: a check always reads the bytes)."""
    known = _known.pop(_identity(path), None) if written else None
    if known is not None:
        return known[1]
    h, buf = hashlib.sha256(), memoryview(bytearray(_READ_CHUNK))
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := _hash_range(f, h, len(buf), buf):
            size += n
    return FileEntry(size=size, sha256=h.hexdigest())


def forget(folder: Path) -> None:
    """Drop the write-time hashes of files below `folder` (`atomic_dir`, once its output is done or abandoned)."""
    folder = Path(folder).absolute()
    for key, (path, _) in list(_known.items()):
        if folder in path.absolute().parents:
            _known.pop(key, None)


def build(folder: Path, exclude: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file below `folder` but `exclude`, in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != exclude)
    return {p.relative_to(folder).as_posix(): hash_file(p, written=True).to_json() for p in files}


def seal(folder: Path, meta_name: str) -> None:
    """Record the manifest of `folder` in its JSON metadata file `meta_name` (rewritten in the same layout)."""
    meta_path = folder / meta_name
    data = json.loads(meta_path.read_text())
    data[MANIFEST_KEY] = build(folder, meta_name)
    meta_path.write_text(json.dumps(data, indent=2) + "\n")


def entries(meta: dict, where: Path) -> dict[str, FileEntry] | None:
    """The manifest of a folder's metadata, or None for a folder written before manifests."""
    raw = meta.get(MANIFEST_KEY)
    if raw is None:
        return None
    try:
        return {str(name): FileEntry(size=int(e["size"]), sha256=str(e["sha256"])) for name, e in raw.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{where}: corrupt file manifest ({e}); re-copy the folder from its source") from e


@dataclass(frozen=True)
class Listed:
    """A folder's manifest as its reader checked it: what is recorded, and the command that writes the folder (for
    the fix in an error). The verbs that copy or read its large files hash them against it (`large`)."""

    folder: Path
    entries: dict[str, FileEntry]
    remake: str

    def large(self, path: Path) -> FileEntry | None:
        """The entry of `path` if it is a file of this folder the readers did not hash up front (>= SMALL_FILE_BYTES)."""
        e = self.entries.get(Path(path).name)  # readers only open files of their own folder
        return e if e is not None and e.size >= SMALL_FILE_BYTES else None


def _damaged(folder: Path, name: str, expected: str, found: str, remake: str) -> IntegrityError:
    return IntegrityError(f"{folder / name}: {found}, the manifest says {expected}; re-copy it from its source, "
                          f"or re-run {remake}")


def check(folder: Path, meta: dict, meta_name: str, *, remake: str, hashed: tuple[str, ...] = ()) -> Listed | None:
    """Check every listed file's size, and the sha256 of those in `hashed` ("*" = all). None: no manifest.

    `remake` names the command that writes this folder, for the error message.
    """
    listed = entries(meta, folder / meta_name)
    if listed is None:
        return None
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (the manifest lists it); re-copy the folder from its source, "
                                 f"or re-run {remake}")
        size = path.stat().st_size
        if size != want.size:
            raise _damaged(folder, name, f"{want.size} bytes", f"{size} bytes", remake)
    names = [name for name in listed if "*" in hashed or name in hashed]
    # one sha256 is one core's work (~1.7 GB/s): the files are hashed at once, a thread each (hashlib lets go of
    # the GIL), and a mismatch is reported for the first damaged file in manifest order whatever finishes first
    workers = min(len(names), os.cpu_count() or 1, MAX_HASH_THREADS)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sha256") as pool:
        for name, got in zip(names, pool.map(lambda n: hash_file(folder / n).sha256, names)):
            want = listed[name]
            if got != want.sha256:
                pool.shutdown(cancel_futures=True)
                raise _damaged(folder, name, f"sha256 {want.sha256[:12]}…", f"sha256 {got[:12]}…", remake)
    return Listed(folder=Path(folder), entries=listed, remake=remake)


def small_files(meta: dict, limit: int | None = None) -> tuple[str, ...]:
    """The listed files under `limit` bytes (default `SMALL_FILE_BYTES`): cheap enough for every reader to hash
    up front (sidecars, JSON, tokenizer, small shards)."""
    limit = SMALL_FILE_BYTES if limit is None else limit
    return tuple(name for name, e in (meta.get(MANIFEST_KEY) or {}).items()
                 if isinstance(e, dict) and int(e.get("size", limit)) < limit)
