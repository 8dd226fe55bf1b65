"""Lazy, read-only access to the tensors of a model directory, a single safetensors file or an index.

Nothing is loaded until asked for; `copy_to` moves a tensor's raw bytes between files in the kernel. A verb that
copies or reads a folder's tensors checks them with `hash_reads` / `check_reads`: every large shard it reads is
hashed against the folder's manifest while it does (flexmoe/io/manifest.py).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterator

import torch

from flexmoe.errors import CheckpointError
from flexmoe.io import manifest
from flexmoe.io.safetensors_format import DTYPE_TO_TORCH, TensorLocation, TensorSpec, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files a model directory consists of, validated to exist. Index first, like transformers."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupt index (no weight_map)") from e
        if not all(isinstance(f, str) and f and Path(f).name == f for f in files):
            raise CheckpointError(f"{index}: corrupt index (shard names must be plain file names)")
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard {missing[0]} named in {INDEX_NAME} is missing")
        return [model_dir / f for f in files]
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    if model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}; is it a model directory?")
    raise CheckpointError(f"{model_dir}: no such directory")


class LazyReader:
    """Maps tensor names to locations in one or more safetensors files and reads tensors by positional reads
    (`os.pread`, `os.copy_file_range` at an offset), so several threads may read through one reader at once (the
    ShardWriter writes shards in parallel). Each file read is opened once and stays open until `close`.

    `listed`: the manifest of the files' folder, as its reader checked it; `hash_reads` then hashes each large file
    against it from the moment it is first read.
    """

    def __init__(self, files: list[Path], *, listed: manifest.Listed | None = None):
        self.files = [Path(f) for f in files]
        self.listed = listed
        self._hashing: dict[Path, manifest.ReadHasher] | None = None
        self._loc: dict[str, TensorLocation] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            locs, meta = read_header(f)
            dup = self._loc.keys() & locs.keys()
            if dup:
                raise CheckpointError(f"{f}: tensor {sorted(dup)[0]!r} appears in two shards")
            self._loc.update(locs)
            self.metadata.update(meta)
        self._fds: dict[Path, int] = {}  # every file read so far, open
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, listed: manifest.Listed | None = None) -> "LazyReader":
        """The folder's tensors under flexmoe's canonical names: a family whose MoE class saves other names
        (Mixtral's block_sparse_moe.experts.{e}.w1) is read through `Family.from_disk`."""
        reader = cls(model_files(Path(model_dir)), listed=listed)
        reader._canonical(Path(model_dir))
        return reader

    def _canonical(self, model_dir: Path) -> None:
        import json

        from flexmoe.io import families

        try:
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return
        fam = families.of_moe(model_type)
        if fam is not None and fam.canonical_names:
            self._loc = {fam.from_disk(k): loc for k, loc in self._loc.items()}

    @classmethod
    def from_file(cls, path: str | Path, *, listed: manifest.Listed | None = None) -> "LazyReader":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return cls([path], listed=listed)

    def hash_reads(self, *, now: bool = False) -> None:
        """From here on, hash every large listed file (`manifest.Listed.large`) in a thread of its own from the
        moment this reader first reads it (with `now`: all of them at once, for a reader of the same files that
        is not this one, e.g. transformers); `check_reads` compares. A no-op without a manifest."""
        with self._lock:
            if self._hashing is None:
                self._hashing = {}
            if now:
                for f in self.files:
                    self._start_hash(f)
            for f in self._fds:  # read before this call: still hashed (from the start, like all of them)
                self._start_hash(f)

    def _start_hash(self, path: Path) -> None:
        want = self.listed.large(path) if self.listed is not None else None
        if want is not None and path not in self._hashing:
            self._hashing[path] = manifest.ReadHasher(path, want, self.listed.remake)

    def check_reads(self) -> None:
        """Wait for the hashes `hash_reads` started; `IntegrityError` for a file that is not the one recorded."""
        for hasher in (self._hashing or {}).values():
            hasher.check()

    def keys(self) -> list[str]:
        return sorted(self._loc)

    def __contains__(self, key: str) -> bool:
        return key in self._loc

    def spec(self, key: str) -> TensorSpec:
        return self._location(key).spec

    def _location(self, key: str) -> TensorLocation:
        try:
            return self._loc[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} not found in {self.files[0].parent}") from None

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
                if self._hashing is not None:
                    self._start_hash(path)
            return self._fds[path]

    def _read_into(self, loc: TensorLocation, view: memoryview, offset: int, key: str) -> None:
        """Fill `view` with the bytes of `loc`'s file from `offset` on."""
        fd, done = self._fd(loc.path), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise CheckpointError(f"{loc.path}: truncated while reading {key!r}")
            done += n

    def read_bytes(self, key: str) -> bytes:
        loc = self._location(key)
        buf = bytearray(loc.spec.nbytes)
        self._read_into(loc, memoryview(buf), loc.offset, key)
        return bytes(buf)

    def read_chunks(self, key: str, chunk_bytes: int = 64 * 2**20) -> Iterator[bytes]:
        """The raw bytes of `key` in pieces of at most `chunk_bytes`, so hashing a large tensor stays bounded."""
        loc = self._location(key)
        for start in range(0, loc.spec.nbytes, chunk_bytes):
            buf = bytearray(min(chunk_bytes, loc.spec.nbytes - start))
            self._read_into(loc, memoryview(buf), loc.offset + start, key)
            yield bytes(buf)

    def get(self, key: str) -> torch.Tensor:
        """A fresh CPU tensor (owns its memory; safe to modify)."""
        loc = self._location(key)
        flat = torch.empty(loc.spec.nbytes, dtype=torch.uint8)
        if loc.spec.nbytes:
            # read into the tensor's own buffer: one copy of the data in memory, not two (bytes + bytearray).
            self._read_into(loc, memoryview(flat.numpy()), loc.offset, key)
        return flat.view(DTYPE_TO_TORCH[loc.spec.dtype]).reshape(loc.spec.shape)

    def copy_to(self, key: str, dst_fd: int) -> None:
        """Append the raw bytes of `key` to the file `dst_fd` at its current position, in-kernel when possible."""
        loc = self._location(key)
        src = self._fd(loc.path)
        remaining, offset = loc.spec.nbytes, loc.offset
        while remaining:
            try:
                n = os.copy_file_range(src, dst_fd, remaining, offset)
            except (AttributeError, OSError):
                n = 0
            if n <= 0:  # no in-kernel copy here (or across filesystems): chunked user-space copy
                chunk = os.pread(src, min(remaining, 64 * 2**20), offset)
                if not chunk:
                    raise CheckpointError(f"{loc.path}: truncated while reading {key!r}")
                n = os.write(dst_fd, chunk)
            remaining -= n
            offset += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        for hasher in (self._hashing or {}).values():
            hasher.abandon()  # a no-op once checked; else the verb failed or stopped early: stop hashing
        self._hashing = None

    def __enter__(self) -> "LazyReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
