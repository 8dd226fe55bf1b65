"""The register GEMV kernels (dense and per expert pair) in Triton's CPU interpreter, fp32, against plain torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_CHECK = r"""
import torch, torch.nn.functional as F
from flexmoe.infer import triton_moe
from flexmoe.infer.triton_gemv import expert_pairs_gemv, gemv
torch.manual_seed(0)
# K a multiple of the interpreter's BK (32) and not, N a multiple of BN (8) and not
for R, N, K in [(1, 64, 64), (1, 70, 100), (3, 5, 33)]:
    x, w = torch.randn(R, K), torch.randn(N, K)
    torch.testing.assert_close(gemv(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
try:
    gemv(torch.randn(1, 8), torch.randn(8, 4).T)
    raise SystemExit("a column-major weight was accepted")
except ValueError:
    pass
# T = 2 with both tokens on expert 1: two pairs read one expert
for T, k, E, H, I, idx in [(1, 2, 4, 64, 96, None), (1, 3, 4, 40, 84, None), (2, 2, 3, 64, 64, [[1, 0], [2, 1]])]:
    x = torch.randn(T, H); wgu = torch.randn(E, 2 * I, H) / 8; wd = torch.randn(E, H, I) / 8
    w, top = torch.randn(T, E).softmax(-1).topk(k, -1)
    if idx is not None:
        top = torch.tensor(idx)
    ref = torch.zeros(T * k, H)
    for t in range(T):
        for j in range(k):
            g, u = (wgu[top[t, j]] @ x[t]).chunk(2)
            ref[t * k + j] = w[t, j] * (wd[top[t, j]] @ (F.silu(g) * u))
    torch.testing.assert_close(expert_pairs_gemv(x, wgu, wd, top, w), ref, rtol=1e-4, atol=1e-5)
    # the block kernel (triton_moe) computes the same pairs: force it by lowering the GEMV threshold
    triton_moe.GEMV_MAX_TOKENS = 0
    torch.testing.assert_close(triton_moe.fused_expert_pairs(x, wgu, wd, top, w), ref, rtol=1e-4, atol=1e-5)
    triton_moe.GEMV_MAX_TOKENS = 1
print("ok")
"""


def test_gemv_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
