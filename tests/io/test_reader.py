"""LazyReader against files written by the official safetensors library; corrupt input is a CheckpointError."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from flexmoe.errors import CheckpointError
from flexmoe.io.reader import LazyReader, model_files

TENSORS = {"a": torch.randn(3, 4), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(5).to(torch.bfloat16),
           "s": torch.tensor(1.5), "e": torch.zeros(0, 3), "m": torch.tensor([True, False])}


@pytest.fixture
def single(tmp_path):
    save_file(TENSORS, str(tmp_path / "model.safetensors"), metadata={"k": "v"})
    return tmp_path


def test_reads_every_dtype_and_shape(single):
    with LazyReader.from_dir(single) as r:
        assert r.keys() == sorted(TENSORS) and r.metadata["k"] == "v"
        for k, t in TENSORS.items():
            got = r.get(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
            assert r.spec(k).nbytes == t.numel() * t.element_size()
        got = r.get("a")
        got += 1  # owns its memory
        assert torch.equal(r.get("a"), TENSORS["a"])
        assert b"".join(r.read_chunks("a", chunk_bytes=5)) == r.read_bytes("a")
        with pytest.raises(CheckpointError, match="'zz' not found"):
            r.spec("zz")


def test_copy_to_appends_raw_bytes(single, tmp_path):
    fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    with LazyReader.from_dir(single) as r:
        os.write(fd, b"xy")
        r.copy_to("a", fd)
        r.copy_to("c", fd)
        want = b"xy" + r.read_bytes("a") + r.read_bytes("c")
    os.close(fd)
    assert (tmp_path / "dst").read_bytes() == want


def test_sharded_index(tmp_path):
    save_file({"a": TENSORS["a"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": TENSORS["b"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with LazyReader.from_dir(tmp_path) as r:
        assert torch.equal(r.get("b"), TENSORS["b"]) and torch.equal(r.get("a"), TENSORS["a"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        LazyReader.from_dir(tmp_path)
    index["weight_map"]["b"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        model_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="corrupt index"):
        model_files(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"a": TENSORS["a"]}, str(tmp_path / "x.safetensors"))
    save_file({"a": TENSORS["a"]}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match="appears in two shards"):
        LazyReader([tmp_path / "x.safetensors", tmp_path / "y.safetensors"])


def _header_file(path, header, data=b""):
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("case,match", [
    ("short", "shorter than 8 bytes"), ("huge_header", "corrupt or truncated"), ("not_json", "not JSON"),
    ("not_object", "not a JSON object"), ("bad_dtype", "corrupt safetensors header entry 'a'"),
    ("bad_offsets", "corrupt safetensors header entry 'a'"), ("negative_shape", "entry 'a'"),
    ("missing_field", "entry 'a'"), ("truncated_data", "truncated"), ("missing_file", "no such file"),
    ("empty_dir", "no model.safetensors"), ("no_dir", "no such directory")])
def test_corrupt_files_are_checkpoint_errors(tmp_path, case, match):
    f = tmp_path / "model.safetensors"
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "short":
        f.write_bytes(b"abc")
    elif case == "huge_header":
        f.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "not_json":
        _header_file(f, b"{nope")
    elif case == "not_object":
        _header_file(f, [1, 2])
    elif case == "bad_dtype":
        _header_file(f, {"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "bad_offsets":
        _header_file(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8)
    elif case == "negative_shape":
        _header_file(f, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, -8]}}, b"\0" * 8)
    elif case == "missing_field":
        _header_file(f, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    elif case == "truncated_data":
        _header_file(f, good, b"\0" * 7)
    if case == "missing_file":
        call = lambda: LazyReader.from_file(tmp_path / "nope.safetensors")  # noqa: E731
    elif case == "no_dir":
        call = lambda: LazyReader.from_dir(tmp_path / "nope")  # noqa: E731
    else:
        call = lambda: LazyReader.from_dir(tmp_path)  # noqa: E731
    with pytest.raises(CheckpointError, match=match):
        call()
