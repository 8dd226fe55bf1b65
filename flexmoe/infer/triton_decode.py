"""Triton kernels that fuse the small steps of a FlexOlmo decoder layer around its matrix products (decode only).

At batch 1 a decode step moves ~4 GB at the 1B-class shape, yet the stock layer spends it in ~43 kernels, most of
them element-wise passes over a few KB (norms, RoPE's slices and concatenations, casts, the router's softmax and
top-k, the residual adds). Each kernel here does one row (one sequence) per program (the q/k kernel: two) and
rounds to the model's dtype exactly where the stock modules round (after each norm, each RoPE product and sum, the
residual add, the router's linear and bias), so a fused step computes what the stock step computes up to fp32
summation order.

- `qk_norm_rope_cache`: q_norm and k_norm (OLMo-2's norms over the full projection width), RoPE, and the write of
  the new key and value into the static cache at the cache's current length.
- `post_attention_router`: residual + post_attention_layernorm(attention output), then the router: logits, the
  expert bias min(b, 0), softmax over all experts, top-k (optionally renormalised).
- `post_feedforward`: the sum of the k routing-weighted expert outputs, post_feedforward_layernorm, residual add.
- `argmax_rows`: the greedy pick over the vocabulary in two passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The router and post-feed-forward kernels load a whole row at once where it fits in registers (one round trip to
# memory; batch 1 +2.5% on an H100, see benchmarks/NOTES.md §6); False forces the chunked two-pass kernels of wider
# rows (the tests run both).
ONE_PASS = True


def _one_pass_warps(values: int) -> int | None:
    """Warps of a one-pass kernel that holds `values` fp32 values in registers, at most 64 a thread (4 to 16
    warps); None where they do not fit (or ONE_PASS is off): then the chunked kernel runs."""
    if not ONE_PASS or values > 16 * 32 * 64:
        return None
    return max(4, triton.next_power_of_2(values // 2048))


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 -> the model's dtype -> fp32: where the stock module's output is stored in that dtype."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _norm_rope_heads(src, w_ptr, cos1, cos2, sin1, sin2, eps, NH: tl.constexpr, BNH: tl.constexpr,
                     D: tl.constexpr, HALF: tl.constexpr, dtype: tl.constexpr):
    """RMSNorm over all NH * D values of `src` (one row), then RoPE per head; returns the two halves (BNH, HALF)."""
    heads = tl.arange(0, BNH)
    d = tl.arange(0, HALF)
    ok = (heads < NH)[:, None]
    off = heads[:, None] * D + d[None, :]  # (BNH, HALF) first half of each head
    x1 = tl.load(src + off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + HALF, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(tl.sum(x1 * x1, axis=1), axis=0) + tl.sum(tl.sum(x2 * x2, axis=1), axis=0))
                    / (NH * D) + eps)
    w1 = tl.load(w_ptr + off, mask=ok, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + off + HALF, mask=ok, other=0.0).to(tl.float32)
    n1 = _round(x1 * rstd * w1, dtype)
    n2 = _round(x2 * rstd * w2, dtype)
    # stock RoPE in the model's dtype: q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q2, q1)
    o1 = _round(_round(n1 * cos1[None, :], dtype) + _round(-n2 * sin1[None, :], dtype), dtype)
    o2 = _round(_round(n2 * cos2[None, :], dtype) + _round(n1 * sin2[None, :], dtype), dtype)
    return o1, o2


@triton.jit
def _qk_norm_rope_cache_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, len_ptr,
                               stride_qkv, stride_cos, stride_q, stride_kcb, stride_kch, stride_kcl,
                               stride_vcb, stride_vch, stride_vcl, eps,
                               HQ: tl.constexpr, HKV: tl.constexpr, BHQ: tl.constexpr, BHKV: tl.constexpr,
                               D: tl.constexpr, HALF: tl.constexpr):
    b = tl.program_id(0)
    dtype = q_ptr.dtype.element_ty
    slot = tl.load(len_ptr).to(tl.int64)  # this token's cache slot: the tokens cached so far
    d = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + b * stride_cos + d).to(tl.float32)
    cos2 = tl.load(cos_ptr + b * stride_cos + HALF + d).to(tl.float32)
    sin1 = tl.load(sin_ptr + b * stride_cos + d).to(tl.float32)
    sin2 = tl.load(sin_ptr + b * stride_cos + HALF + d).to(tl.float32)
    row = qkv_ptr + b.to(tl.int64) * stride_qkv  # [q (HQ * D) | k (HKV * D) | v (HKV * D)]
    if tl.program_id(1) == 0:  # the query and the key/value of a row in two programs, side by side
        q1, q2 = _norm_rope_heads(row, qw_ptr, cos1, cos2, sin1, sin2, eps, HQ, BHQ, D, HALF, dtype)
        hq = tl.arange(0, BHQ)
        q_off = q_ptr + b.to(tl.int64) * stride_q + hq[:, None] * D + d[None, :]
        tl.store(q_off, q1.to(dtype), mask=(hq < HQ)[:, None])
        tl.store(q_off + HALF, q2.to(dtype), mask=(hq < HQ)[:, None])
    else:
        k1, k2 = _norm_rope_heads(row + HQ * D, kw_ptr, cos1, cos2, sin1, sin2, eps, HKV, BHKV, D, HALF, dtype)
        hk = tl.arange(0, BHKV)
        ok = (hk < HKV)[:, None]
        k_off = (kc_ptr + b.to(tl.int64) * stride_kcb + hk[:, None].to(tl.int64) * stride_kch + slot * stride_kcl
                 + d[None, :])
        tl.store(k_off, k1.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(k_off + HALF, k2.to(kc_ptr.dtype.element_ty), mask=ok)
        v_src = row + (HQ + HKV) * D + hk[:, None] * D + d[None, :]
        v_off = (vc_ptr + b.to(tl.int64) * stride_vcb + hk[:, None].to(tl.int64) * stride_vch + slot * stride_vcl
                 + d[None, :])
        tl.store(v_off, tl.load(v_src, mask=ok, other=0.0), mask=ok)
        tl.store(v_off + HALF, tl.load(v_src + HALF, mask=ok, other=0.0), mask=ok)


def qk_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       length: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Normalise and rotate the new query and key of every row, and store key and value in the static cache.

    Args:
        qkv: (B, (HQ + 2 HKV) D) the q, k and v projections of one token per row, side by side.
        q_norm_weight: (HQ D,); k_norm_weight: (HKV D,) OLMo-2's norms over the whole projection.
        cos, sin: (B, 1, D) RoPE tables of each row's position (the model's rotary embedding).
        keys, values: (B, HKV, L, D) the layer's static cache; written at slot `length`.
        length: () int tensor, the tokens cached so far (not advanced here).
    Returns:
        (B, HQ, 1, D) the query, ready for attention.
    """
    B = qkv.shape[0]
    D = keys.shape[-1]
    q = torch.empty(B, num_heads, 1, D, device=qkv.device, dtype=qkv.dtype)
    cos, sin = cos.reshape(B, D), sin.reshape(B, D)
    _qk_norm_rope_cache_kernel[(B, 2)](
        qkv, q_norm_weight, k_norm_weight, cos, sin, q, keys, values, length,
        qkv.stride(0), cos.stride(0), q.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), eps,
        HQ=num_heads, HKV=num_kv_heads, BHQ=triton.next_power_of_2(num_heads),
        BHKV=triton.next_power_of_2(num_kv_heads), D=D, HALF=D // 2, num_warps=4)
    return q


@triton.jit
def _post_attention_router_kernel(o_ptr, x_ptr, nw_ptr, h_ptr, rw_ptr, bias_ptr, idx_ptr, wts_ptr, eps,
                                  stride_o, stride_x, stride_h, stride_rw,
                                  H: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr,
                                  BH: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_TOPK: tl.constexpr,
                                  ONE_PASS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    dtype = h_ptr.dtype.element_ty
    offs = tl.arange(0, BH)
    experts = tl.arange(0, BE)
    e_ok = experts < E
    if ONE_PASS:  # BH >= H: every load issued at once, one round trip to memory instead of four
        ok = offs < H
        o = tl.load(o_ptr + b * stride_o + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(rw_ptr + experts[:, None] * stride_rw + offs[None, :], mask=e_ok[:, None] & ok[None, :],
                    other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(o * o, axis=0) / H + eps)
        h = _round(x + _round(o * rstd * w, dtype), dtype)  # residual + post_attention_layernorm(attn)
        tl.store(h_ptr + b * stride_h + offs, h.to(dtype), mask=ok)
        acc = r * h[None, :]
    else:
        sq = tl.zeros((BH,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            o = tl.load(o_ptr + b * stride_o + h0 + offs, mask=h0 + offs < H, other=0.0).to(tl.float32)
            sq += o * o
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / H + eps)
        acc = tl.zeros((BE, BH), dtype=tl.float32)
        for h0 in range(0, H, BH):
            ok = h0 + offs < H
            o = tl.load(o_ptr + b * stride_o + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(nw_ptr + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + b * stride_x + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            h = _round(x + _round(o * rstd * w, dtype), dtype)
            tl.store(h_ptr + b * stride_h + h0 + offs, h.to(dtype), mask=ok)
            r = tl.load(rw_ptr + experts[:, None] * stride_rw + h0 + offs[None, :],
                        mask=e_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
            acc += r * h[None, :]
    logits = _round(tl.sum(acc, axis=1), dtype)  # (BE,) the router's linear, in the model's dtype
    if HAS_BIAS:
        bias = tl.load(bias_ptr + experts, mask=e_ok, other=0.0).to(tl.float32)
        logits = _round(logits + _round(tl.minimum(bias, 0.0), dtype), dtype)
    logits = tl.where(e_ok, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)  # softmax in fp32 over all E experts
    total = 1.0
    if NORM_TOPK:
        left = p
        total = 0.0
        for _ in tl.static_range(K):
            top = tl.max(left, axis=0)
            pick = tl.min(tl.where(left == top, experts, BE), axis=0)
            total += top
            left = tl.where(experts == pick, -1.0, left)
    left = p
    for j in tl.static_range(K):  # top-k by repeated arg-max; the lowest index wins a tie
        top = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == top, experts, BE), axis=0)
        tl.store(idx_ptr + b * K + j, pick.to(idx_ptr.dtype.element_ty))
        tl.store(wts_ptr + b * K + j, (top / total).to(wts_ptr.dtype.element_ty))
        left = tl.where(experts == pick, -1.0, left)


def post_attention_router(attn_out: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                          router_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                          norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = residual + RMSNorm(attn_out), and the router's top-k experts of h.

    Args:
        attn_out, residual: (B, H); router_weight: (E, H); expert_bias: (E,) raw biases (applied as min(b, 0)).
    Returns:
        h (B, H) in the residual's dtype; top_k_index (B, k) int64; top_k_weights (B, k) in the residual's dtype.
    """
    B, H = residual.shape
    E = router_weight.shape[0]
    h = torch.empty_like(residual)
    idx = torch.empty(B, top_k, device=h.device, dtype=torch.int64)
    wts = torch.empty(B, top_k, device=h.device, dtype=h.dtype)
    BE = triton.next_power_of_2(E)
    BH = triton.next_power_of_2(H)
    warps = _one_pass_warps(BE * BH)  # the whole (E, H) router weight in registers
    one_pass = warps is not None
    if not one_pass:
        BH = max(64, min(1024, 8192 // BE))  # (BE, BH) router tile of at most 8192 values
        warps = 4
    _post_attention_router_kernel[(B,)](
        attn_out, residual, norm_weight, h, router_weight, expert_bias if expert_bias is not None else h, idx, wts,
        eps, attn_out.stride(0), residual.stride(0), h.stride(0), router_weight.stride(0),
        H=H, E=E, BE=BE, K=top_k, BH=BH, HAS_BIAS=expert_bias is not None, NORM_TOPK=norm_topk_prob,
        ONE_PASS=one_pass, num_warps=warps)
    return h, idx, wts


@triton.jit
def _slot_sum(y_ptr, b, h0, offs, ok, stride_y, K: tl.constexpr, dtype):
    """The experts' output of row b at columns h0 + offs: the sum over its k routing-weighted slots."""
    s = tl.zeros(offs.shape, dtype=tl.float32)
    for j in tl.static_range(K):
        s += tl.load(y_ptr + (b * K + j) * stride_y + h0 + offs, mask=ok, other=0.0).to(tl.float32)
    return _round(s, dtype)


@triton.jit
def _post_feedforward_kernel(y_ptr, h_ptr, nw_ptr, out_ptr, eps, stride_y, stride_h, stride_out,
                             H: tl.constexpr, K: tl.constexpr, BH: tl.constexpr, ONE_PASS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    offs = tl.arange(0, BH)
    if ONE_PASS:  # BH >= H: every load issued at once
        ok = offs < H
        s = _slot_sum(y_ptr, b, 0, offs, ok, stride_y, K, dtype)
        w = tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(h_ptr + b * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
        tl.store(out_ptr + b * stride_out + offs, (x + _round(s * rstd * w, dtype)).to(dtype), mask=ok)
    else:
        sq = tl.zeros((BH,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            s = _slot_sum(y_ptr, b, h0, offs, h0 + offs < H, stride_y, K, dtype)
            sq += s * s
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / H + eps)
        for h0 in range(0, H, BH):
            ok = h0 + offs < H
            s = _slot_sum(y_ptr, b, h0, offs, ok, stride_y, K, dtype)
            w = tl.load(nw_ptr + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(h_ptr + b * stride_h + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + b * stride_out + h0 + offs, (x + _round(s * rstd * w, dtype)).to(dtype), mask=ok)


def post_feedforward(pair_out: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """residual + RMSNorm(sum over each row's k slots of `pair_out`).

    Args:
        pair_out: (B k, H) routing-weighted expert outputs (`fused_expert_pairs`), row t * k + j for slot j of row t.
        residual: (B, H).
    Returns:
        (B, H) in the residual's dtype.
    """
    B, H = residual.shape
    out = torch.empty_like(residual)
    K = pair_out.shape[0] // B
    BH = triton.next_power_of_2(H)
    warps = _one_pass_warps(K * BH)  # the k slots of a whole row in registers
    one_pass = warps is not None
    if not one_pass:
        BH, warps = min(1024, BH), 4
    _post_feedforward_kernel[(B,)](pair_out, residual, norm_weight, out, eps, pair_out.stride(0),
                                   residual.stride(0), out.stride(0), H=H, K=K, BH=BH, ONE_PASS=one_pass,
                                   num_warps=warps)
    return out


@triton.jit
def _argmax_part_kernel(x_ptr, val_ptr, idx_ptr, N, stride_x, CHUNK: tl.constexpr, PARTS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + b * stride_x + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
    top, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + b * PARTS + c, top)
    tl.store(idx_ptr + b * PARTS + c, at + c * CHUNK)


@triton.jit
def _argmax_combine_kernel(val_ptr, idx_ptr, out_ptr, PARTS: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BP)
    v = tl.load(val_ptr + b * PARTS + p, mask=p < PARTS, other=float("-inf"))
    top, at = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)  # the first part wins
    tl.store(out_ptr + b, tl.load(idx_ptr + b * PARTS + at))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a (B, V) tensor (the first index of the maximum), in two passes over many programs: a
    batch-1 argmax over a 100k vocabulary is one block of torch's reduction, ~23 us on an H200."""
    B, N = x.shape
    CHUNK = 4096
    parts = triton.cdiv(N, CHUNK)
    vals = torch.empty(B, parts, device=x.device, dtype=torch.float32)
    idx = torch.empty(B, parts, device=x.device, dtype=torch.int64)
    _argmax_part_kernel[(B, parts)](x, vals, idx, N, x.stride(0), CHUNK=CHUNK, PARTS=parts, num_warps=8)
    out = torch.empty(B, device=x.device, dtype=torch.int64)
    _argmax_combine_kernel[(B,)](vals, idx, out, PARTS=parts, BP=triton.next_power_of_2(parts))
    return out

