"""The fused decode layer (flexmoe.infer.decode_layer) against the stock layers, in fp32 on CPU.

The Triton kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`, set before Triton is imported, hence a
subprocess); the GPU file (test_fast_gpu.py) runs them compiled, in bf16.
"""

from __future__ import annotations

import pytest
import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

from flexmoe.errors import ConfigError
from flexmoe.infer import FastDecoder
from flexmoe.infer.decode_layer import why_not_fused

_CHECK = r"""
import sys
import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM
from flexmoe.infer import FastDecoder, enable_fast_path
from flexmoe.router.biased import BiasedTopKRouter

def check(kv_heads, norm_topk, biased, rows=3, one_pass=True, attend=(True, 8, None)):
    from flexmoe.infer import triton_decode
    triton_decode.ONE_PASS = one_pass  # False: the chunked kernels of wider rows
    # the fused attention (cache slots a block, splits: None is 1 on CPU) or (False, ...) the q/k kernel + SDPA
    triton_decode.FUSED_ATTENTION, triton_decode.ATTEND_BLOCK, triton_decode.SPLITS = attend
    torch.manual_seed(0)
    cfg = FlexOlmoConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, num_experts=5, num_experts_per_tok=2, norm_topk_prob=norm_topk,
                         pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    m = FlexOlmoForCausalLM(cfg).eval()
    if biased:
        for layer in m.model.layers:
            layer.mlp.gate = BiasedTopKRouter.replacing(layer.mlp.gate, cfg, -2 * torch.rand(5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(2, 256, (rows, 9))
    mask = torch.ones_like(ids)
    mask[rows // 2, :4] = 0  # a left-padded row (at batch 1 the only row)
    with torch.inference_mode():
        stock = m.generate(ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    dec = enable_fast_path(m, fused="interpret")
    assert dec.fused
    out = dec.generate(ids, mask, max_new_tokens=7, output_logits=True)
    assert torch.equal(out.sequences, stock.sequences), (out.sequences, stock.sequences)
    diff = (out.logits - torch.stack(stock.logits, 1)).abs().max().item()
    assert diff < 1e-4, diff
    attn = m.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight[-1:].data_ptr() + attn.q_proj.weight.stride(0) * 4
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "fusing q/k/v changed a weight"
    return diff


def attention(B, HQ, HKV, L, slot, splits, block=8):
    # the fused attention against the q/k kernel + SDPA: one query a row over a cache of L slots, `slot` of them
    # filled, rows left-padded by up to all of them (the new token alone)
    import torch.nn.functional as F
    from flexmoe.infer import triton_decode as td

    torch.manual_seed(slot)
    D = 16
    qkv = torch.randn(B, (HQ + 2 * HKV) * D)
    qw, kw = torch.rand(HQ * D) + 0.5, torch.rand(HKV * D) + 0.5
    cos, sin = torch.randn(B, 1, D), torch.randn(B, 1, D)
    keys, values = torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    length = torch.tensor(slot)
    pad = torch.randint(0, slot + 1, (B,))
    pad[0], pad[-1] = 0, slot
    allowed = (torch.arange(L)[None] >= pad[:, None]) & (torch.arange(L)[None] <= slot)
    mask = torch.zeros(B, 1, 1, L).masked_fill_(~allowed[:, None, None], torch.finfo(torch.float32).min)
    ref_keys, ref_values = keys.clone(), values.clone()
    q = td.qk_norm_rope_cache(qkv, qw, kw, 1e-6, cos, sin, ref_keys, ref_values, length, HQ, HKV)
    ref = F.scaled_dot_product_attention(q, ref_keys, ref_values, attn_mask=mask, scale=D ** -0.5,
                                         enable_gqa=HQ != HKV).reshape(B, HQ * D)
    td.ATTEND_BLOCK, td.SPLITS = block, splits
    out = td.qk_norm_rope_attend(qkv, qw, kw, 1e-6, cos, sin, keys, values, length, mask, D ** -0.5, HQ, HKV)
    assert torch.equal(values, ref_values)
    assert (keys - ref_keys).abs().max() < 1e-6  # the same key up to the norm's fp32 summation order
    assert (out - ref).abs().max() < 1e-5, (out - ref).abs().max()


def kernels():
    import torch.nn.functional as F
    from flexmoe.infer.triton_decode import argmax_rows

    # one program a (row, head); GQA over 3 splits (the last one empty at slot 17 of 40); an empty cache; splits
    # that end mid-block
    attention(1, 4, 4, 40, 19, 1), attention(3, 4, 2, 40, 17, 3), attention(2, 4, 1, 64, 0, 2)
    attention(2, 2, 2, 33, 32, 4, block=4)

    torch.manual_seed(1)
    logits = torch.randn(3, 10000)
    logits[1, 7] = logits[1, 9000] = 100.0  # a tie: the first index, as torch.argmax
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


# GQA with a biased router (both router paths); full heads with renormalised top-k and the stock router; batch 1;
# the fused attention over 3 splits, and the q/k kernel + SDPA
print("ok", check(2, False, True), check(2, False, True, one_pass=False), check(4, True, False),
      check(2, False, True, rows=1), check(2, False, True, attend=(True, 4, 3)), check(4, True, False, attend=(False, None, None)),
      kernels())
"""


def test_fused_decode_equals_stock_generate(triton_interpreter):
    """Tokens equal to stock `generate` and logits within 1e-4 (fp32), left padding included; weights unchanged;
    the fused attention against the q/k kernel + SDPA; and the two-pass argmax against torch's (ties included)."""
    triton_interpreter(_CHECK, timeout=600)


def _model(**kw):
    torch.manual_seed(0)
    cfg = FlexOlmoConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
                         pad_token_id=0, eos_token_id=1, **kw)
    return FlexOlmoForCausalLM(cfg).eval()


def test_why_not_fused_names_the_reason():
    pytest.importorskip("triton")
    m = _model()
    assert "CUDA" in why_not_fused(m)  # an fp32 CPU model decodes through the stock layers by default
    assert why_not_fused(m, any_device=True) is None
    assert FastDecoder(m).fused is False
    m.model.layers[0].mlp.gate = torch.nn.Linear(32, 3)
    assert "router" in why_not_fused(m, any_device=True)


def test_insisting_on_fused_says_why_it_cannot():
    pytest.importorskip("triton")
    with pytest.raises(ConfigError, match="cannot fuse the decode step: .*CUDA.*fused=False"):
        FastDecoder(_model(), fused=True)


def test_other_families_are_not_fused():
    pytest.importorskip("triton")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         num_experts=3, num_experts_per_tok=2)
    assert "qwen3_moe" in why_not_fused(Qwen3MoeForCausalLM(cfg).eval(), any_device=True)


def test_fusing_qkv_keeps_the_weights_and_save_pretrained(tmp_path):
    """q/k/v weights become row slices of one tensor: the same values, and the model still saves and reloads."""
    from transformers import AutoModelForCausalLM

    from flexmoe.infer.decode_layer import fused_layers

    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    layer = fused_layers(m)[0]
    attn = m.model.layers[0].self_attn
    assert attn.v_proj.weight.data_ptr() == layer.qkv_weight[-attn.v_proj.weight.shape[0]:].data_ptr()
    assert fused_layers(m)[0].qkv_weight is layer.qkv_weight  # a second decoder reuses the fused tensor
    m.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)
