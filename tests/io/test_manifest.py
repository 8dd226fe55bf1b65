"""flexmoe/io/manifest.py: `check`, the full hash of a folder (`flexmoe verify`)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from flexmoe.errors import IntegrityError
from flexmoe.io import manifest


def _sealed_folder(root: Path, n: int = 6) -> tuple[Path, dict]:
    folder = root / "ckpt"
    folder.mkdir()
    for i in range(n):
        (folder / f"model-{i:05d}-of-{n:05d}.safetensors").write_bytes(os.urandom(2 * 2**20 + i))
    return folder, {manifest.MANIFEST_KEY: manifest.build(folder, "flexmoe.json")}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_is_hashed_and_on_threads_of_its_own(tmp_path, monkeypatch):
    folder, meta = _sealed_folder(tmp_path)
    seen: dict[str, str] = {}
    real = manifest.hash_file

    def recording(path, **kw):
        seen[Path(path).name] = threading.current_thread().name
        return real(path, **kw)

    monkeypatch.setattr(manifest, "hash_file", recording)
    listed = manifest.check(folder, meta, "flexmoe.json", remake="flexmoe merge", hashed=("*",))
    assert sorted(seen) == sorted(meta[manifest.MANIFEST_KEY]) == sorted(listed.entries)
    assert all(name.startswith("sha256") for name in seen.values())  # not on the caller's thread
    if (os.cpu_count() or 1) > 1:
        assert len(set(seen.values())) > 1  # one sha256 is one core's work: several at once


def test_the_first_damaged_file_in_manifest_order_is_named(tmp_path):
    folder, meta = _sealed_folder(tmp_path)
    names = list(meta[manifest.MANIFEST_KEY])
    for name in (names[4], names[1]):  # damaged in reverse order, so neither finish order nor damage order names it
        _flip_last_byte(folder / name)
    for _ in range(3):
        with pytest.raises(IntegrityError) as e:
            manifest.check(folder, meta, "flexmoe.json", remake="flexmoe merge", hashed=("*",))
        msg = str(e.value)
        assert names[1] in msg and names[4] not in msg and "re-run flexmoe merge" in msg


def test_only_the_named_files_are_hashed(tmp_path):
    folder, meta = _sealed_folder(tmp_path)
    names = list(meta[manifest.MANIFEST_KEY])
    _flip_last_byte(folder / names[0])  # same size: only its hash can tell
    assert manifest.check(folder, meta, "flexmoe.json", remake="x", hashed=(names[1],)) is not None
    with pytest.raises(IntegrityError, match=names[0]):
        manifest.check(folder, meta, "flexmoe.json", remake="x", hashed=(names[0],))
