"""BiasedTopKRouter: the stock router plus min(b, 0) on the logits, same return contract."""

from __future__ import annotations

import pytest
import torch
from transformers import FlexOlmoConfig
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

from flexmoe.router.biased import BiasedTopKRouter


@pytest.fixture
def routers():
    cfg = FlexOlmoConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                         num_attention_heads=2, intermediate_size=32, num_hidden_layers=1, vocab_size=32)
    torch.manual_seed(0)
    stock = FlexOlmoTopKRouter(cfg)
    torch.nn.init.normal_(stock.weight)
    return cfg, stock, torch.randn(2, 5, 16)  # hidden (B, T, H)


def test_zero_or_positive_bias_is_the_stock_router(routers):
    cfg, stock, h = routers
    ref = stock(h)
    for bias in (None, torch.zeros(4), torch.tensor([0.0, 3.0, 0.5, 1e6])):
        out = BiasedTopKRouter.replacing(stock, cfg, bias)(h)
        assert len(out) == 3 and all(torch.equal(a, b) for a, b in zip(out, ref))


def test_negative_bias_shifts_logits_and_routing(routers):
    cfg, stock, h = routers
    bias = torch.tensor([0.0, -0.5, 2.0, -1e9])
    logits, scores, idx = BiasedTopKRouter.replacing(stock, cfg, bias)(h)
    ref_logits = stock(h)[0]
    assert logits.shape == (10, 4) and scores.shape == idx.shape == (10, 2)
    assert torch.allclose(logits, ref_logits + bias.clamp(max=0))
    assert not (idx == 3).any()  # a -inf-like bias removes the expert
    probs = torch.softmax(ref_logits[:, :3] + bias[:3].clamp(max=0), dim=-1)  # softmax over the others
    assert torch.allclose(scores, probs.topk(2, dim=-1).values, atol=1e-6)


def test_replacing_shares_the_weight_and_trains_the_bias(routers):
    cfg, stock, h = routers
    r = BiasedTopKRouter.replacing(stock, cfg, torch.tensor([0.0, -1.0, 1.0, -2.0]))
    assert r.weight is stock.weight and r.top_k == 2 and r.expert_bias.dtype == torch.float32
    logits, scores, _ = r(h)
    (logits.sum() + scores.sum()).backward()
    g = r.expert_bias.grad
    assert g[1] != 0 and g[3] != 0 and g[2] == 0  # clamp: a positive bias gets no gradient
    with pytest.raises(ValueError, match=r"\(4,\)"):
        BiasedTopKRouter.replacing(stock, cfg, torch.zeros(3))
