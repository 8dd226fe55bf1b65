"""merge / add / remove / extract / inspect on tiny real checkpoints: layout, bit-exact round trips, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexmoe.checkpoint import inspection, surgery
from flexmoe.config import AddConfig, ExtractConfig, MergeConfig, RemoveConfig
from flexmoe.errors import CheckpointError, ConfigError, FingerprintMismatch, IntegrityError, OutputExistsError
from flexmoe.testing import drop_manifest, raw_tensors
from flexmoe.io.keys import natural_order
from flexmoe.io.anchor import read_anchor
from flexmoe.io.fingerprint import anchor_fingerprint, merged_anchor_fingerprint
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import (FFN_PROJS, dense_ffn_key, expert_key, package_bias_key, package_row_key,
                                router_bias_key, router_key)

def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Tensor by tensor (weights and biases), then every file byte for byte."""
    ta, tb = raw_tensors(a), raw_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k] == tb[k], f"tensor {k} differs"
    assert raw_tensors(a, surgery.BIAS_FILE) == raw_tensors(b, surgery.BIAS_FILE)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"file {name} differs"


def test_merge_layout(ckpt, tmp_path):
    out = tmp_path / "m"
    res = surgery.merge(MergeConfig(ckpt.anchor, [ckpt.pkg["code"], ckpt.pkg["news"]]), out, progress=False)
    assert res.experts == ["public", "code", "news"] and res.top_k == 3
    merged, anchor = raw_tensors(out), raw_tensors(ckpt.anchor)
    pkgs = [raw_tensors(ckpt.pkg[n], "expert.safetensors") for n in ("code", "news")]
    a = read_anchor(ckpt.anchor)
    for layer in range(2):
        for p in FFN_PROJS:
            assert merged[expert_key(layer, 0, p)] == anchor[dense_ffn_key(layer, p)]
            for e, pkg in enumerate(pkgs, start=1):
                assert merged[expert_key(layer, e, p)] == pkg[dense_ffn_key(layer, p)]
        with LazyReader.from_dir(out) as r:
            gate = r.get(router_key(layer))  # (E, hidden)
        assert gate.shape == (3, 64) and gate.dtype == torch.float32
        assert torch.equal(gate[0], a.public_row)
        with LazyReader.from_file(ckpt.pkg["news"] / "expert.safetensors") as r:
            assert torch.equal(gate[2], r.get(package_row_key(layer)))
            news_bias = r.get(package_bias_key(layer))
        with LazyReader.from_file(out / surgery.BIAS_FILE) as r:
            bias = r.get(router_bias_key(layer))  # (E,)
        assert bias.shape == (3,) and bias[0] == 0 and bias[2] == news_bias
    shared = [k for k in anchor if ".mlp." not in k]
    assert shared and all(merged[k] == anchor[k] for k in shared)
    assert len(merged) == len(anchor) + 2 * 3 * 2 + 2  # + owner FFNs + routers
    assert merged_anchor_fingerprint(out) == anchor_fingerprint(ckpt.anchor) == res.anchor_fingerprint

    config = json.loads((out / "config.json").read_text())
    base = json.loads((ckpt.anchor / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["architectures"] == ["FlexOlmoForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["norm_topk_prob"]) == (3, 3, False)
    assert {k: v for k, v in config.items() if k in base and k not in ("model_type", "architectures")} == \
        {k: v for k, v in base.items() if k not in ("model_type", "architectures")}
    meta = json.loads((out / surgery.MERGED_META).read_text())
    assert [e["name"] for e in meta["experts"]] == ["public", "code", "news"]
    assert meta["experts"][1]["card"] == json.loads((ckpt.pkg["code"] / "expert.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "flexmoe_anchor.json",
              "flexmoe_router.safetensors"):
        assert (out / f).read_bytes() == (ckpt.anchor / f).read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- flexolmo" in card and "- moe" in card
    assert "| 2 | news | random |" in card and res.anchor_fingerprint in card and "top-k = 3" in card


def test_remove_of_merge_equals_merge_without(ckpt, tmp_path):
    p = ckpt.pkg
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"], p["law"]]), tmp_path / "abc", progress=False)
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"]]), tmp_path / "ab", progress=False)
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["law"]]), tmp_path / "ac", progress=False)
    res = surgery.remove(RemoveConfig(tmp_path / "abc", "law"), tmp_path / "abc-law", progress=False)
    assert res.top_k == 3 and res.top_k_before == 4 and "3" in res.notes[0]
    assert_same_checkpoint(tmp_path / "abc-law", tmp_path / "ab")
    surgery.remove(RemoveConfig(tmp_path / "abc", "news"), tmp_path / "abc-news", progress=False)  # a middle expert: later ones renumber
    assert_same_checkpoint(tmp_path / "abc-news", tmp_path / "ac")


def test_add_to_merge_equals_merge_with(ckpt, tmp_path):
    p = ckpt.pkg
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"]], shard_size="150KB"), tmp_path / "ab", progress=False)
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"], p["law"]], shard_size="150KB"), tmp_path / "abc", progress=False)
    assert (tmp_path / "ab" / "model.safetensors.index.json").is_file()  # sharded in and out
    res = surgery.add(AddConfig(tmp_path / "ab", p["law"], shard_size="150KB"), tmp_path / "ab+c", progress=False)
    assert res.top_k == 4 and res.top_k_before == 3
    assert_same_checkpoint(tmp_path / "ab+c", tmp_path / "abc")


def test_extract_gives_back_the_package(ckpt, tmp_path):
    p = ckpt.pkg
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"], p["law"]]), tmp_path / "abc", progress=False)
    res = surgery.extract(ExtractConfig(tmp_path / "abc", "news"), tmp_path / "news", progress=False)
    assert res.name == "news" and res.num_layers == 2
    assert raw_tensors(tmp_path / "news", "expert.safetensors") == raw_tensors(p["news"], "expert.safetensors")
    for f in ("expert.safetensors", "expert.json"):
        assert (tmp_path / "news" / f).read_bytes() == (p["news"] / f).read_bytes()


def test_bf16_round_trip(ckpt, tmp_path):
    p = ckpt.pkg_bf16
    surgery.merge(MergeConfig(ckpt.anchor_bf16, [p["code"], p["news"]]), tmp_path / "ab", progress=False)
    with LazyReader.from_dir(tmp_path / "ab") as r:
        assert r.spec(router_key(0)).dtype == "BF16" and r.spec(expert_key(1, 2, "up_proj")).dtype == "BF16"
    surgery.extract(ExtractConfig(tmp_path / "ab", "code"), tmp_path / "code", progress=False)
    assert raw_tensors(tmp_path / "code", "expert.safetensors") == raw_tensors(p["code"], "expert.safetensors")
    surgery.merge(MergeConfig(ckpt.anchor_bf16, [p["code"]]), tmp_path / "a", progress=False)
    surgery.remove(RemoveConfig(tmp_path / "ab", "news"), tmp_path / "ab-news", progress=False)
    assert_same_checkpoint(tmp_path / "ab-news", tmp_path / "a")


def test_top_k_rules(ckpt, tmp_path):
    p = ckpt.pkg
    assert surgery.merge(MergeConfig(ckpt.anchor, [p["code"]]), tmp_path / "a", progress=False).top_k == 2  # min(4, E)
    with pytest.raises(ConfigError, match="top-k 4"):
        surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"]], top_k=4), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="at least 1"):
        surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"]], top_k=0), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"], p["law"]], top_k=3), tmp_path / "k3", progress=False)
    res = surgery.remove(RemoveConfig(tmp_path / "k3", "law"), tmp_path / "k3-law", progress=False)
    assert res.top_k == 3 and res.notes == ["top-k stays 3"]
    res = surgery.remove(RemoveConfig(tmp_path / "k3-law", "news"), tmp_path / "k3-2", progress=False)
    assert (res.top_k, res.top_k_before) == (2, 3) and "min(k, E-1)" in res.notes[0]
    res = surgery.add(AddConfig(tmp_path / "k3-2", p["news"]), tmp_path / "k3-3", progress=False)  # the requested 3 comes back
    assert res.top_k == 3
    assert json.loads((tmp_path / "k3-3" / "config.json").read_text())["num_experts_per_tok"] == 3
    assert surgery.add(AddConfig(tmp_path / "k3-2", p["news"], top_k=1), tmp_path / "k1", progress=False).top_k == 1


def test_in_place_edit_is_an_atomic_swap(ckpt, tmp_path):
    p = ckpt.pkg
    m = tmp_path / "m"
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"]]), m, progress=False)
    with pytest.raises(ConfigError, match="in-place"):
        surgery.add(AddConfig(m, p["news"]), m, progress=False)
    surgery.add(AddConfig(m, p["news"]), m, progress=False, overwrite=True)
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"]]), tmp_path / "ref", progress=False)
    assert_same_checkpoint(m, tmp_path / "ref")
    surgery.remove(RemoveConfig(m, "code"), m, progress=False, overwrite=True)
    assert inspection.inspect(m).experts[1].name == "news"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m", "ref"]  # no temp or old folder left


@pytest.mark.parametrize("case", ["fingerprint", "other_anchor", "duplicate", "hidden_size", "public_name",
                                  "out_is_input", "out_exists"])
def test_merge_refusals(ckpt, tmp_path, case, digest):
    p = ckpt.pkg
    out = tmp_path / "out"
    if case == "fingerprint":
        forged = tmp_path / "forged"
        forged.mkdir()
        (forged / "expert.safetensors").write_bytes((p["code"] / "expert.safetensors").read_bytes())
        card = json.loads((p["code"] / "expert.json").read_text()) | {"anchor_fingerprint": "sha256:" + "0" * 64}
        (forged / "expert.json").write_text(json.dumps(card))
        args, err, match = [forged], FingerprintMismatch, "expert 'code'.*trained on anchor sha256:0000"
    elif case == "other_anchor":
        args, err, match = [p["code"], ckpt.foreign], FingerprintMismatch, "expert 'foreign'"
    elif case == "duplicate":
        args, err, match = [p["code"], ckpt.zero_bias["code"]], ConfigError, "duplicate expert name 'code'"
    elif case == "hidden_size":
        args, err, match = [ckpt.narrow], CheckpointError, r"expert 'narrow': tensor model.layers.0.mlp.gate_proj.weight"
    elif case == "public_name":
        bad = tmp_path / "pub"
        bad.mkdir()
        (bad / "expert.safetensors").write_bytes((p["code"] / "expert.safetensors").read_bytes())
        card = json.loads((p["code"] / "expert.json").read_text()) | {"name": "public"}
        (bad / "expert.json").write_text(json.dumps(card))
        args, err, match = [bad], ConfigError, "reserved"
    elif case == "out_is_input":
        args, err, match, out = [p["code"]], ConfigError, "one of the inputs", p["code"]
    else:
        out.mkdir()
        args, err, match = [p["code"]], OutputExistsError, "already exists"
    before = digest(ckpt.anchor, *args)
    with pytest.raises(err, match=match):
        surgery.merge(MergeConfig(ckpt.anchor, args), out, progress=False)
    assert digest(ckpt.anchor, *args) == before
    assert out.exists() == (case in ("out_exists", "out_is_input"))
    assert not [x for x in tmp_path.iterdir() if "flexmoe-" in x.name]


def test_edit_refusals(ckpt, tmp_path, digest):
    p = ckpt.pkg
    m = tmp_path / "m"
    surgery.merge(MergeConfig(ckpt.anchor, [p["code"], p["news"]]), m, progress=False)
    before = digest(m)
    with pytest.raises(ConfigError, match="'public' is the anchor's own FFN"):
        surgery.remove(RemoveConfig(m, "public"), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="no expert 'math'.*code, news"):
        surgery.remove(RemoveConfig(m, "math"), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="no expert 'math'"):
        surgery.extract(ExtractConfig(m, "math"), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="duplicate expert name 'news'"):
        surgery.add(AddConfig(m, p["news"]), tmp_path / "x", progress=False)
    with pytest.raises(FingerprintMismatch, match="expert 'foreign'"):
        surgery.add(AddConfig(m, ckpt.foreign), tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="expert 'narrow'"):
        surgery.add(AddConfig(m, ckpt.narrow), tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="not a merged checkpoint"):
        surgery.add(AddConfig(ckpt.anchor, p["law"]), tmp_path / "x", progress=False)
    assert digest(m) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]


def test_verify_detects_a_modified_anchor(ckpt, tmp_path):
    import shutil

    anchor = tmp_path / "anchor"
    shutil.copytree(ckpt.anchor, anchor)
    surgery.merge(MergeConfig(anchor, [ckpt.pkg["code"]], verify_fingerprint=True), tmp_path / "ok", progress=False)
    assert inspection.inspect(tmp_path / "ok", verify=True).fingerprint_verified is True
    data = bytearray((anchor / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor (lm_head): same header, different values
    (anchor / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors: sha256"):  # the manifest sees it first
        surgery.merge(MergeConfig(anchor, [ckpt.pkg["code"]], verify_fingerprint=True), tmp_path / "bad", progress=False)
    drop_manifest(anchor)  # the fingerprint stands behind it (and for folders written before manifests)
    with pytest.raises(FingerprintMismatch, match="modified"):
        surgery.merge(MergeConfig(anchor, [ckpt.pkg["code"]], verify_fingerprint=True), tmp_path / "bad", progress=False)
    shutil.copytree(tmp_path / "ok", tmp_path / "ok2")
    merged = bytearray((tmp_path / "ok2" / "model.safetensors").read_bytes())
    merged[-1] ^= 0xFF  # the last tensor in canonical order is model.norm.weight, a shared tensor
    (tmp_path / "ok2" / "model.safetensors").write_bytes(bytes(merged))
    drop_manifest(tmp_path / "ok2")
    assert inspection.inspect(tmp_path / "ok2", verify=True).fingerprint_verified is False


def test_inspect_kinds(ckpt, tmp_path):
    surgery.merge(MergeConfig(ckpt.anchor, [ckpt.pkg["code"], ckpt.pkg["news"]], top_k=2), tmp_path / "m", progress=False)
    m = inspection.inspect(tmp_path / "m")
    assert (m.kind, m.num_experts, m.top_k, m.num_layers, m.hidden_size, m.dtype) == ("merged", 3, 2, 2, 64, "F32")
    assert [e.name for e in m.experts] == ["public", "code", "news"]
    assert all(e.bytes == 2 * 3 * 64 * 128 * 4 for e in m.experts)
    assert m.experts[1].mean_bias <= 0 and m.shards[0].name == "model.safetensors"
    assert json.loads(json.dumps(m.to_json()))["experts"][2]["card"]["name"] == "news"
    a = inspection.inspect(ckpt.anchor)
    assert a.kind == "anchor" and a.anchor_fingerprint == m.anchor_fingerprint
    pkg = inspection.inspect(ckpt.pkg["law"])
    assert pkg.kind == "package" and pkg.experts[0].name == "law"
    with pytest.raises(CheckpointError, match="not a flexmoe"):
        inspection.inspect(tmp_path)


def test_canonical_order_is_natural():
    names = ["model.layers.10.mlp.gate.weight", "model.layers.2.mlp.experts.10.up_proj.weight",
             "model.layers.2.mlp.experts.9.up_proj.weight", "lm_head.weight"]
    assert sorted(names, key=natural_order) == [names[3], names[2], names[1], names[0]]


def test_router_rows_from_another_embedder_are_refused(ckpt, tmp_path):
    import shutil

    anchor = tmp_path / "anchor"
    shutil.copytree(ckpt.anchor, anchor)
    meta = json.loads((anchor / "flexmoe_anchor.json").read_text())
    meta["embedder"] = {"name": "emb-a", "dim": 32, "sha256": "a" * 64}
    (anchor / "flexmoe_anchor.json").write_text(json.dumps(meta))

    def with_embedder(src: Path, name: str, sha: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        card = json.loads((dst / "expert.json").read_text())
        card["embedder"] = {"name": name, "dim": 32, "sha256": sha}
        (dst / "expert.json").write_text(json.dumps(card))
        return dst

    same = with_embedder(ckpt.pkg["code"], "emb-a", "a" * 64)
    other = with_embedder(ckpt.pkg["news"], "emb-b", "b" * 64)
    with pytest.raises(CheckpointError, match="expert 'news': router row made with embedder 'emb-b'"):
        surgery.merge(MergeConfig(anchor, [same, other]), tmp_path / "x", progress=False)
    surgery.merge(MergeConfig(anchor, [same, ckpt.pkg["law"]]), tmp_path / "m", progress=False)  # no embedder recorded: nothing to compare
    with pytest.raises(CheckpointError, match="re-embed"):
        surgery.add(AddConfig(tmp_path / "m", other), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_inconsistent_merged_folders_are_refused(ckpt, tmp_path):
    import shutil

    from safetensors.torch import save_file

    surgery.merge(MergeConfig(ckpt.anchor, [ckpt.pkg["code"]]), tmp_path / "m", progress=False)

    def broken(name: str, edit, manifest: bool = False) -> Path:
        d = tmp_path / name
        shutil.copytree(tmp_path / "m", d)
        if not manifest:  # what stands behind the manifest (and guards folders written before it)
            drop_manifest(d)
        edit(d)
        return d

    def json_edit(file: str, **changes):
        def edit(d: Path):
            data = json.loads((d / file).read_text()) | changes
            (d / file).write_text(json.dumps(data))
        return edit

    cases = {
        "num_experts": (json_edit("config.json", num_experts=3), "num_experts=3"),
        "names": (json_edit(surgery.MERGED_META, experts=[{"name": "code"}, {"name": "public"}]), "must start with"),
        "format": (json_edit(surgery.MERGED_META, format="x/2"), "unknown format"),
        "no_meta": (lambda d: (d / surgery.MERGED_META).unlink(), "no flexmoe.json"),
        "bias_shape": (lambda d: save_file({f"model.layers.{i}.mlp.gate.expert_bias": torch.zeros(3) for i in range(2)},
                                           str(d / surgery.BIAS_FILE)), r"expected \[2\]"),
        "no_bias": (lambda d: (d / surgery.BIAS_FILE).unlink(), "no such file"),
    }
    for name, (edit, match) in cases.items():
        with pytest.raises(CheckpointError, match=match):
            surgery.remove(RemoveConfig(broken(name, edit), "code"), tmp_path / "out", progress=False)
    with pytest.raises(IntegrityError, match="config.json: .* bytes, the manifest says"):
        surgery.remove(RemoveConfig(broken("sealed", json_edit("config.json", num_experts=3), manifest=True), "code"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
