"""Routing statistics: counts match the router's own top-k, rows sum to k, top-k overrides, names."""

from __future__ import annotations

import pytest
import torch
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

from flexmoe import api
from flexmoe.config import EvalConfig
from flexmoe.errors import ConfigError
from flexmoe.eval.bpb import load_causal_lm, read_documents
from flexmoe.data import load_tokenizer
from flexmoe.router.biased import routers, set_top_k


def _cfg(model, data, **kw):
    return EvalConfig(model=model, data={k: str(v) for k, v in data.items()}, seq_len=40, batch_size=3,
                      bias=False, **kw)


@pytest.mark.parametrize("top_k", [None, 1, 0])
def test_fractions_sum_to_top_k_and_probs_to_one(eval_models, eval_data, top_k):
    r = api.evaluate(_cfg(eval_models.flex["flex3"], eval_data, top_k=top_k))
    k = {None: 2, 1: 1, 0: 3}[top_k]
    assert r.routing.top_k == k and r.routing.experts == ["public", "code", "speeches"]
    for dom, d in r.routing.domains.items():
        assert len(d.fraction) == 2  # layers
        for frac, prob in zip(d.fraction, d.mean_prob):
            assert sum(frac) == pytest.approx(k)
            assert sum(prob) == pytest.approx(1.0)
        if k == 3:
            assert all(f == pytest.approx(1.0) for row in d.fraction for f in row)
        # Inputs are every token of the stream [EOS] d_1 [EOS] d_2 ... but the last.
        res = next(x for x in r.domains if x.domain == dom)
        assert d.tokens == res.tokens + res.docs - 1


def test_counts_match_the_routers_own_choice(eval_models, eval_data):
    # One window, no padding: recompute top-k membership from the model's router logits directly.
    path = eval_models.flex["flex3"]
    model, tok = load_causal_lm(path, bias=False), load_tokenizer(path)
    doc = read_documents(eval_data["code"])[0]
    ids = [tok.eos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = model(x, output_router_logits=True).router_logits  # per layer (T, E)
    expected = []
    for layer_logits in logits:
        top = layer_logits.softmax(-1).topk(2, dim=-1).indices
        expected.append([(top == e).any(-1).float().mean().item() for e in range(3)])
    r = api.evaluate(EvalConfig(model=path, data={"code": str(eval_data["code"])}, max_bytes=len(doc.encode()), seq_len=len(ids), bias=False), progress=False)
    assert r.routing.domains["code"].tokens == len(ids) - 1
    for got, want in zip(r.routing.domains["code"].fraction, expected):
        assert got == pytest.approx(want)


def test_a_router_subclass_is_hooked_too(eval_models, eval_data):
    class ShiftedRouter(FlexOlmoTopKRouter):
        """Identical to FlexOlmoTopKRouter except: a large logit on the last expert, so it is always picked."""

        def forward(self, hidden_states):
            logits, _, _ = super().forward(hidden_states)
            logits = logits + torch.tensor([0.0, 0.0, 100.0])
            probs = logits.softmax(-1, dtype=torch.float)
            value, index = probs.topk(self.top_k, dim=-1)
            return logits, value.to(logits.dtype), index

    path = eval_models.flex["flex3"]
    model = load_causal_lm(path, bias=False)
    for layer in model.model.layers:
        old = layer.mlp.gate
        new = ShiftedRouter(model.config)
        new.load_state_dict(old.state_dict())
        layer.mlp.gate = new
    r = api.evaluate(_cfg(path, {"code": eval_data["code"]}), model=model)
    for row in r.routing.domains["code"].fraction:
        assert row[2] == pytest.approx(1.0)


def test_top_k_override_is_undone_and_checked(eval_models, eval_data):
    path = eval_models.flex["flex3"]
    model = load_causal_lm(path, bias=False)
    api.evaluate(_cfg(path, {"code": eval_data["code"]}, top_k=3), model=model)
    assert all(r.top_k == 2 for _, r in routers(model))
    with pytest.raises(ConfigError, match="out of range"):
        set_top_k(model, 4)
    with pytest.raises(ConfigError, match="dense"):
        api.evaluate(_cfg(eval_models.dense, {"code": eval_data["code"]}, top_k=1))


def test_dense_model_has_no_routing(eval_models, eval_data):
    assert api.evaluate(_cfg(eval_models.dense, {"code": eval_data["code"]})).routing is None


def test_expert_bias_is_applied_unless_no_bias(eval_models, eval_data, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from flexmoe.io.keys import router_bias_key

    path = shutil.copytree(eval_models.flex["flex3"], tmp_path / "m")
    # A large negative bias on "speeches" keeps it out of every top-2; a positive one is clamped to 0.
    save_file({router_bias_key(L): torch.tensor([0.0, 5.0, -1e4]) for L in range(2)},
              str(path / "flexmoe_router_bias.safetensors"))
    data = {"code": str(eval_data["code"])}
    biased = api.evaluate(EvalConfig(model=path, data=data, seq_len=40), progress=False)
    stock = api.evaluate(EvalConfig(model=path, data=data, seq_len=40, bias=False), progress=False)
    for row_b, row_s in zip(biased.routing.domains["code"].fraction, stock.routing.domains["code"].fraction):
        assert row_b == pytest.approx([1.0, 1.0, 0.0])
        assert row_s[2] > 0.1
    assert biased.bpb("code") != stock.bpb("code")
