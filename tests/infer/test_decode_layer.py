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

def check(kv_heads, norm_topk, biased, rows=3, one_pass=True, attention="split_kv"):
    from flexmoe.infer import decode_layer, triton_decode
    triton_decode.ONE_PASS = one_pass  # False: the chunked kernels of wider rows
    decode_layer.DECODE_ATTENTION = attention
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


def kernels():
    import torch.nn.functional as F
    from flexmoe.infer.triton_decode import argmax_rows

    torch.manual_seed(1)
    logits = torch.randn(3, 10000)
    logits[1, 7] = logits[1, 9000] = 100.0  # a tie: the first index, as torch.argmax
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


# GQA with a biased router (both router paths); full heads with renormalised top-k and the stock router; batch 1;
# SDPA instead of the split-KV attention
print("ok", check(2, False, True), check(2, False, True, one_pass=False), check(4, True, False),
      check(2, False, True, rows=1), check(2, False, True, rows=1, attention="sdpa"), kernels())
"""


def test_fused_decode_equals_stock_generate(triton_interpreter):
    """Tokens equal to stock `generate` and logits within 1e-4 (fp32), left padding included; weights unchanged;
    and the two-pass argmax against torch's (ties included)."""
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
