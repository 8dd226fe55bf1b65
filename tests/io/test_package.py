"""Expert packages: layout, card round trip, name rules, refusals of incomplete or corrupt packages."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io.package import ExpertCard, package_keys, read_package, validate_expert_name, write_package


def _tensors(layers=2, hidden=4, inter=6):
    out = {}
    for k in package_keys(layers):
        if k.endswith("router.bias"):
            out[k] = torch.tensor(-0.5)
        elif k.endswith("router.weight"):
            out[k] = torch.randn(hidden)
        else:
            out[k] = torch.randn(hidden, inter) if "down_proj" in k else torch.randn(inter, hidden)
    return out


def test_write_read_round_trip(tmp_path):
    t = _tensors()
    card = ExpertCard(name="code", anchor_fingerprint="sha256:x", hparams={"lr": 1e-3}, steps=3, final_loss=2.5)
    write_package(tmp_path, t, card)
    pkg = read_package(tmp_path)
    try:
        assert pkg.num_layers == 2 and pkg.card == card
        assert pkg.reader.keys() == sorted(t) and all(torch.equal(pkg.reader.get(k), v) for k, v in t.items())
    finally:
        pkg.close()
    assert json.loads((tmp_path / "expert.json").read_text())["format"] == "flexmoe-expert/1"


def test_package_keys_order():
    assert package_keys(1) == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                               "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.router.weight",
                               "model.layers.0.mlp.router.bias"]


@pytest.mark.parametrize("name", ["", "a/b", "..", "x..y", "has space", "public", "-lead", "x" * 65])
def test_bad_names(name):
    with pytest.raises(ConfigError):
        validate_expert_name(name)


def test_good_names():
    for n in ("code", "news_2024", "v1.2-final", "A"):
        assert validate_expert_name(n) == n


def test_refusals(tmp_path):
    t = _tensors()
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="first difference"):
        write_package(tmp_path / "a", t, ExpertCard(name="code", anchor_fingerprint="x"))
    with pytest.raises(CheckpointError, match="not an expert package"):
        read_package(tmp_path)
    good = tmp_path / "good"
    good.mkdir()
    write_package(good, _tensors(), ExpertCard(name="code", anchor_fingerprint="x"))
    for content, match in (("{", "corrupt expert card"), ("[]", "corrupt expert card"),
                           (json.dumps({"format": "other/9"}), "unknown format"),
                           (json.dumps({"format": "flexmoe-expert/1"}), "corrupt expert card")):
        (good / "expert.json").write_text(content)
        with pytest.raises(CheckpointError, match=match):
            read_package(good)
    (good / "expert.json").write_text(json.dumps(ExpertCard(name="code", anchor_fingerprint="x").to_json()))
    from safetensors.torch import save_file

    partial = {k: v for k, v in _tensors().items() if "layers.1.mlp.router" not in k}
    save_file(partial, str(good / "expert.safetensors"))
    with pytest.raises(CheckpointError, match="complete expert"):
        read_package(good)
