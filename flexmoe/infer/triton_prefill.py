"""The two element-wise passes around the prefill's grouped GEMMs (`experts._grouped`), one kernel each.

With 4,096 prompt tokens and top-2 the grouped GEMMs run near peak, but stock PyTorch spends as long again around
them (H200, 1B-class shape, a layer): silu over the strided gate half of the (S, 2I) product, then the product
with the up half (two passes, ~360 us), and putting the expert outputs back in pair order (index_copy) before a
batched (1 x k) @ (k x H) per token (~100 us). Here:
- `silu_mul`: act(gate) * up in one read of the (S, 2I) product, rounded as the stock ops round (after silu,
  after the product);
- `combine_pairs`: every token gathers its k rows of the sorted expert output through the inverse permutation and
  sums them weighted (weights rounded to the outputs' dtype, fp32 sum, as the stock bmm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexmoe.infer.triton_decode import _round


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, I, stride_h, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    g = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * stride_h + I + offs, mask=ok, other=0.0).to(tl.float32)
    act = _round(g * tl.sigmoid(g), out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, (act * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(S, 2I) -> (S, I): silu(gate_up[:, :I]) * gate_up[:, I:]."""
    S, two_i = gate_up.shape
    I = two_i // 2
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(S, I)
    BLOCK = 1024
    _silu_mul_kernel[(S, triton.cdiv(I, BLOCK))](gate_up, out, I, gate_up.stride(0), out.stride(0), BLOCK=BLOCK)
    return out


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, H, stride_y, stride_o, TOPK: tl.constexpr,
                    BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(inv_ptr + t * TOPK + j).to(tl.int64)  # where pair (t, j) sits in the sorted output
        w = _round(tl.load(w_ptr + t * TOPK + j).to(tl.float32), y_ptr.dtype.element_ty)
        acc += w * tl.load(y_ptr + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def combine_pairs(y_sorted: torch.Tensor, order: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """(S, H) expert outputs in sorted order (row i is pair order[i] = t * k + j) -> (T, H) weighted sums."""
    T, k = top_k_weights.shape
    S, H = y_sorted.shape
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=order.device, dtype=order.dtype))
    y_sorted = y_sorted.contiguous()
    out = y_sorted.new_empty(T, H)
    BLOCK = 1024
    _combine_kernel[(T, triton.cdiv(H, BLOCK))](y_sorted, inv, top_k_weights.contiguous(), out, H,
                                                y_sorted.stride(0), out.stride(0), TOPK=k, BLOCK=BLOCK)
    return out
