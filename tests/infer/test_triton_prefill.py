"""The prefill's element-wise kernels in Triton's CPU interpreter (fp32) against the stock ops they replace."""

from __future__ import annotations

_CHECK = r"""
import torch, torch.nn.functional as F
from flexmoe.infer import experts as X
from flexmoe.infer.triton_prefill import combine_pairs, silu_mul
torch.manual_seed(0)
for S, I in [(5, 96), (3, 1100)]:  # I over one block and not a multiple of it
    h = torch.randn(S, 2 * I)
    g, u = h.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(h), F.silu(g) * u, rtol=1e-6, atol=1e-6)
for T, k, E, H in [(7, 2, 4, 40), (3, 3, 5, 1500)]:
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    order, _ = X.sort_pairs(index, E)
    y = torch.randn(T * k, H)
    torch.testing.assert_close(combine_pairs(y, order, weights), X._combine(y, order, weights), rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_prefill_kernels_in_interpreter(triton_interpreter):
    triton_interpreter(_CHECK)
