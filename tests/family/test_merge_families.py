"""What every non-OLMo-2 family must give, parametrized over Qwen3 (-> Qwen3Moe) and Llama (-> Mixtral): init-anchor
of a stock dense folder, a merge that stock transformers loads as the family's MoE class without warnings (expert 0
the anchor's FFN bit for bit, flexmoe's biased router swapped in by `load_model`), fp32 logits equal to stock with
bias 0, and byte-exact remove / add round trips. Family-specific facts live in test_qwen3.py and test_llama.py."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe.checkpoint import surgery
from flexmoe.checkpoint.load import load_model
from flexmoe.config import AddConfig, InitAnchorConfig, MergeConfig, RemoveConfig
from flexmoe.io import hf_config, keys
from flexmoe.io.fingerprint import anchor_fingerprint
from flexmoe.io.reader import LazyReader
from flexmoe.router.biased import BiasedMixtralTopKRouter, BiasedQwen3MoeTopKRouter
from flexmoe.testing import assert_same_folder, stock_load

IDS = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))

# family -> (stock MoE class, flexmoe's biased router, the merge's requested top-k, the top-k it gets)
STOCK = {"qwen3": ("Qwen3MoeForCausalLM", BiasedQwen3MoeTopKRouter, 2, 2),
         "llama": ("MixtralForCausalLM", BiasedMixtralTopKRouter, None, 3)}  # Mixtral: k = E by default


@pytest.fixture(params=sorted(STOCK))
def family(request):
    return request.param


def test_init_anchor_adopts_a_dense_directory(family, tmp_path):
    from flexmoe import testing
    from flexmoe.anchor.adopt import init_anchor

    src = getattr(testing, f"save_random_{family}")(tmp_path / "hf")
    testing.save_tiny_tokenizer(src)
    docs = tmp_path / "public.jsonl"
    docs.write_text("".join(json.dumps({"text": f"public text number {i} about things"}) + "\n" for i in range(8)))
    embedder = testing.build_random_embedder(tmp_path / "emb", dim=32)
    res = init_anchor(InitAnchorConfig(model=src, public_data=[docs], embedder=embedder, num_docs=5, device="cpu"),
                      tmp_path / "adopted", overwrite=False, progress=False)
    meta = json.loads((tmp_path / "adopted" / "flexmoe_anchor.json").read_text())
    assert res.fingerprint == meta["fingerprint"] == anchor_fingerprint(src)
    assert hf_config.model_type(tmp_path / "adopted") == family


def test_merge_loads_in_stock_transformers_as_the_familys_moe_class(family, family_world, tmp_path, capfd):
    moe_class, biased, top_k, want_k = STOCK[family]
    w = family_world(family)
    res = surgery.merge(MergeConfig(w.anchor, [w.pkgs["code"], w.pkgs["news"]], top_k=top_k), tmp_path / "m",
                        progress=False)
    assert res.top_k == want_k
    stock, said = stock_load(tmp_path / "m", capfd)
    assert "unexpected" not in said and "missing" not in said and "error" not in said and "warn" not in said, said
    assert type(stock).__name__ == moe_class and stock.config.num_experts == 3
    assert stock.config.num_experts_per_tok == want_k
    # expert 0 is the anchor's dense FFN, bit for bit, in stock's in-memory (fused) layout
    with LazyReader.from_dir(w.anchor) as r:
        gate, up = r.get(keys.dense_ffn_key(1, "gate_proj")), r.get(keys.dense_ffn_key(1, "up_proj"))
    assert torch.equal(stock.model.layers[1].mlp.experts.gate_up_proj[0], torch.cat([gate, up]))
    ours = load_model(tmp_path / "m")
    assert all(isinstance(layer.mlp.gate, biased) for layer in ours.model.layers)
    with torch.no_grad():
        assert not torch.allclose(stock(IDS).logits, ours(IDS).logits)  # the packages' negative biases act
        assert torch.equal(load_model(tmp_path / "m", apply_bias=False)(IDS).logits, stock(IDS).logits)


def test_zero_bias_gives_stock_fp32_logits(family, family_world, tmp_path, capfd):
    w = family_world(family)
    surgery.merge(MergeConfig(w.anchor, [w.zero["code"], w.zero["news"]]), tmp_path / "m", progress=False)
    stock, _ = stock_load(tmp_path / "m", capfd)
    ours = load_model(tmp_path / "m")
    assert next(ours.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, ours(IDS).logits)


def test_remove_and_add_round_trips_are_byte_exact(family, family_world, tmp_path):
    anchor, p = family_world(family).anchor, family_world(family).pkgs
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
