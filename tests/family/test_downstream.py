"""Everything downstream of a merge on the other anchor families (Qwen3 -> Qwen3Moe, Llama -> Mixtral): tune-router,
eval's routing statistics and --top-k, generate and flexmoe's experts kernel (the same experts layout), the
soup baseline, import-expert of a stock 2-expert folder, and the hidden-mean router source of a pre-norm family."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe import api
from flexmoe.config import AdoptConfig, EvalConfig, GenerateConfig, ImportExpertConfig, MergeConfig, RouterTuneConfig
from flexmoe.errors import ConfigError
from flexmoe.io import hf_config
from flexmoe.io.keys import dense_ffn_key, expert_key, package_row_key, parse_router_key, router_key
from flexmoe.io.reader import LazyReader
from flexmoe.testing import build_random_anchor, build_random_package, stock_loads_clean

# family -> (its MoE class, the on-disk name of layer 0's router)
FAMILIES = {"qwen3": ("Qwen3MoeForCausalLM", "model.layers.0.mlp.gate.weight"),
            "llama": ("MixtralForCausalLM", "model.layers.0.block_sparse_moe.gate.weight")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def merged(request, tmp_path_factory):
    """(family, anchor, packages, merged folder, text file) of a 2-owner merge with k = E."""
    root = tmp_path_factory.mktemp(request.param)
    anchor = build_random_anchor(root / "anchor", family=request.param)
    pkgs = [build_random_package(root / n, anchor, n, s, ffn_std=0.1) for n, s in (("code", 1), ("news", 2))]
    api.merge(MergeConfig(anchor, pkgs, top_k=3), root / "m", progress=False)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 300}" for j in range(60))}) + "\n"
                            for i in range(12)))
    return request.param, anchor, pkgs, root / "m", text


def _tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder or an expert package, by canonical name."""
    from flexmoe.io.package import PACKAGE_CARD, read_package

    if (folder / PACKAGE_CARD).is_file():
        pkg = read_package(folder)
        try:
            return {k: pkg.reader.get(k).clone() for k in pkg.reader.keys()}
        finally:
            pkg.close()
    with LazyReader.from_dir(folder) as r:
        return {k: r.get(k).clone() for k in r.keys()}


def test_tune_router_trains_owner_rows_only_and_writes_the_family_layout(merged, tmp_path, capfd):
    family, _, _, m, text = merged
    cfg = RouterTuneConfig.load(None, {"merged": m, "data": [text]},
                                ["train.max_steps=3", "train.seq_len=32", "train.batch_size=2", "train.device=cpu",
                                 "train.lr=0.05"])
    res = api.tune_router(cfg, tmp_path / "t", progress=False)
    assert res.experts == ["code", "news"] and res.train.steps == 3
    assert api.verify(tmp_path / "t").ok
    before, after = _tensors(m), _tensors(tmp_path / "t")
    assert before.keys() == after.keys()
    for k, v in before.items():
        if parse_router_key(k) is None:
            assert torch.equal(after[k], v), k  # experts and shared tensors: the same bytes
        else:
            assert torch.equal(after[k][0], v[0]), k  # r_pub frozen
            assert not torch.equal(after[k][1:], v[1:]), k  # the owners' rows trained
    with open(tmp_path / "t" / "model.safetensors.index.json") as f:
        assert FAMILIES[family][1] in json.load(f)["weight_map"]  # the family's on-disk router name
    stock = stock_loads_clean(tmp_path / "t", capfd)
    assert type(stock).__name__ == FAMILIES[family][0]


def test_eval_routing_statistics(merged):
    family, _, _, m, text = merged
    res = api.evaluate(EvalConfig(model=m, data={"code": str(text)}, seq_len=32, device="cpu"), progress=False)
    stats = res.routing
    assert stats is not None and stats.experts == ["public", "code", "news"] and stats.top_k == 3
    dom = stats.domains["code"]
    assert dom.tokens > 0 and len(dom.fraction) == 2  # one row per layer
    for frac, prob in zip(dom.fraction, dom.mean_prob):
        assert sum(frac) == pytest.approx(3) and sum(prob) == pytest.approx(1)


def test_eval_top_k_below_e(merged):
    family, _, _, m, text = merged
    cfg = EvalConfig(model=m, data={"code": str(text)}, seq_len=32, device="cpu", top_k=1)
    if family == "llama":  # Mixtral renormalises the top-k weights: k < E is not FlexOlmo's routing
        with pytest.raises(ConfigError, match="renormalises"):
            api.evaluate(cfg, progress=False)
    else:
        res = api.evaluate(cfg, progress=False)
        assert res.routing.top_k == 1 and sum(res.routing.domains["code"].fraction[0]) == pytest.approx(1)


def test_generate_fast_path_equals_stock_generate(merged):
    _, _, _, m, _ = merged
    fast = api.generate(GenerateConfig(model=m, prompts=["w1 w2 w3", "w4"], max_new_tokens=6, device="cpu"))
    stock = api.generate(GenerateConfig(model=m, prompts=["w1 w2 w3", "w4"], max_new_tokens=6, device="cpu",
                                        fast=False))
    assert fast.texts == stock.texts and fast.fast and not stock.fast


def test_flexmoe_experts_kernel_serves_the_family(merged):
    from flexmoe.checkpoint.load import load_model
    from flexmoe.infer import EXPERTS_IMPL, enable_fast_path

    _, _, _, m, _ = merged
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    stock, fast = load_model(m), load_model(m)
    enable_fast_path(fast)
    assert fast.config._experts_implementation == EXPERTS_IMPL
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_soup_is_a_two_expert_model_of_the_family(merged, tmp_path, capfd):
    from flexmoe.checkpoint.baselines import soup

    family, anchor, pkgs, m, _ = merged
    soup(m, tmp_path / "soup")
    cfg = hf_config.read_config(tmp_path / "soup")
    assert cfg[hf_config.family(cfg).num_experts_key] == 2 and cfg["num_experts_per_tok"] == 2
    stock = stock_loads_clean(tmp_path / "soup", capfd)
    assert type(stock).__name__ == FAMILIES[family][0]
    got, a, b = _tensors(tmp_path / "soup"), _tensors(pkgs[0]), _tensors(pkgs[1])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        mean = (a[dense_ffn_key(1, proj)] + b[dense_ffn_key(1, proj)]) / 2
        torch.testing.assert_close(got[expert_key(1, 1, proj)], mean)


def test_import_expert_of_a_stock_two_expert_folder(merged, tmp_path):
    from flexmoe.checkpoint.load import load_model

    _, anchor, pkgs, _, _ = merged
    api.merge(MergeConfig(anchor, [pkgs[0]]), tmp_path / "one", progress=False)
    load_model(tmp_path / "one", apply_bias=False).save_pretrained(tmp_path / "stock")  # what others publish
    api.import_expert(ImportExpertConfig(tmp_path / "stock", anchor, "code"), tmp_path / "imp", progress=False)
    got, want = _tensors(tmp_path / "imp"), _tensors(pkgs[0])
    for layer in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(got[dense_ffn_key(layer, proj)], want[dense_ffn_key(layer, proj)])
        assert torch.equal(got[package_row_key(layer)], want[package_row_key(layer)])
    api.merge(MergeConfig(anchor, [tmp_path / "imp"]), tmp_path / "again", progress=False)
    assert torch.equal(_tensors(tmp_path / "again")[router_key(1)], _tensors(tmp_path / "one")[router_key(1)])
    # stock v5 saves E of a Qwen3-MoE as num_local_experts, flexmoe writes num_experts: read both, write one
    api.adopt(AdoptConfig(tmp_path / "stock", ["public", "code"]), tmp_path / "adopted", progress=False)
    cfg = hf_config.read_config(tmp_path / "adopted")
    assert [k for k in ("num_experts", "num_local_experts") if k in cfg] == [hf_config.family(cfg).num_experts_key]
    assert api.verify(tmp_path / "adopted").ok


def test_hidden_mean_row_reads_what_a_pre_norm_router_reads(merged):
    import transformers

    from flexmoe.data import pack, load_documents
    from flexmoe.data import load_tokenizer
    from flexmoe.io.anchor import read_anchor
    from flexmoe.router.rows import hidden_mean_row

    family, anchor_dir, _, _, text = merged
    anchor = read_anchor(anchor_dir)
    data, _ = pack(load_documents([text]), load_tokenizer(anchor_dir), 32, seed=0, progress=False)
    row = hidden_mean_row(anchor, data, num_seqs=4, batch_size=2)
    dense = getattr(transformers, hf_config.family(hf_config.read_config(anchor_dir)).dense_class)
    model = dense.from_pretrained(anchor_dir).eval()
    seen = []
    norm = model.model.layers[-1].post_attention_layernorm  # the last router's input in a pre-norm block
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(input_ids=data.batch(0, 4)[0])
    handle.remove()
    want = torch.cat(seen).double().mean(0).float()
    want = want * anchor.public_row.norm() / want.norm()
    torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)
