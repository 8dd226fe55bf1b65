"""Bounded shard writer: tensors stream straight to their shard file in a planned order.

The caller first declares every tensor (name, dtype, shape); shards are assigned up front, so each shard's
header can be written before its data and no shard is ever buffered in memory. Peak memory is one tensor,
independent of model size. Output names follow transformers: `model.safetensors` for one shard, else
`model-0000i-of-0000n.safetensors`. A model (prefix `model`) always gets `model.safetensors.index.json`, also for
one shard: serving engines that glob `*.safetensors` (vLLM) load exactly the files the index names, never the
flexmoe sidecars beside them (docs/FORMAT.md, "Serving layout").
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from flexmoe.errors import CheckpointError
from flexmoe.io import manifest
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import TensorSpec, encode_header, read_header, tensor_bytes

DEFAULT_SHARD_BYTES = 5 * 10**9
NO_SHARD_LIMIT = 2**62  # max_shard_bytes of a file that is always one shard (packages, sidecars)
MODEL_PREFIX = "model"
INDEX_NAME = "model.safetensors.index.json"


def _dump_index(path: Path, total_size: int, weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    path.write_text(json.dumps(index, indent=2) + "\n")


def ensure_index(model_dir: str | Path) -> None:
    """Give a one-file model folder (`model.safetensors`, no index: what `save_pretrained` writes) the index that
    a sharded one has, so that `*.safetensors` globbing engines read only the model's tensors."""
    model_dir = Path(model_dir)
    single = model_dir / f"{MODEL_PREFIX}.safetensors"
    if (model_dir / INDEX_NAME).is_file() or not single.is_file():
        return
    locs = sorted(read_header(single)[0].values(), key=lambda loc: loc.offset)  # file order
    _dump_index(model_dir / INDEX_NAME, sum(loc.spec.nbytes for loc in locs), {loc.spec.name: single.name for loc in locs})


def _write_all(fd: int, data) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _planned(specs: list[TensorSpec], i: int, name: str) -> TensorSpec:
    """specs[i], which the caller is about to write as `name`; a `CheckpointError` if it is not that one."""
    if i >= len(specs):
        raise CheckpointError(f"tensor {name!r} was not declared")
    if specs[i].name != name:
        raise CheckpointError(f"tensors written out of order: got {name!r}, expected {specs[i].name!r}")
    return specs[i]


class _ShardFile:
    """One shard file being written: its header first, then its tensors in their planned order, each shard's sha256
    computed behind the writes (`manifest.TailHasher`, for the manifest)."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None):
        self.path, self.specs, self._next = path, specs, 0
        header, _ = encode_header(specs, metadata)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(self.fd, header)
            self._hasher = manifest.TailHasher(path)
        except BaseException:
            os.close(self.fd)
            raise
        self._hasher.advance(len(header))

    def _expect(self, name: str) -> TensorSpec:
        return _planned(self.specs, self._next, name)

    def _advance(self) -> None:
        self._next += 1
        self._hasher.advance(os.lseek(self.fd, 0, os.SEEK_CUR))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expect(name)
        if TensorSpec.of(name, tensor) != spec:
            raise CheckpointError(f"tensor {name!r} is {TensorSpec.of(name, tensor)}, planned {spec}")
        _write_all(self.fd, tensor_bytes(tensor))
        self._advance()

    def copy_from(self, name: str, reader: LazyReader, key: str | None = None) -> None:
        """Copy tensor `key` (default: `name`) of `reader` as raw bytes, without deserialising it."""
        spec = self._expect(name)
        src = reader.spec(key or name)
        if (src.dtype, src.shape) != (spec.dtype, spec.shape):
            raise CheckpointError(f"tensor {key or name!r} is {src.dtype}{list(src.shape)}, planned {spec.dtype}{list(spec.shape)}")
        reader.copy_to(key or name, self.fd)
        self._advance()

    def close(self, *, complete: bool = True) -> None:
        size = os.lseek(self.fd, 0, os.SEEK_CUR)
        os.close(self.fd)
        if complete:
            self._hasher.finish(size)
        else:
            self._hasher.abandon()


class ShardWriter:
    """Write the declared tensors, in declaration order, into HF-named shards in `out_dir`: one tensor at a time
    (`write` / `copy_from`), or every shard at once on threads of their own (`write_parallel`).

    Args:
        out_dir: an existing (temporary) directory.
        specs: every tensor to be written, in the order `write`/`copy_from` will be called.
        max_shard_bytes: a shard is closed before it would exceed this (a larger tensor gets its own shard).
        prefix: file stem, `model` for models, `expert` for expert packages.
        metadata: string metadata stored in every shard header.
        index: write `{prefix}.safetensors.index.json` also for one shard (default: for models, prefix `model`).
    """

    def __init__(self, out_dir: str | Path, specs: Sequence[TensorSpec], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 prefix: str = MODEL_PREFIX, metadata: dict[str, str] | None = None, index: bool | None = None):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.index = prefix == MODEL_PREFIX if index is None else index
        self.metadata = metadata
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CheckpointError("duplicate tensor names in output plan")
        self._shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if self._shards[-1] and size + s.nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append(s)
            size += s.nbytes
        self._order = [s for shard in self._shards for s in shard]
        self._shard_of = [i for i, shard in enumerate(self._shards) for _ in shard]
        self._next = 0
        self._file: _ShardFile | None = None
        self.total_size = sum(s.nbytes for s in specs)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shard_name(self, i: int) -> str:
        n = len(self._shards)
        return f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"

    def _open(self, i: int) -> _ShardFile:
        return _ShardFile(self.out_dir / self.shard_name(i), self._shards[i], self.metadata)

    def _current(self, name: str) -> _ShardFile:
        """The open shard of the next declared tensor, which must be `name`."""
        _planned(self._order, self._next, name)
        if self._file is None or self._file.specs is not self._shards[self._shard_of[self._next]]:
            self._close_file()
            self._file = self._open(self._shard_of[self._next])
        return self._file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._current(name).write(name, tensor)
        self._next += 1

    def copy_from(self, name: str, reader: LazyReader, key: str | None = None) -> None:
        """Copy tensor `key` (default: `name`) of `reader` as raw bytes, without deserialising it."""
        self._current(name).copy_from(name, reader, key)
        self._next += 1

    def write_parallel(self, emit: Callable[[str, _ShardFile], None], workers: int) -> None:
        """Write every declared tensor, up to `workers` shards at once, each by a thread of its own: `emit(name,
        sink)` writes tensor `name` through `sink.write` / `sink.copy_from`. Copies, hashes and disk writeback of
        several shards then overlap (one shard's sha256 is sequential, ~1.7 GB/s a core). The first error stops
        the other shards and is raised."""
        if self._next or self._file is not None:
            raise CheckpointError("write_parallel after write / copy_from")
        stop = threading.Event()

        def one(i: int) -> None:
            f, done = self._open(i), False
            try:
                for spec in self._shards[i]:
                    if stop.is_set():
                        return
                    emit(spec.name, f)
                done = True
            except BaseException:
                stop.set()
                raise
            finally:
                f.close(complete=done)

        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="shard") as pool:
            futures = [pool.submit(one, i) for i in range(len(self._shards)) if self._shards[i]]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:
            raise errors[0]
        self._next = len(self._order)

    def _close_file(self, *, complete: bool = True) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close(complete=complete)

    def finalize(self) -> list[str]:
        """Close the last shard, write the index if there are several (or always, for a model); returns the shard
        file names."""
        if self._next != len(self._order):
            raise CheckpointError(f"only {self._next} of {len(self._order)} planned tensors were written")
        if not self._order:  # an empty plan still yields a valid (empty) file
            self._file = self._open(0)
        self._close_file()
        names = [self.shard_name(i) for i in range(len(self._shards))]
        if len(names) > 1 or self.index:
            _dump_index(self.out_dir / f"{self.prefix}.safetensors.index.json", self.total_size,
                        {s.name: self.shard_name(i) for i, shard in enumerate(self._shards) for s in shard})
        return names

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._close_file(complete=exc_type is None)
