"""Anchor families (flexmoe/io/families.py): the family table, and what a Qwen3 -> Qwen3Moe merge looks like on disk
and in stock transformers (test_merge_families.py holds what every family shares: init-anchor, stock load, fp32
logits, round trips)."""

from __future__ import annotations

from flexmoe.checkpoint import surgery
from flexmoe.config import MergeConfig
from flexmoe.io import families, hf_config, keys
from flexmoe.testing import stock_load


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


def test_qwen3_merge_is_every_layer_sparse_without_renormalisation(family_world, tmp_path, capfd):
    w = family_world("qwen3")
    surgery.merge(MergeConfig(w.anchor, [w.pkgs["code"], w.pkgs["news"]], top_k=2), tmp_path / "m", progress=False)
    cfg = hf_config.read_config(tmp_path / "m")
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["mlp_only_layers"] == []
    stock, _ = stock_load(tmp_path / "m", capfd)
    assert not stock.config.norm_topk_prob
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in stock.model.layers)
