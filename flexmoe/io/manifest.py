"""Content manifests: each file's size and sha256, kept in the folder's own flexmoe JSON under "files".

Every folder flexmoe writes (anchor, expert package, merged or tuned checkpoint, baselines) is sealed just before
its atomic rename: `seal` records each file of the finished temporary folder in the metadata file, which cannot
list itself. Tensor shards are hashed while the ShardWriter writes them (`TailHasher`); only the other files
(JSON, tokenizer, files written by transformers) are read back to be hashed. Readers check the sizes of every listed file at once (`check`) and the hashes of what they name; the
full check of every byte is `flexmoe verify`. Folders written before manifests existed have no "files" key: they
are read as before, and `verify` says what it could not check.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from flexmoe.errors import IntegrityError

MANIFEST_KEY = "files"
_CHUNK = 8 * 2**20


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
    hash costs almost no time on top of the write and no second pass afterwards.
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
            with open(self.path, "rb") as f:
                while True:
                    with self._cond:
                        while self._done >= self._target and not self._closed:
                            self._cond.wait()
                        if self._done >= self._target and self._closed:
                            return
                        want = min(self._target - self._done, _CHUNK)
                    data = f.read(want)
                    if len(data) != want:
                        raise OSError(f"{self.path}: shorter than written ({self._done + len(data)} bytes)")
                    self._h.update(data)
                    self._done += len(data)
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
        _known[_identity(self.path)] = entry
        return entry

    def abandon(self) -> None:
        with self._cond:
            self._closed, self._target = True, self._done
            self._cond.notify()
        self._thread.join()


# Hashes computed while writing (TailHasher), by file identity: `seal` then reads none of those bytes again.
_known: dict[tuple, FileEntry] = {}


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def hash_file(path: Path, *, written: bool = False) -> FileEntry:
    """Size and sha256 of `path`, read from disk; with `written`, the hash `TailHasher` took while writing it, if
    the file is still the one it wrote (sealing only: a check always reads the bytes)."""
    known = _known.pop(_identity(path), None) if written else None
    if known is not None:
        return known
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, sha256=h.hexdigest())


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


def _damaged(folder: Path, name: str, expected: str, found: str, remake: str) -> IntegrityError:
    return IntegrityError(f"{folder / name}: {found}, the manifest says {expected}; re-copy it from its source, "
                          f"or re-run {remake}")


def check(folder: Path, meta: dict, meta_name: str, *, remake: str, hashed: tuple[str, ...] = ()) -> bool:
    """Check every listed file's size, and the sha256 of those in `hashed` ("*" = all). False: no manifest.

    `remake` names the command that writes this folder, for the error message.
    """
    listed = entries(meta, folder / meta_name)
    if listed is None:
        return False
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (the manifest lists it); re-copy the folder from its source, "
                                 f"or re-run {remake}")
        size = path.stat().st_size
        if size != want.size:
            raise _damaged(folder, name, f"{want.size} bytes", f"{size} bytes", remake)
    for name, want in listed.items():
        if "*" in hashed or name in hashed:
            got = hash_file(folder / name).sha256
            if got != want.sha256:
                raise _damaged(folder, name, f"sha256 {want.sha256[:12]}…", f"sha256 {got[:12]}…", remake)
    return True


def small_files(meta: dict, limit: int = 64 * 2**20) -> tuple[str, ...]:
    """The listed files under `limit` bytes: cheap enough for every reader to hash (sidecars, JSON, tokenizer)."""
    return tuple(name for name, e in (meta.get(MANIFEST_KEY) or {}).items()
                 if isinstance(e, dict) and int(e.get("size", limit)) < limit)
