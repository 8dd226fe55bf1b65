"""Serving layout: every model folder flexmoe writes has a `model.safetensors.index.json` naming exactly its model
shards, so engines that glob `*.safetensors` and filter by the index (vLLM) never read the flexmoe sidecars; stock
transformers loads each folder without warnings; folders written before the index existed still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


from flexmoe.api import adopt, init_anchor, merge, remove, add
from flexmoe.config import AddConfig, AdoptConfig, InitAnchorConfig, MergeConfig, RemoveConfig
from flexmoe.io.merged import read_merged
from flexmoe.io.reader import LazyReader
from flexmoe.testing import drop_manifest, save_flex_olmo_on_anchor, save_random_flex_olmo, stock_loads_clean

SIDECARS = {"flexmoe_router.safetensors", "flexmoe_router_bias.safetensors"}


def check_layout(folder: Path) -> list[str]:
    """The index names exactly the top-level model shards; the only other top-level *.safetensors are sidecars."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    top = {p.name for p in folder.glob("*.safetensors")}
    assert shards and all(s.startswith("model") for s in shards)
    assert top - shards <= SIDECARS and shards <= top
    with LazyReader.from_dir(folder) as r:
        assert set(index["weight_map"]) == set(r.keys())
        assert index["metadata"]["total_size"] == sum(r.spec(k).nbytes for k in r.keys())
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def folders(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    pkgs = [ckpt.pkg["code"], ckpt.pkg["news"]]
    out = {"anchor": ckpt.anchor}
    merge(MergeConfig(ckpt.anchor, pkgs), root / "merged", progress=False)
    out["merged"] = root / "merged"
    merge(MergeConfig(ckpt.anchor, pkgs, shard_size="100KB"), root / "merged-sharded", progress=False)
    out["merged-sharded"] = root / "merged-sharded"
    remove(RemoveConfig(root / "merged", "news"), root / "removed", progress=False)
    out["removed"] = root / "removed"
    add(AddConfig(root / "removed", ckpt.pkg["law"]), root / "added", progress=False)
    out["added"] = root / "added"
    stock = save_random_flex_olmo(root / "stock3", num_experts=3)  # a single model.safetensors, no index
    adopt(AdoptConfig(stock, ["public", "a", "b"]), root / "adopted", progress=False)
    out["adopted"] = root / "adopted"
    public2x = save_flex_olmo_on_anchor(root / "public2x", ckpt.anchor, seed=1)
    init_anchor(InitAnchorConfig(from_moe=public2x), root / "anchor-from-moe", progress=False)
    out["anchor-from-moe"] = root / "anchor-from-moe"
    return out


@pytest.mark.parametrize("kind", ["anchor", "merged", "merged-sharded", "removed", "added", "adopted",
                                  "anchor-from-moe"])
def test_every_folder_kind_has_an_index_of_exactly_its_shards(folders, kind, capfd):
    listing = check_layout(folders[kind])
    print(kind, listing)
    stock_loads_clean(folders[kind], capfd)


def test_folders_without_index_still_read(folders, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folders["merged"], old)
    (old / "model.safetensors.index.json").unlink()
    drop_manifest(old)  # as written before the index (and the manifest naming it) existed
    m = read_merged(old)
    m.close()
    remove(RemoveConfig(old, "news"), tmp_path / "new", progress=False)
    check_layout(tmp_path / "new")
    with LazyReader.from_dir(tmp_path / "new") as a, LazyReader.from_dir(folders["removed"]) as b:
        assert all(a.read_bytes(k) == b.read_bytes(k) for k in a.keys()) and a.keys() == b.keys()
    assert torch.equal(read_merged(tmp_path / "new").biases, read_merged(folders["removed"]).biases)
