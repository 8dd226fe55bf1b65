"""atomic_dir: all or nothing, overwrite by swap, recovery of what a killed run left."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from flexmoe.errors import OutputExistsError
from flexmoe.io.atomic import atomic_dir, atomic_write_text, check_output


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.flexmoe-tmp.") and not out.exists()
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ending", ["error", "no-seal", "seal"])
def test_write_time_hashes_do_not_outlive_the_output(tmp_path, ending):
    """The shard hashes a writer keeps for `seal` are dropped with the temp dir, whichever way it ends: a stale one
    could otherwise stand for a later file that reuses the inode (same size and mtime)."""
    import json

    import torch

    from flexmoe.io import manifest
    from flexmoe.io.safetensors_format import TensorSpec
    from flexmoe.io.writer import ShardWriter

    tensors = {f"t{i}": torch.randn(1000) for i in range(4)}
    under = lambda folder: [p for p, _ in manifest._known.values() if folder in p.parents]  # noqa: E731
    with pytest.raises(RuntimeError) if ending == "error" else contextlib.nullcontext():
        with atomic_dir(tmp_path / "out", seal="meta.json" if ending == "seal" else None) as tmp:
            (tmp / "meta.json").write_text(json.dumps({"format": "test"}))
            with ShardWriter(tmp, [TensorSpec.of(k, v) for k, v in tensors.items()], max_shard_bytes=8_000) as w:
                for k, v in tensors.items():
                    w.write(k, v)
                w.finalize()
            assert len(under(tmp)) == 2  # hashed while written
            if ending == "error":
                raise RuntimeError("after the shards")
    assert under(tmp) == []
    if ending == "seal":
        assert len(json.loads((tmp_path / "out" / "meta.json").read_text())[manifest.MANIFEST_KEY]) == 3


def test_existing_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("1")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(out, False)
    with pytest.raises(OutputExistsError):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old output
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("2")
            raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    with atomic_dir(out, overwrite=True) as tmp:
        assert (out / "old").exists()  # the input stays readable while the new output is built
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_removed_and_orphaned_old_restored(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".out.flexmoe-tmp.{dead}").mkdir()  # a killed run's half output
    (tmp_path / f".out.flexmoe-tmp.{os.getpid()}x").mkdir()  # not ours: left alone
    with atomic_dir(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.flexmoe-tmp.{os.getpid()}x", "out"]
    # A run killed between its two renames: the previous output is only in the .old folder. Put it back.
    (tmp_path / "out").rmdir()
    old = tmp_path / f".out.flexmoe-old.{dead}"
    old.mkdir()
    (old / "keep").write_text("precious")
    with pytest.raises(OutputExistsError):
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "keep").read_text() == "precious" and not old.exists()
    with atomic_dir(tmp_path / "out", overwrite=True):
        pass
    assert not old.exists()


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "d" / "f.json", "{}")
    atomic_write_text(tmp_path / "d" / "f.json", "[]")
    assert (tmp_path / "d" / "f.json").read_text() == "[]" and len(list((tmp_path / "d").iterdir())) == 1


def test_a_writer_that_finishes_second_never_replaces_the_first(tmp_path):
    """Both started before either finished (so both passed check_output): the later one is refused at its rename."""
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="another run"):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("second")
            out.mkdir()  # the other writer's rename lands meanwhile
            (out / "f").write_text("first")
    assert (out / "f").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
