"""flexmoe's experts kernel for `FlexOlmoExperts` (and `Qwen3MoeExperts`, `MixtralExperts`, which store the same
layout), plugged into transformers' `ALL_EXPERTS_FUNCTIONS` registry.

transformers routes `FlexOlmoExperts.forward(hidden_states, top_k_index, top_k_weights)` through
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`, so registering a function under a name and calling
`model.set_experts_implementation(name)` swaps the kernel without touching the model class or the weights.

Registered names:
- "flexmoe": sort the (token, slot) pairs by expert, then one grouped GEMM per projection reading only the
  experts that got tokens. On CUDA + bf16 small batches (decode) use a Triton kernel (`flexmoe.infer.triton_moe`)
  when Triton is importable, `torch._grouped_mm` otherwise; bigger batches (prefill) always use `torch._grouped_mm`,
  with silu(gate) * up and the weighted sum over the k slots as one Triton kernel each (`triton_prefill`).
- "flexmoe_grouped": the same but always `torch._grouped_mm` on CUDA (for A/B benchmarks).
- "flexmoe_triton": the same but the Triton kernel on CUDA up to 4096 (token, slot) pairs (for A/B benchmarks).

The bf16 CUDA paths are free of host synchronisation (no `.nonzero()`/`.item()`/`.tolist()`), so a decode step
that uses them can be captured in a CUDA graph. Where the grouped GEMM is unavailable on CUDA (not bf16, or too old
a GPU) a loop over the sorted groups runs (one host sync per layer), and while a CUDA graph is being captured or
torch.compile traces, a dense fallback that computes every expert (graph-safe, but reads all E experts' weights).
On CPU the loop gives the exact result of the stock eager kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPERTS_IMPL = "flexmoe"
GROUPED_IMPL = "flexmoe_grouped"
TRITON_IMPL = "flexmoe_triton"

# Pairs (tokens x top-k) up to which "flexmoe" takes the Triton kernel: decode batches; prefill is compute-bound
# and goes to the CUTLASS grouped GEMM.
TRITON_MAX_PAIRS = 256
TRITON_HARD_MAX_PAIRS = 4096  # the layout kernel is one program over all pairs: keep it small


def register() -> None:
    """Add flexmoe's kernels to transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPL, flexmoe_experts_forward)
    ALL_EXPERTS_FUNCTIONS.register(GROUPED_IMPL, flexmoe_grouped_experts_forward)
    ALL_EXPERTS_FUNCTIONS.register(TRITON_IMPL, flexmoe_triton_experts_forward)


def flexmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with transformers' signature; `self` is a `FlexOlmoExperts` (or a family's equivalent).

    Args:
        hidden_states: (T, H) tokens.
        top_k_index: (T, k) expert ids chosen by the router.
        top_k_weights: (T, k) routing probabilities (not renormalised).
    Returns:
        (T, H) sum over the k chosen experts of weight * FFN_e(token).
    """
    return _forward(self, hidden_states, top_k_index, top_k_weights, prefer="auto")


def flexmoe_grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """As `flexmoe_experts_forward`, always the CUTLASS grouped GEMM on CUDA."""
    return _forward(self, hidden_states, top_k_index, top_k_weights, prefer="grouped")


def flexmoe_triton_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """As `flexmoe_experts_forward`, the Triton kernel on CUDA up to 4096 (token, slot) pairs."""
    return _forward(self, hidden_states, top_k_index, top_k_weights, prefer="triton")


def _forward(self, hidden_states, top_k_index, top_k_weights, *, prefer: str) -> torch.Tensor:
    w_gate_up, w_down = self.gate_up_proj, self.down_proj  # (E, 2I, H), (E, H, I)
    if getattr(self, "is_transposed", False) or getattr(self, "has_bias", False) or not getattr(self, "has_gate", True):
        raise NotImplementedError("flexmoe experts expect FlexOlmo's layout: gated, untransposed, no bias")
    if hidden_states.device.type != "cuda":
        return _sorted_loop(self, hidden_states, top_k_index, top_k_weights)
    pairs = top_k_index.numel()
    if (prefer != "grouped" and w_gate_up.dtype in (torch.bfloat16, torch.float16) and _is_silu(self)
            and _triton_available() and pairs <= (TRITON_HARD_MAX_PAIRS if prefer == "triton" else TRITON_MAX_PAIRS)):
        from flexmoe.infer.triton_moe import fused_experts_op

        return fused_experts_op(hidden_states, w_gate_up, w_down, top_k_index, top_k_weights)
    if _grouped_mm_ok(w_gate_up):
        return _grouped(self, hidden_states, top_k_index, top_k_weights)
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return _dense(self, hidden_states, top_k_index, top_k_weights)  # no host sync allowed here
    return _sorted_loop(self, hidden_states, top_k_index, top_k_weights)


def sort_pairs(top_k_index: torch.Tensor, num_experts: int):
    """Group the (token, slot) pairs by expert, on device and without a host sync.

    Args:
        top_k_index: (T, k) expert ids.
    Returns:
        order: (S,) pair ids p = t * k + j sorted by expert (stable, S = T * k).
        ends: (E,) int32 cumulative pair counts: expert e owns sorted rows [ends[e-1], ends[e]).
    """
    flat = top_k_index.reshape(-1)  # (S,)
    sorted_ids, order = torch.sort(flat, stable=True)  # (S,), (S,)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)  # (E,)
    ends = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)  # (E,)
    return order, ends


def _combine(y_sorted: torch.Tensor, order: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """(S, H) expert outputs in sorted order -> (T, H) routing-weighted sum over each token's k slots."""
    T, k = top_k_weights.shape
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # (S, H) back in pair order t * k + j
    # One batched (1 x k) @ (k x H) product per token: weighting and the k-sum in a single kernel, fp32 accumulate.
    out = torch.bmm(top_k_weights.to(y.dtype).view(T, 1, k), y.view(T, k, -1))  # (T, 1, H)
    return out.view(T, -1)


def _grouped(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    k = top_k_index.shape[-1]
    order, ends = sort_pairs(top_k_index, self.num_experts)  # (S,), (E,)
    x = hidden_states.index_select(0, torch.div(order, k, rounding_mode="floor"))  # (S, H) sorted by expert
    # grouped_mm wants (E, K, N) weights: the transposed views of the stored (E, N, K) tensors (no copy).
    h = _grouped_mm(x, self.gate_up_proj.transpose(1, 2), ends)  # (S, 2I)
    fused = _triton_available() and _is_silu(self)  # one pass each instead of two (flexmoe.infer.triton_prefill)
    if fused:
        from flexmoe.infer.triton_prefill import combine_pairs, silu_mul
    h = silu_mul(h) if fused else self._apply_gate(h)  # (S, I)  act(gate) * up
    y = _grouped_mm(h, self.down_proj.transpose(1, 2), ends)  # (S, H)
    y = combine_pairs(y, order, top_k_weights) if fused else _combine(y, order, top_k_weights)
    return y.to(hidden_states.dtype)


def _sorted_loop(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """CPU path: one pair of matmuls per expert that got tokens (the group sizes are read on the host)."""
    k = top_k_index.shape[-1]
    order, ends = sort_pairs(top_k_index, self.num_experts)
    x = hidden_states.index_select(0, torch.div(order, k, rounding_mode="floor"))  # (S, H)
    y = x.new_empty(x.shape[0], self.down_proj.shape[1])  # (S, H)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            h = self._apply_gate(F.linear(x[start:end], self.gate_up_proj[e]))  # (n_e, I)
            y[start:end] = F.linear(h, self.down_proj[e])
        start = end
    return _combine(y, order, top_k_weights).to(hidden_states.dtype)


def _dense(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Graph-safe fallback for CUDA without a grouped GEMM: every expert on every token, weighted by a dense gate."""
    T, E = hidden_states.shape[0], self.num_experts
    h = torch.matmul(hidden_states.unsqueeze(0), self.gate_up_proj.transpose(1, 2))  # (E, T, 2I)
    h = self._apply_gate(h)  # (E, T, I)
    y = torch.matmul(h, self.down_proj.transpose(1, 2))  # (E, T, H)
    gate = torch.zeros(T, E, device=y.device, dtype=y.dtype).scatter_(1, top_k_index, top_k_weights.to(y.dtype))
    return torch.einsum("te,eth->th", gate, y).to(hidden_states.dtype)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(S, K) @ per-group (E, K, N) -> (S, N); rows past ends[-1] are not written."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x.to(w.dtype), w, offs=ends)


def _grouped_mm_ok(w: torch.Tensor) -> bool:
    if w.dtype != torch.bfloat16 or not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    return torch.cuda.get_device_capability(w.device) >= (8, 0)


def _is_silu(self) -> bool:
    """The Triton kernel fuses SiLU only (FlexOlmo's `hidden_act`); other activations take the grouped GEMM."""
    act = self.act_fn
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


_TRITON: bool | None = None


def _triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except Exception:
            _TRITON = False
    return _TRITON
