"""The anchor fingerprint: independent of sharding, sensitive to any byte, name, dtype or shape; recomputable after merge."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from flexmoe.io.fingerprint import anchor_fingerprint, merged_anchor_fingerprint

BASE = {"model.embed_tokens.weight": torch.randn(8, 4), "model.layers.0.mlp.gate_proj.weight": torch.randn(6, 4),
        "model.norm.weight": torch.ones(4)}


def _save(d, tensors):
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_sharding_does_not_matter_content_does(tmp_path):
    fp = anchor_fingerprint(_save(tmp_path / "a", BASE))
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    sharded = tmp_path / "b"
    sharded.mkdir()
    names = sorted(BASE)
    save_file({names[0]: BASE[names[0]]}, str(sharded / "s1.safetensors"))
    save_file({n: BASE[n] for n in names[1:]}, str(sharded / "s2.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {names[0]: "s1.safetensors", **{n: "s2.safetensors" for n in names[1:]}}}))
    assert anchor_fingerprint(sharded) == fp
    changed = dict(BASE)
    changed["model.norm.weight"] = BASE["model.norm.weight"].clone()
    changed["model.norm.weight"][0] = 1.0000001
    assert anchor_fingerprint(_save(tmp_path / "c", changed)) != fp
    renamed = {("model.final_norm.weight" if k == "model.norm.weight" else k): v for k, v in BASE.items()}
    assert anchor_fingerprint(_save(tmp_path / "d", renamed)) != fp
    retyped = dict(BASE, **{"model.norm.weight": BASE["model.norm.weight"].view(torch.int32)})
    assert anchor_fingerprint(_save(tmp_path / "e", retyped)) != fp  # same bytes, other dtype
    reshaped = dict(BASE, **{"model.embed_tokens.weight": BASE["model.embed_tokens.weight"].reshape(4, 8)})
    assert anchor_fingerprint(_save(tmp_path / "f", reshaped)) != fp  # same bytes, other shape


def test_merged_view_maps_expert_0_back(tmp_path):
    fp = anchor_fingerprint(_save(tmp_path / "a", BASE))
    merged = {k: v for k, v in BASE.items() if ".mlp." not in k}
    merged["model.layers.0.mlp.experts.0.gate_proj.weight"] = BASE["model.layers.0.mlp.gate_proj.weight"]
    merged["model.layers.0.mlp.experts.1.gate_proj.weight"] = torch.randn(6, 4)  # owner: ignored
    merged["model.layers.0.mlp.gate.weight"] = torch.randn(2, 4)  # router: ignored
    assert merged_anchor_fingerprint(_save(tmp_path / "m", merged)) == fp
