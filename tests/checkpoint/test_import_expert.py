"""import-expert: a stock-written 2-expert FlexOlmo model built on an anchor becomes an expert package; import ->
merge -> remove round trips byte for byte; models of another anchor, dtype or size are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flexmoe.checkpoint import surgery
from flexmoe.checkpoint.adopt import import_expert
from flexmoe.cli import main
from flexmoe.config import ExtractConfig, ImportExpertConfig, MergeConfig, RemoveConfig
from flexmoe.errors import CheckpointError, FingerprintMismatch
from flexmoe.io.package import read_package
from flexmoe.testing import (assert_same_folder, build_random_anchor, raw_tensors, save_flex_olmo_on_anchor,
                             save_random_flex_olmo, save_random_olmo2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Per dtype: an anchor and two stock 2x models on it (math sharded, code single-file)."""
    root = tmp_path_factory.mktemp("import")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = str(dtype).removeprefix("torch.")
        anchor = build_random_anchor(root / f"anchor-{d}", dtype=dtype)
        out[d] = {"anchor": anchor,
                  "math": save_flex_olmo_on_anchor(root / f"math-{d}", anchor, seed=1, max_shard_size="40KB"),
                  "code": save_flex_olmo_on_anchor(root / f"code-{d}", anchor, seed=2)}
    return out


def imp(world, d, name, out):
    return import_expert(ImportExpertConfig(world[d][name], world[d]["anchor"], name), out, progress=False)


@pytest.mark.parametrize("d", ["float32", "bfloat16"])
def test_import_merge_gives_back_the_source(world, tmp_path, d):
    for name in ("math", "code"):
        imp(world, d, name, tmp_path / name)
        pkg = read_package(tmp_path / name)
        card = json.loads((tmp_path / name / "expert.json").read_text())
        assert card["router_source"] == "imported" and card["source"]["bias"] == "none in source"
        assert card["source"]["folder"] == str(world[d][name].resolve())
        assert set(card["source"]["files"]) >= {"config.json"} and all(
            len(f["sha256"]) == 64 for f in card["source"]["files"].values())
        assert torch.equal(pkg.biases(), torch.zeros(2))
        pkg.close()
        merged = tmp_path / f"merged-{name}"
        surgery.merge(MergeConfig(world[d]["anchor"], [tmp_path / name], top_k=2), merged, progress=False)
        assert raw_tensors(merged) == raw_tensors(world[d][name])  # every tensor of the stock model, byte for byte
        surgery.extract(ExtractConfig(merged, name), tmp_path / f"again-{name}", progress=False)
        assert_same_folder(tmp_path / name, tmp_path / f"again-{name}")


@pytest.mark.parametrize("d", ["float32", "bfloat16"])
def test_import_merge_remove_round_trip(world, tmp_path, d):
    anchor = world[d]["anchor"]
    for name in ("math", "code"):
        imp(world, d, name, tmp_path / name)
    surgery.merge(MergeConfig(anchor, [tmp_path / "math", tmp_path / "code"]), tmp_path / "mc", progress=False)
    surgery.remove(RemoveConfig(tmp_path / "mc", "code"), tmp_path / "m", progress=False)
    surgery.merge(MergeConfig(anchor, [tmp_path / "math"]), tmp_path / "m-direct", progress=False)
    assert_same_folder(tmp_path / "m", tmp_path / "m-direct")


def _edit(src: Path, dst: Path, fn) -> Path:
    """A copy of the stock model `src` changed by `fn`, re-saved by stock save_pretrained."""
    from transformers import FlexOlmoForCausalLM

    model = FlexOlmoForCausalLM.from_pretrained(src)
    with torch.no_grad():
        fn(model)
    model.save_pretrained(dst)
    return dst


def test_import_refusals(world, tmp_path):
    anchor, math = world["float32"]["anchor"], world["float32"]["math"]

    def run(model, anchor_dir=anchor):
        return import_expert(ImportExpertConfig(model, anchor_dir, "math"), tmp_path / "out", progress=False)

    norm = _edit(math, tmp_path / "norm", lambda m: m.model.layers[1].post_attention_layernorm.weight.add_(1))
    with pytest.raises(FingerprintMismatch, match=r"model\.layers\.1\.post_attention_layernorm\.weight differs "
                                                   r"from the anchor's"):
        run(norm)
    e0 = _edit(math, tmp_path / "e0", lambda m: m.model.layers[0].mlp.experts.down_proj[0].mul_(2))
    with pytest.raises(FingerprintMismatch, match=r"model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight differs "
                                                   r"from the anchor's model\.layers\.0\.mlp\.down_proj\.weight"):
        run(e0)
    row0 = _edit(math, tmp_path / "row0", lambda m: m.model.layers[1].mlp.gate.weight[0].mul_(2))
    with pytest.raises(FingerprintMismatch, match=r"row 0 of model\.layers\.1\.mlp\.gate\.weight differs"):
        run(row0)
    with pytest.raises(CheckpointError, match="is bfloat16, the anchor .* is float32; bring both to one dtype"):
        run(world["bfloat16"]["math"])
    three = save_random_flex_olmo(tmp_path / "three", num_experts=3)
    with pytest.raises(CheckpointError, match="with 3 experts; import-expert takes a 2-expert one"):
        run(three)
    with pytest.raises(CheckpointError, match="is not a FlexOlmo model"):
        run(save_random_olmo2(tmp_path / "dense"))
    with pytest.raises(FingerprintMismatch, match="was not built on anchor"):
        run(math, build_random_anchor(tmp_path / "other", seed=5))
    assert not (tmp_path / "out").exists()


def test_import_cli(world, tmp_path):
    w = world["float32"]
    r = CliRunner().invoke(main, ["import-expert", str(w["code"]), "--anchor", str(w["anchor"]), "--name", "code",
                                  "--out", str(tmp_path / "code")])
    assert r.exit_code == 0, r.output
    assert "wrote expert package" in r.output
    r = CliRunner().invoke(main, ["import-expert", str(world["bfloat16"]["code"]), "--anchor", str(w["anchor"]),
                                  "--name", "code", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output


# ---- init-anchor --from-moe: the anchor out of the public 2x model, then the released flow end to end


@pytest.mark.parametrize("d", ["float32", "bfloat16"])
def test_init_anchor_from_moe_then_import(world, tmp_path, d, capfd):
    from transformers import AutoModelForCausalLM

    from flexmoe.api import init_anchor
    from flexmoe.config import InitAnchorConfig
    from flexmoe.io.anchor import read_anchor

    public2x = world[d]["math"]  # any model built on the anchor: its expert 0 and shared layers are the anchor's
    res = init_anchor(InitAnchorConfig(from_moe=public2x), tmp_path / "anchor", progress=False)
    original = world[d]["anchor"]
    assert res.fingerprint == read_anchor(original).meta.fingerprint
    assert raw_tensors(tmp_path / "anchor") == raw_tensors(original)  # the dense model, byte for byte
    a = read_anchor(tmp_path / "anchor")
    assert a.meta.embedder is None and a.meta.dtype == d
    assert torch.equal(a.public_row.to(getattr(torch, d)), read_anchor(original).public_row.to(getattr(torch, d)))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "anchor")
    assert type(dense).__name__ == "Olmo2ForCausalLM"
    said = "".join(capfd.readouterr()).lower()
    assert "missing" not in said and "unexpected" not in said and "newly initialized" not in said
    import_expert(ImportExpertConfig(world[d]["code"], tmp_path / "anchor", "code"), tmp_path / "code", progress=False)
    surgery.merge(MergeConfig(tmp_path / "anchor", [tmp_path / "code"], top_k=2), tmp_path / "m", progress=False)
    assert raw_tensors(tmp_path / "m") == raw_tensors(world[d]["code"])


def test_init_anchor_from_moe_refusals(tmp_path):
    from flexmoe.api import init_anchor
    from flexmoe.config import InitAnchorConfig
    from flexmoe.errors import ConfigError

    per_layer = save_random_flex_olmo(tmp_path / "rows", num_experts=2)  # router row 0 differs per layer
    with pytest.raises(CheckpointError, match=r"row 0 of model\.layers\.1\.mlp\.gate\.weight differs from layer 0's"):
        init_anchor(InitAnchorConfig(from_moe=per_layer), tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match="is not a FlexOlmo model"):
        init_anchor(InitAnchorConfig(from_moe=save_random_olmo2(tmp_path / "dense")), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="exactly one of --model"):
        InitAnchorConfig(model=tmp_path, from_moe=tmp_path)
    with pytest.raises(ConfigError, match="drop --public-data"):
        InitAnchorConfig(from_moe=tmp_path, public_data=[tmp_path])
    assert not (tmp_path / "a").exists()
