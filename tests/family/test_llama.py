"""Llama (and Mistral) -> Mixtral on CPU, what is Mixtral's own (test_merge_families.py holds what every family
shares): the family entries, the on-disk layout (block_sparse_moe.experts.{e}.w1/w2/w3), k < E refused (Mixtral
always renormalises the top-k weights, so only k = E is FlexOlmo's routing), Mistral anchors and their sliding
window, and stock Mixtral folders through init-anchor --from-moe and adopt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexmoe.checkpoint import surgery
from flexmoe.checkpoint.load import load_model
from flexmoe.config import AddConfig, InitAnchorConfig, MergeConfig, RemoveConfig
from flexmoe.errors import ConfigError
from flexmoe.io import families, hf_config, keys
from flexmoe.io.reader import model_files
from flexmoe.testing import build_random_anchor, build_random_package, stock_load

IDS = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def test_mixtral_family_entries():
    for fam in (families.LLAMA, families.MISTRAL):
        assert families.of_dense(fam.dense_type) is fam and fam.moe_type == "mixtral" and fam.renormalises
    assert families.of_moe("mixtral") is families.MISTRAL  # Mixtral = Mistral + MoE blocks
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": 8, "mlp_bias": False,
            "attention_bias": False, "pretraining_tp": 1}
    cfg = families.LLAMA.moe_config(base, 3, 3)
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 3 and "norm_topk_prob" not in cfg
    assert cfg["router_jitter_noise"] == 0.0 and "num_experts" not in cfg and "mlp_bias" not in cfg
    assert families.MISTRAL.dense_config(cfg)["model_type"] == "mistral"
    with pytest.raises(ConfigError, match="attention_bias"):
        families.LLAMA.moe_config({**base, "attention_bias": True}, 3, 3)
    k = keys.expert_key(1, 2, "gate_proj")
    assert families.LLAMA.to_disk(k) == "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    assert families.LLAMA.to_disk(keys.expert_key(1, 2, "down_proj")).endswith("experts.2.w2.weight")
    assert families.LLAMA.to_disk(keys.router_key(0)) == "model.layers.0.block_sparse_moe.gate.weight"
    assert families.LLAMA.from_disk(families.LLAMA.to_disk(k)) == k


def test_llama_merge_writes_mixtrals_layout(family_world, tmp_path, capfd):
    w = family_world("llama")
    surgery.merge(MergeConfig(w.anchor, [w.pkgs["code"], w.pkgs["news"]]), tmp_path / "m", progress=False)
    cfg = hf_config.read_config(tmp_path / "m")
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 3
    from safetensors import safe_open

    with safe_open(model_files(tmp_path / "m")[0], "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in names
    assert "model.layers.1.block_sparse_moe.gate.weight" in names and not any(".mlp." in n for n in names)
    stock, _ = stock_load(tmp_path / "m", capfd)
    assert stock.config.num_local_experts == 3


def test_llama_top_k_below_e_is_refused(family_world, tmp_path):
    anchor, p = family_world("llama").anchor, family_world("llama").pkgs
    with pytest.raises(ConfigError, match="--top-k 3"):
        surgery.merge(MergeConfig(anchor, [p["code"], p["news"]], top_k=2), tmp_path / "m", progress=False)
    surgery.merge(MergeConfig(anchor, [p["code"], p["news"]], top_k=3), tmp_path / "m", progress=False)
    with pytest.raises(ConfigError, match="--top-k 2"):
        surgery.remove(RemoveConfig(tmp_path / "m", "news", top_k=1), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--top-k 4"):
        surgery.add(AddConfig(tmp_path / "m", p["law"], top_k=3), tmp_path / "a", progress=False)
    assert surgery.add(AddConfig(tmp_path / "m", p["law"]), tmp_path / "a", progress=False).top_k == 4
    assert surgery.remove(RemoveConfig(tmp_path / "m", "news"), tmp_path / "r", progress=False).top_k == 2


def test_mistral_merge_is_a_stock_mixtral_folder(tmp_path, capfd):
    anchor = build_random_anchor(tmp_path / "anchor", family="mistral")
    pkg = build_random_package(tmp_path / "code", anchor, "code", 1, bias=0.0, ffn_std=0.1)
    surgery.merge(MergeConfig(anchor, [pkg]), tmp_path / "m", progress=False)
    stock, said = stock_load(tmp_path / "m", capfd)
    assert "unexpected" not in said and "missing" not in said and "error" not in said and "warn" not in said, said
    assert type(stock).__name__ == "MixtralForCausalLM" and stock.config.num_experts_per_tok == 2
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, load_model(tmp_path / "m")(IDS).logits)


def test_mistral_sliding_window_carries_over_to_the_mixtral_merge(tmp_path):
    from transformers import MistralForCausalLM

    anchor = build_random_anchor(tmp_path / "anchor", family="mistral", sliding_window=4)
    pkg = build_random_package(tmp_path / "copy", anchor, "copy", 1, bias=0.0, anchor_ffn=True)
    surgery.merge(MergeConfig(anchor, [pkg]), tmp_path / "m", progress=False)
    assert hf_config.read_config(tmp_path / "m")["sliding_window"] == 4
    merged, dense = load_model(tmp_path / "m"), MistralForCausalLM.from_pretrained(anchor).eval()
    with torch.no_grad():  # k = E = 2 and both experts the dense FFN: the merge is the dense model, window and all
        got, want = merged(IDS).logits, dense(IDS).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        dense.config.sliding_window = None  # IDS (9 tokens) is longer than the window, so the window matters
        assert not torch.allclose(dense(IDS).logits, want, atol=1e-3)


def _stock_mixtral(out: Path, *, top_k: int = 3, same_row0: bool = True):
    from transformers import MixtralConfig, MixtralForCausalLM

    from flexmoe.testing import save_tiny_tokenizer

    torch.manual_seed(0)
    m = MixtralForCausalLM(MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                         num_experts_per_tok=top_k, pad_token_id=1, eos_token_id=0,
                                         bos_token_id=None))
    if same_row0:  # one public router row for every layer, as a flexmoe anchor has
        with torch.no_grad():
            m.model.layers[1].mlp.gate.weight[0] = m.model.layers[0].mlp.gate.weight[0]
    m.save_pretrained(out)
    save_tiny_tokenizer(out)
    return out


def test_init_anchor_from_a_stock_mixtral_folder_is_its_mistral_anchor(tmp_path):
    from transformers import MistralForCausalLM, MixtralForCausalLM

    from flexmoe.anchor.adopt import init_anchor

    src = _stock_mixtral(tmp_path / "mx")
    init_anchor(InitAnchorConfig(from_moe=src), tmp_path / "anchor", overwrite=False, progress=False)
    assert hf_config.model_type(tmp_path / "anchor") == "mistral"
    dense, moe = MistralForCausalLM.from_pretrained(tmp_path / "anchor"), MixtralForCausalLM.from_pretrained(src)
    assert torch.equal(dense.model.layers[1].mlp.up_proj.weight, moe.model.layers[1].mlp.experts.gate_up_proj[0, 128:])


def test_adopt_a_stock_mixtral_folder(tmp_path):
    from transformers import MixtralForCausalLM

    from flexmoe import api
    from flexmoe.config import AdoptConfig
    from flexmoe.errors import CheckpointError

    src = _stock_mixtral(tmp_path / "mx", same_row0=False)
    api.adopt(AdoptConfig(src, ["public", "a", "b"]), tmp_path / "ad", progress=False)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ad")(IDS).logits,
                           MixtralForCausalLM.from_pretrained(src).eval()(IDS).logits)
    with pytest.raises(CheckpointError, match="k = E"):
        api.adopt(AdoptConfig(_stock_mixtral(tmp_path / "k2", top_k=2), ["public", "a", "b"]), tmp_path / "ad2",
                  progress=False)
