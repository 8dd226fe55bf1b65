"""A fused mixture-of-experts kernel in Triton for small token counts (decode).

At decode time each step multiplies a handful of tokens by the weights of the experts they chose, so the cost is
reading those weights once. The CUTLASS grouped GEMM behind `torch._grouped_mm` is tuned for large groups; here
the (token, slot) pairs are laid out in blocks of BM rows that each belong to one expert, and every program
streams one BN-wide slice of that expert's weights once, whatever the number of tokens in the block.

Three launches per MoE layer, all with shapes fixed by (tokens, k, E), so CUDA-graph capturable:
1. `_align_kernel` (one program): pair -> padded row layout, and the expert of every block.
2. `_gate_up_kernel`: h = act(x W_gate^T) * (x W_up^T) for the rows of a block, written per pair.
3. `_down_kernel`: y = routing_weight * (h W_down^T), written per pair; then a sum over the k slots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(choices):
    """(BN, BK, num_warps, num_stages) tuples -> autotune configs; few of them, each costs a compile."""
    if _INTERPRET:  # the CPU interpreter: one config keeps tests fast
        bn, bk = choices[0][:2]
        return [triton.Config({"BN": bn, "BK": bk}, num_warps=4, num_stages=1)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in choices]


@triton.jit
def _align_kernel(topk_ptr, row_pair_ptr, block_expert_ptr, S, P, E,
                  BM: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr,
                  NBP: tl.constexpr):
    # One program. Pair p (= t * k + j) with expert e goes to row pstart[e] + rank of p among e's pairs, where
    # pstart pads every expert's group to a multiple of BM. Unused rows hold S (an invalid pair).
    offs_s = tl.arange(0, BS)
    ids = tl.load(topk_ptr + offs_s, mask=offs_s < S, other=-1).to(tl.int32)  # (BS,) expert of each pair
    experts = tl.arange(0, BE)
    eq = (ids[:, None] == experts[None, :]).to(tl.int32)  # (BS, BE) one-hot
    counts = tl.sum(eq, axis=0)  # (BE,)
    padded = (counts + BM - 1) // BM * BM
    pends = tl.cumsum(padded, axis=0)  # (BE,)
    pstarts = pends - padded
    rank = tl.sum(eq * (tl.cumsum(eq, axis=0) - 1), axis=1)  # (BS,) earlier pairs of the same expert
    dest = tl.sum(eq * pstarts[None, :], axis=1) + rank  # (BS,)
    offs_p = tl.arange(0, BP)
    tl.store(row_pair_ptr + offs_p, tl.full((BP,), 0, tl.int32) + S, mask=offs_p < P)
    tl.debug_barrier()
    tl.store(row_pair_ptr + dest, offs_s, mask=offs_s < S)
    # Block b starts at row b * BM; its expert is the number of padded groups that end at or before that row.
    offs_b = tl.arange(0, NBP)
    ends_before = (pends[None, :] <= (offs_b * BM)[:, None]) & (experts[None, :] < E)  # (NBP, BE)
    tl.store(block_expert_ptr + offs_b, tl.sum(ends_before.to(tl.int32), axis=1), mask=offs_b * BM < P)


@triton.autotune(configs=_configs([(64, 128, 4, 4), (32, 128, 4, 4), (64, 128, 8, 4), (128, 64, 4, 4),
                                   (32, 256, 4, 3), (64, 256, 8, 3)]),
                 key=["S", "E", "H", "I", "BM"])
@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, row_pair_ptr, block_expert_ptr, S, E, TOPK,
                    stride_xt, stride_we, stride_wn, stride_hs,
                    H: tl.constexpr, I: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:  # a block past the last group
        return
    rows = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(row_pair_ptr + rows)  # (BM,)
    valid = pair < S
    tok = tl.where(valid, pair // TOPK, 0)
    offs_n = pid_n * BN + tl.arange(0, BN)  # columns of the intermediate dimension
    n_ok = offs_n < I
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_xt + offs_k[None, :]  # (BM, BK)
    # W_gate_up[e] is (2I, H) row-major: gate rows [0, I), up rows [I, 2I); tiles are read as (BK, BN).
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        k_ok = offs_k < H - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g)
        acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
    h_ptrs = h_ptr + tl.where(valid, pair, 0)[:, None].to(tl.int64) * stride_hs + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


# No BN 16: with them the autotuner (timing each candidate on one weight tensor) chose 16/512/4/3 in an E4 k2 run,
# which reads the weights from HBM at 2.85 TB/s at one token against 32/256/4/6's 3.55 (23.6 vs 18.9 us;
# benchmarks/expert_kernel_bench.py, a CUDA graph over 16 weight copies, H200, 1B shape). 32/256/4/6 needs too much
# shared memory for BM 64 (prefill-sized pair counts) and is pruned there.
@triton.autotune(configs=_configs([(32, 256, 4, 6), (32, 256, 4, 4), (32, 512, 4, 4), (64, 128, 4, 4),
                                   (32, 128, 4, 6), (32, 512, 8, 3)]),
                 key=["S", "E", "H", "I", "BM"])
@triton.jit
def _down_kernel(h_ptr, w_ptr, y_ptr, row_pair_ptr, block_expert_ptr, weight_ptr, S, E,
                 stride_hs, stride_we, stride_wn, stride_ys,
                 H: tl.constexpr, I: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair < S
    safe = tl.where(valid, pair, 0)
    offs_n = pid_n * BN + tl.arange(0, BN)  # output (hidden) columns
    n_ok = offs_n < H
    offs_k = tl.arange(0, BK)
    a_ptrs = h_ptr + safe[:, None].to(tl.int64) * stride_hs + offs_k[None, :]  # (BM, BK)
    # W_down[e] is (H, I) row-major.
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        k_ok = offs_k < I - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BK
        w_ptrs += BK
    gate = tl.load(weight_ptr + safe, mask=valid, other=0.0).to(tl.float32)  # (BM,) routing weight of the pair
    acc = acc * gate[:, None]
    y_ptrs = y_ptr + safe[:, None].to(tl.int64) * stride_ys + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


# Under `torch.use_deterministic_algorithms(True)` the two kernels launch with one fixed configuration instead of the
# autotuner's pick, which is timed afresh in every process: near-ties flip between runs, and another BK sums the
# inner dimension in another order, so the same prompt could decode differently in two processes (Inductor's
# deterministic mode stops autotuning for the same reason). (BN, BK, warps, stages): the lists' best at one token
# (benchmarks/expert_kernel_bench.py, H200); at BM 64, where the comment above has 32/256/4/6 pruned, 64/128/4/4.
_REPEATABLE_GATE_UP = (64, 128, 4, 4)
_REPEATABLE_DOWN = {16: (32, 256, 4, 6), 32: (32, 256, 4, 6), 64: (64, 128, 4, 4)}


def _launch(kernel, grid, args, choice, **constexprs) -> None:
    """`kernel` (autotuned) launched on `grid`, or with the fixed `choice` in deterministic mode."""
    if not torch.are_deterministic_algorithms_enabled():
        kernel[grid](*args, **constexprs)
        return
    bn, bk, warps, stages = choice
    kernel.fn[grid](*args, **constexprs, BN=bn, BK=bk, num_warps=warps, num_stages=1 if _INTERPRET else stages)


def block_rows(pairs: int, num_experts: int) -> int:
    """Rows per block: about the expected group size, so most active experts' weights are read by one block."""
    per_expert = -(-pairs // num_experts)
    return 16 if per_expert <= 12 else 32 if per_expert <= 24 else 64


def pair_layout(top_k_index: torch.Tensor, num_experts: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of `top_k_index` laid out in blocks of BM rows of one expert each (`_align_kernel`):
    (BM, number of blocks, row -> pair (S = no pair), block -> expert (>= num_experts past the last group))."""
    S = top_k_index.numel()
    E = num_experts
    BM = block_rows(S, E)
    num_blocks = -(-(S + min(E, S) * (BM - 1)) // BM)  # at most one partly filled block per active expert
    P = num_blocks * BM
    row_pair = torch.empty(P, device=top_k_index.device, dtype=torch.int32)
    block_expert = torch.empty(num_blocks, device=top_k_index.device, dtype=torch.int32)
    _align_kernel[(1,)](top_k_index.reshape(-1).contiguous(), row_pair, block_expert, S, P, E,
                        BM=BM, BS=triton.next_power_of_2(S), BE=triton.next_power_of_2(E),
                        BP=triton.next_power_of_2(P), NBP=triton.next_power_of_2(num_blocks))
    return BM, num_blocks, row_pair, block_expert


def fused_experts(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """sum_j top_k_weights[t, j] * FFN_{top_k_index[t, j]}(hidden_states[t]) for every token t.

    Args:
        hidden_states: (T, H).
        w_gate_up: (E, 2I, H) fused gate and up projections (gate rows first), as `FlexOlmoExperts` stores them.
        w_down: (E, H, I).
        top_k_index: (T, k) expert ids; top_k_weights: (T, k) routing weights.
    Returns:
        (T, H) in the dtype of `hidden_states`.
    """
    T, H = hidden_states.shape
    y = fused_expert_pairs(hidden_states, w_gate_up, w_down, top_k_index, top_k_weights, activation=activation)
    return y.view(T, top_k_index.shape[-1], H).sum(dim=1).to(hidden_states.dtype)  # (T, H)


def fused_expert_pairs(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                       top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                       activation: str = "silu") -> torch.Tensor:
    """As `fused_experts`, before the sum over slots: (T k, H), row t * k + j = top_k_weights[t, j] * FFN(token t)
    (in the weights' dtype); the fused decode layer sums the slots inside its norm kernel."""
    if activation != "silu":  # FlexOlmo uses SiLU; the activation is fused in `_gate_up_kernel`
        raise NotImplementedError(f"fused_experts supports silu only, not {activation}")
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    E, two_i, _ = w_gate_up.shape
    I = two_i // 2
    S = T * k
    dev = hidden_states.device
    x = hidden_states.to(w_gate_up.dtype).contiguous()  # under autocast the residual stream may be fp32
    w_gate_up = w_gate_up.contiguous()
    w_down = w_down.contiguous()
    BM, num_blocks, row_pair, block_expert = pair_layout(top_k_index, E)
    h = torch.empty(S, I, device=dev, dtype=x.dtype)  # (S, I) per pair
    _launch(_gate_up_kernel, lambda meta: (num_blocks, triton.cdiv(I, meta["BN"])),
            (x, w_gate_up, h, row_pair, block_expert, S, E, k,
             x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h.stride(0)), _REPEATABLE_GATE_UP, H=H, I=I, BM=BM)
    y = torch.empty(S, H, device=dev, dtype=x.dtype)  # (S, H) per pair, already weighted
    _launch(_down_kernel, lambda meta: (num_blocks, triton.cdiv(H, meta["BN"])),
            (h, w_down, y, row_pair, block_expert, top_k_weights.reshape(-1).contiguous(), S, E,
             h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0)), _REPEATABLE_DOWN[BM], H=H, I=I, BM=BM)
    return y


# An opaque operator for torch.compile: dynamo sees one op with a known output shape instead of tracing into the
# autotuned launches (the decode step is compiled per layer, the kernels inside are already fused).
@torch.library.custom_op("flexmoe::fused_experts", mutates_args=())
def fused_experts_op(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    return fused_experts(hidden_states, w_gate_up, w_down, top_k_index, top_k_weights)


@fused_experts_op.register_fake
def _(hidden_states, w_gate_up, w_down, top_k_index, top_k_weights):
    return torch.empty_like(hidden_states)
