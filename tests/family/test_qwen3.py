"""Anchor families (flexmoe/io/families.py): OLMo-2 -> FlexOlmo unchanged, Qwen3 -> Qwen3Moe end to end on CPU:
init-anchor of a stock Qwen3ForCausalLM folder, merge / remove / add byte-exact, stock load without warnings and
fp32 logits of `flexmoe.load_model` (bias 0) equal to stock transformers'."""

from __future__ import annotations

import json

import pytest
import torch


from flexmoe.checkpoint import surgery
from flexmoe.checkpoint.load import load_model
from flexmoe.config import AddConfig, InitAnchorConfig, MergeConfig, RemoveConfig
from flexmoe.io import families, hf_config, keys
from flexmoe.io.fingerprint import anchor_fingerprint
from flexmoe.io.reader import LazyReader
from flexmoe.router.biased import BiasedQwen3MoeTopKRouter
from flexmoe.testing import assert_same_folder, build_random_anchor, build_random_package, stock_load

IDS = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    anchor = build_random_anchor(root / "anchor", family="qwen3")
    pkgs = {name: build_random_package(root / name, anchor, name, seed, ffn_std=0.1)
            for name, seed in (("code", 1), ("news", 2), ("law", 3))}
    zero = {name: build_random_package(root / f"{name}0", anchor, name, seed, bias=0.0, ffn_std=0.1)
            for name, seed in (("code", 1), ("news", 2))}
    return anchor, pkgs, zero, root


def test_family_table():
    assert set(families.FAMILIES) == {"olmo2", "qwen3", "llama", "mistral"}
    for fam in families.FAMILIES.values():
        assert fam.dense_ffn.format(layer=3, proj="up_proj") == keys.dense_ffn_key(3, "up_proj")
        assert fam.expert_ffn.format(layer=3, expert=2, proj="up_proj") == keys.expert_key(3, 2, "up_proj")
        assert fam.router.format(layer=3) == keys.router_key(3)
        assert families.of_moe(fam.moe_type).moe_type == fam.moe_type
    base = {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], "intermediate_size": 8, "x": 1}
    # OLMo-2 -> FlexOlmo: exactly the translation flexmoe always wrote (so merged bytes do not change)
    assert families.OLMO2.moe_config(base, 3, 2) == {**base, "model_type": "flex_olmo", "architectures":
                                                     ["FlexOlmoForCausalLM"], "num_experts": 3,
                                                     "num_experts_per_tok": 2, "norm_topk_prob": False}
    q = families.QWEN3.moe_config({**base, "model_type": "qwen3"}, 3, 2)
    assert q["model_type"] == "qwen3_moe" and q["mlp_only_layers"] == [] and q["decoder_sparse_step"] == 1
    assert q["moe_intermediate_size"] == 8 and q["norm_topk_prob"] is False
    assert families.QWEN3.dense_config(q) == {**base, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    assert hf_config.is_dense("qwen3") and hf_config.is_moe("qwen3_moe") and not hf_config.is_dense("gpt2")


def test_init_anchor_adopts_a_qwen3_directory(tmp_path):
    from flexmoe.anchor.adopt import init_anchor
    from flexmoe.testing import build_random_embedder, save_random_qwen3, save_tiny_tokenizer

    src = save_random_qwen3(tmp_path / "hf")
    save_tiny_tokenizer(src)
    docs = tmp_path / "public.jsonl"
    docs.write_text("".join(json.dumps({"text": f"public text number {i} about things"}) + "\n" for i in range(8)))
    embedder = build_random_embedder(tmp_path / "emb", dim=32)
    res = init_anchor(InitAnchorConfig(model=src, public_data=[docs], embedder=embedder, num_docs=5, device="cpu"),
                      tmp_path / "adopted", overwrite=False, progress=False)
    meta = json.loads((tmp_path / "adopted" / "flexmoe_anchor.json").read_text())
    assert res.fingerprint == meta["fingerprint"] == anchor_fingerprint(src)
    assert hf_config.model_type(tmp_path / "adopted") == "qwen3"


def test_qwen3_merge_is_a_stock_qwen3_moe_folder(qwen, tmp_path, capfd):
    anchor, pkgs, _, _ = qwen
    surgery.merge(MergeConfig(anchor, [pkgs["code"], pkgs["news"]], top_k=2), tmp_path / "m", progress=False)
    cfg = hf_config.read_config(tmp_path / "m")
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["mlp_only_layers"] == []
    stock, said = stock_load(tmp_path / "m", capfd)
    assert "unexpected" not in said and "missing" not in said and "error" not in said and "warn" not in said, said
    assert type(stock).__name__ == "Qwen3MoeForCausalLM" and stock.config.num_experts == 3
    assert stock.config.num_experts_per_tok == 2 and not stock.config.norm_topk_prob
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in stock.model.layers)
    # expert 0 is the anchor's dense FFN, bit for bit, in stock's in-memory (fused) layout
    with LazyReader.from_dir(anchor) as r:
        gate, up = r.get(keys.dense_ffn_key(1, "gate_proj")), r.get(keys.dense_ffn_key(1, "up_proj"))
    assert torch.equal(stock.model.layers[1].mlp.experts.gate_up_proj[0], torch.cat([gate, up]))
    ours = load_model(tmp_path / "m")
    assert all(isinstance(layer.mlp.gate, BiasedQwen3MoeTopKRouter) for layer in ours.model.layers)
    with torch.no_grad():
        assert not torch.allclose(stock(IDS).logits, ours(IDS).logits)  # the packages' negative biases act
        assert torch.equal(load_model(tmp_path / "m", apply_bias=False)(IDS).logits, stock(IDS).logits)


def test_qwen3_zero_bias_gives_stock_fp32_logits(qwen, tmp_path, capfd):
    anchor, _, zero, _ = qwen
    surgery.merge(MergeConfig(anchor, [zero["code"], zero["news"]]), tmp_path / "m", progress=False)
    stock, _ = stock_load(tmp_path / "m", capfd)
    ours = load_model(tmp_path / "m")
    assert next(ours.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, ours(IDS).logits)


def test_qwen3_remove_and_add_round_trips_are_byte_exact(qwen, tmp_path):
    anchor, p, _, _ = qwen
    surgery.merge(MergeConfig(anchor, [p["code"], p["news"], p["law"]]), tmp_path / "abc", progress=False)
    surgery.merge(MergeConfig(anchor, [p["code"], p["news"]], shard_size="150KB"), tmp_path / "ab", progress=False)
    surgery.merge(MergeConfig(anchor, [p["code"], p["law"]]), tmp_path / "ac", progress=False)
    surgery.remove(RemoveConfig(tmp_path / "abc", "news"), tmp_path / "abc-news", progress=False)
    assert_same_folder(tmp_path / "abc-news", tmp_path / "ac")
    surgery.merge(MergeConfig(anchor, [p["code"], p["news"], p["law"]], shard_size="150KB"), tmp_path / "abc2",
                  progress=False)
    assert (tmp_path / "ab" / "model.safetensors.index.json").is_file()
    surgery.add(AddConfig(tmp_path / "ab", p["law"], shard_size="150KB"), tmp_path / "ab+c", progress=False)
    assert_same_folder(tmp_path / "ab+c", tmp_path / "abc2")

