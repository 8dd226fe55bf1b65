"""Matrix-vector products for one decode row: the dense projections and the chosen experts at batch 1.

With one token a step every weight is read once and multiplied by one vector, so the only cost is the read. A
tensor-core tile (`triton_moe`'s blocks, cuBLAS' GEMM) pads the row to 16 or 64 and stages the weights through
shared memory, which caps how many programs an SM holds and so how many bytes are in flight; here each program
streams BN rows of the weight straight into registers (a (BN, BK) tile a step along K, FMA into fp32, one
reduction at the end), so an SM holds many programs and the reads run near the copy rate.

One kernel, three epilogues (`MODE`):
- DENSE: y = W x (q/k/v, o).
- GATE_UP: pair p = t * k + j reads expert top_k_index[p]'s gate rows n and up rows I + n and writes
  silu(gate) * up, rounded once as `triton_moe._gate_up_kernel` rounds.
- DOWN: pair p's expert's down rows, scaled by the pair's routing weight, one output row per pair.
The pair axis is the grid's fastest one, so pairs of different tokens that chose the same expert read the same
tile at about the same time (an L2 hit for the second); at batch 1 the k pairs are k different experts.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# epilogues; constexpr globals so that the compiled kernel may read them (the CPU interpreter takes plain ints too)
DENSE, GATE_UP, DOWN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET:  # the CPU interpreter: one config keeps tests fast
        return [triton.Config({"BN": 8, "BK": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(8, 256, 4, 2), (16, 256, 4, 2), (8, 512, 4, 2), (16, 512, 8, 2),
                                 (32, 128, 4, 3), (4, 512, 4, 3)]]


@triton.autotune(configs=_configs(), key=["N", "K", "MODE", "ROWS"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, index_ptr, scale_ptr, stride_x, stride_we, stride_wn, stride_y, ROWS,
                 N: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr, MODE: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    r = tl.program_id(0)  # output row: the token (DENSE) or the (token, slot) pair
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if MODE != DENSE:
        w_rows += tl.load(index_ptr + r).to(tl.int64) * stride_we
    x_row = x_ptr + (r // TOPK).to(tl.int64) * stride_x
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    acc_u = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            xv = tl.load(x_row + offs_k).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < K
            xv = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
        if MODE == GATE_UP:  # the up rows sit N (= I) rows below the gate rows
            if EVEN_K:
                u = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=n_ok[:, None], other=0.0)
            else:
                u = tl.load(w_rows + N * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0.0)
            acc_u += u.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)  # (BN,)
    if MODE == GATE_UP:
        y = y * tl.sigmoid(y) * tl.sum(acc_u, axis=1)  # silu(gate) * up
    if MODE == DOWN:
        y = y * tl.load(scale_ptr + r).to(tl.float32)
    tl.store(y_ptr + r.to(tl.int64) * stride_y + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _launch(x, w, y, mode, index=None, scale=None, topk=1):
    rows, N = y.shape
    K = x.shape[-1]
    _gemv_kernel[lambda meta: (rows, triton.cdiv(N, meta["BN"]))](
        x, w, y, index if index is not None else y, scale if scale is not None else y,
        x.stride(0), w.stride(0) if w.dim() == 3 else 0, w.stride(-2), y.stride(0), rows,
        N=N, K=K, TOPK=topk, MODE=mode.value)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without a bias for x of a few rows (each row reads the weight; for one row in decode).

    Args:
        x: (R, K), rows contiguous; weight: (N, K) row-major.
    Returns:
        (R, N) in x's dtype.
    """
    if weight.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("gemv wants row-major weights and rows")
    return _launch(x, weight, x.new_empty(x.shape[0], weight.shape[0]), DENSE)


def expert_pairs_gemv(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                      top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """`triton_moe.fused_expert_pairs` for a few tokens (one in decode at batch 1): (T k, H), row t * k + j =
    top_k_weights[t, j] * FFN_{top_k_index[t, j]}(hidden_states[t]), in the weights' dtype; two launches, no layout
    kernel."""
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    I = w_gate_up.shape[1] // 2
    x = hidden_states.to(w_gate_up.dtype).contiguous()
    index = top_k_index.reshape(-1).contiguous()
    h = _launch(x, w_gate_up.contiguous(), x.new_empty(T * k, I), GATE_UP, index=index, topk=k)  # (T k, I)
    return _launch(h, w_down.contiguous(), x.new_empty(T * k, H), DOWN, index=index,
                   scale=top_k_weights.reshape(-1).contiguous())  # (T k, H)
