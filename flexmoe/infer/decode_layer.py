"""A FlexOlmo decoder layer's decode step (one new token per row) in ten kernels instead of the stock ~43.

    q, k, v      one GEMM over the three projections (their weights become row slices of one tensor)
    q/k          q_norm, k_norm, RoPE and the K/V cache write              (flexmoe.infer.triton_decode)
    attention    split over the cache's slots, two launches (flexmoe.infer.triton_attention)
    o            the output projection
    h            residual + post_attention_layernorm, and the router's top-k (flexmoe.infer.triton_decode)
    experts      layout + gate/up + down of the chosen experts                (flexmoe.infer.triton_moe)
    out          sum over the k slots, post_feedforward_layernorm, residual add (flexmoe.infer.triton_decode)

The layer module, its weights and the checkpoint are unchanged: `FastDecoder` installs a `FusedDecodeLayer` as
the layer's call only inside decode steps (prefill runs the stock forward, which fills the cache). The K/V write
does not advance the cache's length; the decoder advances every layer's length once per step.

Only the FlexOlmo architecture (OLMo-2 layers: post-norms, q/k norms over the whole projection) with its stock or
biased router, SiLU experts and the CUDA half-precision dtypes qualifies (`why_not_fused` says why not); every other
model decodes through its stock layers. Rounding follows the stock modules (see triton_decode), so the fused step
differs from the stock step only by fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DECODE_DTYPES = (torch.bfloat16, torch.float16)
# "split_kv": flexmoe.infer.triton_attention (repeatable; +1.3% batch 1, +2.1% batch 32 a call, H100); "sdpa": torch's
# SDPA over the whole static cache with the additive mask (cuDNN's kernel on Hopper). infer_bench times both.
DECODE_ATTENTION = "split_kv"


def why_not_fused(model, *, any_device: bool = False) -> str | None:
    """None when every decoder layer of `model` can take the fused decode step, else the first reason it cannot.

    any_device: also accept CPU and fp32 (for Triton's CPU interpreter, `TRITON_INTERPRET=1`, in tests).
    """
    from transformers.models.flex_olmo.modeling_flex_olmo import (FlexOlmoDecoderLayer, FlexOlmoRMSNorm,
                                                                   FlexOlmoTopKRouter)

    from flexmoe.infer.experts import _is_silu
    from flexmoe.router.biased import BiasedTopKRouter

    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if getattr(model.config, "model_type", None) != "flex_olmo":
        return f"the fused decode layer is FlexOlmo's, this model is {getattr(model.config, 'model_type', '?')!r}"
    param = next(model.parameters())
    if not any_device and (param.device.type != "cuda" or param.dtype not in DECODE_DTYPES):
        return f"the fused decode layer runs on CUDA in bf16/fp16, the model is {param.dtype} on {param.device.type}"
    if model.config._attn_implementation not in ("sdpa", "eager"):
        return f"attention {model.config._attn_implementation!r} (the fused layer uses SDPA over the static cache)"
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if type(layer) is not FlexOlmoDecoderLayer:
            return f"layer {i} is a {type(layer).__name__}"
        if attn.q_proj.bias is not None or attn.o_proj.bias is not None:
            return "attention projections with a bias"
        norms = (attn.q_norm, attn.k_norm, layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        if not all(isinstance(n, FlexOlmoRMSNorm) for n in norms):
            return f"layer {i} has a norm that is not FlexOlmo's RMSNorm"
        if type(mlp.gate) not in (FlexOlmoTopKRouter, BiasedTopKRouter):
            return f"layer {i}'s router is a {type(mlp.gate).__name__}"
        ex = mlp.experts
        if not _is_silu(ex) or getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False):
            return f"layer {i}'s experts are not FlexOlmo's gated SiLU layout"
    D = model.model.layers[0].self_attn.head_dim
    if D % 2 or (D // 2) & (D // 2 - 1):
        return f"head dim {D} (the RoPE kernel wants half of it a power of two)"
    return None


class FusedDecodeLayer:
    """The decode-step call of one `FlexOlmoDecoderLayer`, with the layer's own call signature.

    Building it concatenates the layer's q/k/v weights into one tensor and points the three projections' weights
    at its row slices (the same values, no extra memory; done once per layer).
    """

    def __init__(self, layer, layer_idx: int):
        attn = layer.self_attn
        self.layer, self.idx = layer, layer_idx
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // attn.head_dim
        self.num_kv_heads = attn.k_proj.out_features // attn.head_dim
        self.qkv_weight = _fuse_qkv(attn)  # ((HQ + 2 HKV) D, H)

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids=None, cache=None, position_embeddings=None, past_key_values=None, **kwargs):
        from flexmoe.infer.triton_attention import decode_attention
        from flexmoe.infer.triton_decode import post_attention_router, post_feedforward, qk_norm_rope_cache
        from flexmoe.infer.triton_moe import fused_expert_pairs

        layer = self.layer
        attn, gate, experts = layer.self_attn, layer.mlp.gate, layer.mlp.experts
        cache = cache if cache is not None else past_key_values
        B, _, H = hidden_states.shape
        x = hidden_states.view(B, H)  # one token per row
        kv = cache.layers[self.idx]
        cos, sin = position_embeddings
        q = qk_norm_rope_cache(F.linear(x, self.qkv_weight), attn.q_norm.weight, attn.k_norm.weight,
                               attn.q_norm.variance_epsilon, cos, sin, kv.keys, kv.values, kv.cumulative_length,
                               self.num_heads, self.num_kv_heads)  # (B, HQ, 1, D)
        # the decoder hands fused steps an additive mask in the model's dtype, built once a step: a bool mask would
        # be converted to one inside SDPA in every layer (three kernels)
        if DECODE_ATTENTION == "split_kv":
            o = decode_attention(q, kv.keys, kv.values, attention_mask, kv.cumulative_length, attn.scaling)
        else:
            o = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=attention_mask, scale=attn.scaling,
                                               enable_gqa=self.num_heads != self.num_kv_heads)  # (B, HQ, 1, D)
            o = o.view(B, self.num_heads * self.head_dim)
        o = F.linear(o, attn.o_proj.weight)  # (B, H)
        norm = layer.post_attention_layernorm
        h, top_k_index, top_k_weights = post_attention_router(
            o, x, norm.weight, norm.variance_epsilon, gate.weight, getattr(gate, "expert_bias", None), gate.top_k,
            bool(getattr(gate, "norm_topk_prob", False)))
        pairs = fused_expert_pairs(h, experts.gate_up_proj, experts.down_proj, top_k_index, top_k_weights)
        norm = layer.post_feedforward_layernorm
        return post_feedforward(pairs, h, norm.weight, norm.variance_epsilon).view(B, 1, H)


def _fuse_qkv(attn) -> torch.Tensor:
    """One ((HQ + 2 HKV) D, H) tensor whose row slices are the q, k and v weights from now on."""
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    fused = getattr(attn, "_flexmoe_qkv", None)
    if fused is not None and q.data_ptr() == fused.data_ptr() and v.data_ptr() == fused[-v.shape[0]:].data_ptr():
        return fused  # already fused by an earlier decoder on this model
    with torch.no_grad():
        fused = torch.cat([q, k, v])
        nq, nk = q.shape[0], k.shape[0]
        q.data, k.data, v.data = fused[:nq], fused[nq:nq + nk], fused[nq + nk:]
    attn._flexmoe_qkv = fused
    return fused


def fused_layers(model) -> list[FusedDecodeLayer]:
    return [FusedDecodeLayer(layer, i) for i, layer in enumerate(model.model.layers)]
