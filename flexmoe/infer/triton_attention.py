"""Decode attention over the static KV cache, split over the cache's slots (flash-decoding), in two launches.

A decode step has one query per row and head, and SDPA's cuDNN kernel takes 24.6 us a layer at batch 32 for 42 MB
of K/V (1.7 TB/s, H100, a 192-slot cache of 16 heads written to slot 160) and 7.0 us at batch 1, and its batch-32
sums are not repeatable (benchmarks/NOTES.md §6). Here (20.2 and 5.1 us, the same cases) the slots are split
into blocks of 32 or 64 and every (row, head, block) is a program: each loads its keys and values in one round
trip to memory and writes a partial softmax (its maximum, sum and weighted values, fp32); a second kernel combines
a (row, head)'s partials in a fixed order, so the result repeats bit for bit. Where programs are many (batch 32,
long caches) slots past the one written this step are not read; where they are few (batch 1, short caches) the
loads go out before the cache's length is known and the unwritten slots are zeroed after. The decoder's additive
mask is added to the scores as SDPA adds it (left padding).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_SPLITS = 64  # partials a (row, head) combines at most; longer caches give each program several blocks


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, scale,
                    stride_qb, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                    stride_mb, stride_ml, L,
                    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCKS: tl.constexpr, SPLITS: tl.constexpr, GATED: tl.constexpr):
    row_head = tl.program_id(0)  # b * HQ + h
    split = tl.program_id(1)
    start = split * BLOCK * BLOCKS
    b = (row_head // HQ).to(tl.int64)
    kv = (row_head % HQ) // GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (row_head % HQ) * D + d).to(tl.float32)
    k_row = k_ptr + b * stride_kb + kv * stride_kh
    v_row = v_ptr + b * stride_vb + kv * stride_vh
    last = tl.load(len_ptr).to(tl.int32)  # the slot written this step, the last one a query sees
    m = float("-inf")
    l = 0.0
    acc = tl.zeros((D,), dtype=tl.float32)
    for i in tl.static_range(BLOCKS):
        slots = start + i * BLOCK + tl.arange(0, BLOCK)
        seen = slots <= last
        # GATED: the loads wait for `last` and skip unwritten slots (bytes, at large batch); else they go out
        # with the query's, one round trip less (latency, at small batch), and unwritten slots are zeroed after
        fetch = seen if GATED else slots < L
        k = tl.load(k_row + slots[:, None].to(tl.int64) * stride_kl + d[None, :], mask=fetch[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(v_row + slots[:, None].to(tl.int64) * stride_vl + d[None, :], mask=fetch[:, None],
                    other=0.0).to(tl.float32)
        add = tl.load(mask_ptr + b * stride_mb + slots * stride_ml, mask=fetch, other=0.0).to(tl.float32)
        if not GATED:
            v = tl.where(seen[:, None], v, 0.0)  # an unwritten slot may hold anything, NaN included
        s = tl.where(seen, tl.sum(k * q[None, :], axis=1) * scale + add, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    if start <= last:  # programs wholly past it saw nothing: the combine skips their partials
        part = row_head * SPLITS + split
        tl.store(m_ptr + part, m)
        tl.store(l_ptr + part, l)
        tl.store(acc_ptr + part.to(tl.int64) * D + d, acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr, stride_ob, HQ: tl.constexpr, D: tl.constexpr,
                    SPLIT_SLOTS: tl.constexpr, SPLITS: tl.constexpr, BS: tl.constexpr):
    row_head = tl.program_id(0)
    s = tl.arange(0, BS)
    part = row_head * SPLITS + s
    inside = s < SPLITS
    d = tl.arange(0, D)
    # every partial is loaded with the length, in one round trip; those not written this step (stale values of an
    # earlier step or layer, NaN included) are dropped after
    m = tl.load(m_ptr + part, mask=inside, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=inside, other=0.0)
    acc = tl.load(acc_ptr + part[:, None].to(tl.int64) * D + d[None, :], mask=inside[:, None], other=0.0)
    ok = s < tl.load(len_ptr).to(tl.int32) // SPLIT_SLOTS + 1  # the partials written this step
    m = tl.where(ok, m, float("-inf"))
    top = tl.max(m, axis=0)
    w = tl.exp(m - top)  # 0 for the dropped ones
    total = tl.sum(tl.where(ok, w * l, 0.0), axis=0)
    o = tl.sum(tl.where(ok[:, None], w[:, None] * acc, 0.0), axis=0) / total
    b = (row_head // HQ).to(tl.int64)
    tl.store(out_ptr + b * stride_ob + (row_head % HQ) * D + d, o.to(out_ptr.dtype.element_ty))


def block_slots(rows_heads: int, cache_len: int, programs: int) -> int:
    """Slots a program reads at once: 64, or 32 where 64 gives fewer than `programs` programs (twice the
    multiprocessors), so that a short cache at batch 1 spreads further over the GPU. Measured (H100,
    benchmarks/decode_attention_bench.py): batch 1 over 192 slots 32 slots 5.1 us, 64 5.3, 16 6.6; batch 32 64
    slots 20.2 us, 32 20.5, 16 24.1 (2 warps each)."""
    return 64 if rows_heads * triton.cdiv(cache_len, 64) >= programs else 32


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     length: torch.Tensor, scale: float, *, block: int | None = None, warps: int | None = None,
                     gated: bool | None = None) -> torch.Tensor:
    """Attention of one new query per row over the static cache, what
    `F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=...)` returns.

    Args:
        q: (B, HQ, 1, D) the step's queries (contiguous).
        keys, values: (B, HKV, L, D) the layer's static cache, written up to slot `length`.
        mask: (B, 1, 1, L) additive mask in any float dtype (0 where a slot is seen, the dtype's minimum elsewhere).
        length: () int tensor, the slot of this step's token (the tokens cached before it).
        block, warps, gated: the partial kernel's slots a block, warps, and whether its loads wait for `length`
            (default: by the shape; benchmarks/decode_attention_bench.py times the choices).
    Returns:
        (B, HQ D) the attention output in q's dtype, the layout the output projection takes.
    """
    B, HQ, _, D = q.shape
    HKV, L = keys.shape[1], keys.shape[2]
    rows_heads = B * HQ
    sms = _multiprocessors(q.device)
    block = block or block_slots(rows_heads, L, 2 * sms)
    blocks = triton.cdiv(triton.cdiv(L, block), MAX_SPLITS)  # blocks a program walks
    splits = triton.cdiv(L, block * blocks)
    gated = rows_heads * splits >= 2 * sms if gated is None else gated
    m = torch.empty(rows_heads * splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(rows_heads * splits, D, device=q.device, dtype=torch.float32)
    _partial_kernel[(rows_heads, splits)](
        q, keys, values, mask, length, m, l, acc, scale, q.stride(0), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), mask.stride(0), mask.stride(-1), L,
        HQ=HQ, GROUP=HQ // HKV, D=D, BLOCK=block, BLOCKS=blocks, SPLITS=splits, GATED=gated,
        num_warps=warps or 2)
    out = torch.empty(B, HQ * D, device=q.device, dtype=q.dtype)
    BS = triton.next_power_of_2(splits)
    _combine_kernel[(rows_heads,)](m, l, acc, length, out, out.stride(0), HQ=HQ, D=D, SPLIT_SLOTS=block * blocks,
                                   SPLITS=splits, BS=BS, num_warps=max(1, min(8, BS * D // 1024)))
    return out
