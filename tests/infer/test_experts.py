"""flexmoe's experts kernels against transformers' stock eager experts (fp32, CPU, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from transformers import FlexOlmoConfig
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoExperts

from flexmoe.infer import experts as X


def _experts(num_experts=4, hidden=64, inter=96, seed=0) -> FlexOlmoExperts:
    torch.manual_seed(seed)
    cfg = FlexOlmoConfig(hidden_size=hidden, intermediate_size=inter, num_experts=num_experts, num_experts_per_tok=2,
                         vocab_size=64, pad_token_id=0, eos_token_id=1)
    cfg._experts_implementation = "eager"
    ex = FlexOlmoExperts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    return ex


def _routing(tokens, num_experts, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(tokens, num_experts, generator=g).softmax(dim=-1)
    weights, index = torch.topk(probs, k, dim=-1)  # not renormalised, as in FlexOlmo
    return index, weights


@pytest.mark.parametrize("tokens,num_experts,k", [(1, 4, 2), (7, 4, 2), (33, 8, 4), (5, 3, 3)])
@pytest.mark.parametrize("path", ["loop", "dense"])
def test_paths_match_stock_eager(tokens, num_experts, k, path):
    ex = _experts(num_experts)
    x = torch.randn(tokens, 64)
    index, weights = _routing(tokens, num_experts, k)
    ref = ex(x, index, weights)  # stock eager (config says "eager")
    fn = {"loop": X._sorted_loop, "dense": X._dense}[path]
    torch.testing.assert_close(fn(ex, x, index, weights), ref, rtol=1e-5, atol=1e-6)


def test_registered_kernel_runs_through_transformers_dispatch():
    X.register()
    ex = _experts()
    x = torch.randn(9, 64)
    index, weights = _routing(9, 4, 2)
    ref = ex(x, index, weights)
    ex.config._experts_implementation = X.EXPERTS_IMPL
    torch.testing.assert_close(ex(x, index, weights), ref, rtol=1e-5, atol=1e-6)
    for name in (X.EXPERTS_IMPL, X.GROUPED_IMPL, X.TRITON_IMPL):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        assert name in ALL_EXPERTS_FUNCTIONS


def test_sort_pairs_groups_by_expert_with_cumulative_ends():
    index = torch.tensor([[2, 0], [0, 3], [2, 1]])  # pairs 0..5 -> experts 2,0,0,3,2,1
    order, ends = X.sort_pairs(index, num_experts=5)
    assert order.tolist() == [1, 2, 5, 0, 4, 3]  # stable within an expert
    assert ends.tolist() == [2, 3, 5, 6, 6] and ends.dtype == torch.int32  # expert 4 empty


def test_unused_expert_weights_are_never_read():
    # NaN weights in an expert no token chose must not reach the output (each path reads only chosen experts,
    # except the documented dense fallback).
    ex = _experts(num_experts=4)
    with torch.no_grad():
        ex.gate_up_proj[3].fill_(float("nan"))
    x = torch.randn(6, 64)
    index = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])
    weights = torch.full((6, 2), 0.4)
    assert torch.isfinite(X._sorted_loop(ex, x, index, weights)).all()


_TRITON_CHECK = r"""
import torch, torch.nn.functional as F
from flexmoe.infer import deterministic
from flexmoe.infer.triton_moe import block_rows, fused_experts
torch.manual_seed(0)
cases = [(1, 2, 4, 64, 96), (3, 2, 4, 32, 64), (32, 2, 4, 64, 128), (8, 4, 8, 48, 80), (40, 2, 4, 32, 32),
         (64, 2, 4, 32, 32)]
assert sorted({block_rows(T * k, E) for T, k, E, _, _ in cases}) == [16, 32, 64]
for T, k, E, H, I in cases:
    x = torch.randn(T, H); wgu = torch.randn(E, 2 * I, H) / 8; wd = torch.randn(E, H, I) / 8
    w, idx = torch.randn(T, E).softmax(-1).topk(k, -1)
    ref = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            g, u = (wgu[idx[t, j]] @ x[t]).chunk(2)
            ref[t] += w[t, j] * (wd[idx[t, j]] @ (F.silu(g) * u))
    torch.testing.assert_close(fused_experts(x, wgu, wd, idx, w), ref, rtol=1e-4, atol=1e-5)
    with deterministic():  # the fixed tiles, launched without the autotuner
        torch.testing.assert_close(fused_experts(x, wgu, wd, idx, w), ref, rtol=1e-4, atol=1e-5)
print("ok")
"""


def test_triton_kernel_in_interpreter(triton_interpreter):
    """The Triton decode kernel, run by Triton's CPU interpreter (skipped where Triton is not installed), with the
    autotuner's tiles and with the fixed ones of deterministic mode."""
    triton_interpreter(_TRITON_CHECK)
