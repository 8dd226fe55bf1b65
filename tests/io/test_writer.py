"""ShardWriter: declared plan, HF shard names + index, raw copies; its output is read by the official library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexmoe.errors import CheckpointError
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import TensorSpec
from flexmoe.io.writer import ShardWriter


def test_shards_index_and_official_reader(tmp_path):
    ts = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    ts["big"] = torch.randn(50, 10)  # 2000 bytes: larger than a shard, gets its own
    ts["s"] = torch.tensor(3, dtype=torch.int32)
    with ShardWriter(tmp_path, [TensorSpec.of(k, v) for k, v in ts.items()], max_shard_bytes=1000) as w:
        for k, v in ts.items():
            w.write(k, v)
        names = w.finalize()
    # [t0 t1] [t2 t3] [t4] [big] [s]: a shard closes before it would pass the limit
    assert names == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    assert index["weight_map"]["t0"] == names[0] and index["weight_map"]["big"] == names[3]
    loaded = {}
    for n in names:
        loaded.update(load_file(str(tmp_path / n)))
        with safe_open(str(tmp_path / n), "pt") as f:
            assert f.metadata()["format"] == "pt"
    assert loaded.keys() == ts.keys() and all(torch.equal(loaded[k], ts[k]) for k in ts)


def test_single_file_copy_from_and_order(tmp_path):
    src = {"x": torch.randn(4, 3).to(torch.bfloat16), "y": torch.arange(6)}
    save_file(src, str(tmp_path / "src.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    with LazyReader.from_file(tmp_path / "src.safetensors") as r:
        specs = [TensorSpec("renamed", "BF16", (4, 3)), TensorSpec("new", "F32", (2,))]
        with ShardWriter(out, specs, prefix="expert") as w:
            with pytest.raises(CheckpointError, match="out of order"):
                w.write("new", torch.zeros(2))
            w.copy_from("renamed", r, "x")
            with pytest.raises(CheckpointError, match="planned"):
                w.write("new", torch.zeros(3))
            w.write("new", torch.ones(2))
            assert w.finalize() == ["expert.safetensors"]
    got = load_file(str(out / "expert.safetensors"))
    assert torch.equal(got["renamed"], src["x"]) and torch.equal(got["new"], torch.ones(2))
    assert not (out / "expert.safetensors.index.json").exists()


def test_plan_errors(tmp_path):
    with pytest.raises(CheckpointError, match="duplicate"):
        ShardWriter(tmp_path, [TensorSpec("a", "F32", (1,))] * 2)
    w = ShardWriter(tmp_path, [TensorSpec("a", "F32", (1,)), TensorSpec("b", "F32", (1,))])
    w.write("a", torch.zeros(1))
    with pytest.raises(CheckpointError, match="only 1 of 2"):
        w.finalize()
    with pytest.raises(CheckpointError, match="shape|F32"):
        w.copy_from("b", _reader_of(tmp_path, torch.zeros(2)), "t")
    w.write("b", torch.zeros(1))
    with pytest.raises(CheckpointError, match="not declared"):
        w.write("c", torch.zeros(1))
    w.finalize()


def _reader_of(tmp_path, t):
    save_file({"t": t}, str(tmp_path / "r.safetensors"))
    return LazyReader.from_file(tmp_path / "r.safetensors")


def test_empty_plan_is_a_valid_file(tmp_path):
    with ShardWriter(tmp_path, []) as w:
        w.finalize()
    assert load_file(str(tmp_path / "model.safetensors")) == {}


def test_shards_are_hashed_as_they_are_written(tmp_path):
    """The manifest's sha256 of a shard comes from the writer's tail hasher, and equals a hash of the file."""
    import hashlib

    from flexmoe.io import manifest
    from flexmoe.io.safetensors_format import TensorSpec
    from flexmoe.io.writer import ShardWriter

    tensors = {f"t{i}": torch.randn(1000 + i) for i in range(20)}
    with ShardWriter(tmp_path, [TensorSpec.of(k, v) for k, v in tensors.items()], max_shard_bytes=20_000) as w:
        for k, v in tensors.items():
            w.write(k, v)
        names = w.finalize()
    assert len(names) > 1
    for n in names:
        assert manifest._identity(tmp_path / n) in manifest._known  # hashed while written, not read back later
        plain = hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
        assert manifest.hash_file(tmp_path / n, written=True).sha256 == plain


def _write_sequential_and_parallel(tmp_path, ts, workers):
    src = tmp_path / "src.safetensors"
    save_file({"copied": torch.arange(300, dtype=torch.float32)}, str(src))
    specs = [TensorSpec.of(k, v) for k, v in ts.items()] + [TensorSpec("copied", "F32", (300,))]
    outs = []
    with LazyReader.from_file(src) as r:
        for sub in ("seq", "par"):
            (tmp_path / sub).mkdir()
            with ShardWriter(tmp_path / sub, specs, max_shard_bytes=1000) as w:
                if sub == "seq":
                    for k, v in ts.items():
                        w.write(k, v)
                    w.copy_from("copied", r)
                else:
                    w.write_parallel(lambda name, sink: sink.copy_from(name, r) if name == "copied"
                                     else sink.write(name, ts[name]), workers=workers)
                outs.append(w.finalize())
    return outs


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_write_parallel_gives_the_bytes_of_sequential_writes_and_their_hashes(tmp_path, workers):
    import hashlib

    from flexmoe.io import manifest

    ts = {f"t{i}": torch.randn(10, 10) for i in range(7)}
    seq, par = _write_sequential_and_parallel(tmp_path, ts, workers)
    assert seq == par and len(par) == 5
    for name in [*par, "model.safetensors.index.json"]:
        data = (tmp_path / "par" / name).read_bytes()
        assert data == (tmp_path / "seq" / name).read_bytes(), name
        if name.endswith(".safetensors"):  # hashed while written, as the manifest will record it
            assert manifest._identity(tmp_path / "par" / name) in manifest._known  # hashed by its TailHasher
            entry = manifest.hash_file(tmp_path / "par" / name, written=True)
            assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)


def test_write_parallel_stops_at_the_first_error(tmp_path):
    ts = {f"t{i}": torch.randn(10, 10) for i in range(6)}
    specs = [TensorSpec.of(k, v) for k, v in ts.items()]

    def emit(name, sink):
        sink.write(name, torch.zeros(3) if name == "t2" else ts[name])  # t2 does not match its plan

    with ShardWriter(tmp_path, specs, max_shard_bytes=1000) as w:
        with pytest.raises(CheckpointError, match="'t2' is"):
            w.write_parallel(emit, workers=3)
        with pytest.raises(CheckpointError, match="only 0 of 6"):
            w.finalize()
    with pytest.raises(CheckpointError, match="after write"):
        w2 = ShardWriter(tmp_path / "x", specs)
        (tmp_path / "x").mkdir()
        w2.write("t0", ts["t0"])
        w2.write_parallel(emit, workers=2)
