"""A merged tiny model loads in stock transformers (clean, no bias) and through flexmoe.load_model (bias)."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Olmo2ForCausalLM

from flexmoe.checkpoint import surgery
from flexmoe.config import MergeConfig
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import FFN_PROJS, dense_ffn_key
from flexmoe.checkpoint.load import load_model
from flexmoe.router.biased import BiasedTopKRouter
from flexmoe.testing import stock_load

IDS = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def merged(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    surgery.merge(MergeConfig(ckpt.anchor, [ckpt.pkg["code"], ckpt.pkg["news"]], top_k=2), root / "abc", progress=False)
    return root / "abc"


def test_lazy_top_level_export():
    import flexmoe

    assert flexmoe.load_model.__module__ == "flexmoe.api"


def test_stock_loads_clean_and_load_model_applies_bias(merged, tmp_path, capfd):
    stock, said = stock_load(merged, capfd)
    assert "unexpected" not in said and "missing" not in said and "error" not in said
    assert type(stock).__name__ == "FlexOlmoForCausalLM" and stock.config.num_experts == 3
    ours = load_model(merged)
    assert all(isinstance(layer.mlp.gate, BiasedTopKRouter) for layer in ours.model.layers)
    with LazyReader.from_file(merged / surgery.BIAS_FILE) as r:
        assert torch.equal(ours.model.layers[1].mlp.gate.expert_bias.detach(),
                           r.get("model.layers.1.mlp.gate.expert_bias"))
    a, b = logits(stock), logits(ours)
    assert a.isfinite().all() and b.isfinite().all() and a.shape == (2, 9, 512)
    assert not torch.allclose(a, b)  # the random packages carry negative biases: they must change something
    assert torch.equal(logits(load_model(merged, apply_bias=False)), a)
    # The capture above would have seen a bad key: prove it on a copy with one extra and one missing tensor.
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(merged, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.mlp.gate.expert_bias"] = torch.zeros(3)
    del sd["model.norm.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    _, said = stock_load(bad, capfd)
    assert "unexpected" in said and "missing" in said


def test_zero_bias_gives_stock_logits(ckpt, tmp_path, capfd):
    surgery.merge(MergeConfig(ckpt.anchor, [ckpt.zero_bias["code"], ckpt.zero_bias["news"]]), tmp_path / "m", progress=False)
    stock, _ = stock_load(tmp_path / "m", capfd)
    assert torch.equal(logits(stock), logits(load_model(tmp_path / "m")))


def _force_single_expert(model, e: int) -> None:
    """Route every token to expert e alone: zero router, bias -1e4 elsewhere, top-1."""
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.expert_bias.fill_(-1e4)
            layer.mlp.gate.expert_bias[e] = 0.0
        layer.mlp.gate.top_k = 1


def test_each_slot_holds_its_experts_ffn(ckpt, merged):
    """Forced onto expert e, the merged model is the dense anchor with FFN e: shared layers + slot order."""
    dense = Olmo2ForCausalLM.from_pretrained(ckpt.anchor).eval()
    model = load_model(merged)
    for e, pkg in enumerate([None, ckpt.pkg["code"], ckpt.pkg["news"]]):
        if pkg is not None:
            with LazyReader.from_file(pkg / "expert.safetensors") as r, torch.no_grad():
                for i, layer in enumerate(dense.model.layers):
                    for p in FFN_PROJS:
                        getattr(layer.mlp, p).weight.copy_(r.get(dense_ffn_key(i, p)))
        _force_single_expert(model, e)
        torch.testing.assert_close(logits(model), logits(dense), rtol=1e-5, atol=1e-5)


def test_opted_out_expert_equals_the_merge_without_it(ckpt, merged, tmp_path):
    """An expert whose bias is -inf in every layer contributes nothing: the same model as merging without it."""
    surgery.merge(MergeConfig(ckpt.anchor, [ckpt.pkg["code"]], top_k=2), tmp_path / "ab", progress=False)
    model = load_model(merged)
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.gate.expert_bias[2] = float("-inf")
    torch.testing.assert_close(logits(model), logits(load_model(tmp_path / "ab")), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
def test_experts_implementations_agree(merged, impl):
    ref = logits(load_model(merged, experts_implementation="eager"))
    try:
        model = load_model(merged, experts_implementation=impl)
        got = logits(model)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        pytest.skip(f"{impl} not available on this CPU build: {e}")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_load_model_without_sidecar_uses_zero_bias(merged, tmp_path, capfd):
    import shutil

    from flexmoe.errors import IntegrityError
    from flexmoe.testing import drop_manifest

    plain = tmp_path / "plain"
    shutil.copytree(merged, plain)
    (plain / surgery.BIAS_FILE).unlink()
    with pytest.raises(IntegrityError, match="flexmoe_router_bias.safetensors is missing"):
        load_model(plain)  # the manifest lists it: a folder that lost it is damaged
    drop_manifest(plain)  # a folder without flexmoe's manifest (e.g. written by another tool) loads with bias 0
    stock, _ = stock_load(plain, capfd)
    assert torch.equal(logits(load_model(plain)), logits(stock))
