"""Split-KV decode attention (flexmoe.infer.triton_attention) against SDPA, in fp32 in Triton's CPU interpreter.

The GPU file (test_fast_gpu.py) runs the compiled kernels in bf16.
"""

from __future__ import annotations

import pytest

_CHECK = r"""
import torch
import torch.nn.functional as F
from flexmoe.infer import triton_attention
from flexmoe.infer.triton_attention import block_slots, decode_attention

def check(B, HQ, HKV, L, last, pads, max_splits=64, gated=None, block=None):
    triton_attention.MAX_SPLITS = max_splits
    torch.manual_seed(last)
    D = 16
    q = torch.randn(B, HQ, 1, D)
    keys, values = torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    keys[:, :, last + 1:] = float("nan")  # never written: a program that read them would return NaN
    values[:, :, last + 1:] = float("nan")
    slots = torch.arange(L)
    seen = (slots[None, :] >= torch.tensor(pads)[:, None]) & (slots[None, :] <= last)  # (B, L)
    mask = torch.zeros(B, 1, 1, L).masked_fill_(~seen[:, None, None], torch.finfo(torch.float32).min)
    got = decode_attention(q, keys, values, mask, torch.tensor(last), 0.3, gated=gated, block=block)
    n = last + 1
    want = F.scaled_dot_product_attention(q, keys[:, :, :n], values[:, :, :n], attn_mask=mask[..., :n], scale=0.3,
                                          enable_gqa=HQ != HKV).reshape(B, HQ * D)
    assert got.shape == want.shape and torch.isfinite(got).all()
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, (B, HQ, HKV, L, last, pads, max_splits, diff)

for gated in (True, False):  # loads that wait for the length, and loads that go out first
    check(1, 4, 4, 64, 0, [0], gated=gated)                         # the first slot only
    check(2, 4, 2, 64, 16, [0, 5], gated=gated)                     # GQA, a padded row, a new block's first slot
    check(3, 2, 1, 96, 95, [0, 40, 2], gated=gated, block=32)       # a full cache, a row padded past a block
    check(2, 2, 2, 200, 150, [3, 0], max_splits=4, gated=gated)     # several blocks a program (online softmax)
print("ok")
"""


def test_split_kv_attention_equals_sdpa(triton_interpreter):
    """Equal to SDPA over the written slots within 1e-5 (fp32), with left padding, GQA, a cache filled up to any
    slot, and programs that walk several blocks, gated loads or not; slots past the one written this step hold NaN
    and never reach the result."""
    triton_interpreter(_CHECK)


def test_block_slots_spreads_a_short_cache():
    pytest.importorskip("triton")
    from flexmoe.infer.triton_attention import block_slots

    assert block_slots(16, 192, 264) == 32  # batch 1, 16 heads: 6 blocks of 32 -> 96 programs
    assert block_slots(32 * 16, 192, 264) == 64
    assert block_slots(16, 2048, 264) == 64
