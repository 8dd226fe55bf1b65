"""`SwiGLUFFN`: the expert block's lean-backward FFN computes exactly what autograd computes on the plain ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexmoe.expert.upcycle import SwiGLUFFN, compute_dtype


def _plain(h, gate_up, down):
    gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def _lean(h, gate_up, down):
    return SwiGLUFFN.apply(h, gate_up, down, compute_dtype(h))


@pytest.mark.parametrize("autocast,h_dtype,w_dtype", [(False, torch.float32, torch.float32),
                                                      (False, torch.bfloat16, torch.bfloat16),
                                                      (True, torch.float32, torch.float32),
                                                      (True, torch.float32, torch.bfloat16),
                                                      (True, torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True), (True, False, True)],
                         ids=["all", "input-only", "weights-only", "input+down"])
def test_outputs_and_gradients_are_bit_identical(autocast, h_dtype, w_dtype, needs):
    g = torch.Generator().manual_seed(0)
    N, H, I = 37, 16, 24
    inputs = (torch.randn(N, H, generator=g).to(h_dtype), torch.randn(2 * I, H, generator=g).to(w_dtype),
              torch.randn(H, I, generator=g).to(w_dtype))
    dy = torch.randn(N, H, generator=g)
    results = []
    for fn in (_plain, _lean):
        leaves = [t.clone().requires_grad_(r) for t, r in zip(inputs, needs)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(*leaves)
        (y.float() * dy).sum().backward()
        results.append([y] + [t.grad for t in leaves])
    for ref, got in zip(*results):
        assert (ref is None) == (got is None)
        if ref is not None:
            assert ref.dtype == got.dtype and torch.equal(ref, got)


def test_keeps_less_for_backward_than_autograd():
    """Trainable slot: autograd keeps the gate/up output, silu(gate) and the product; the lean FFN the first only."""
    N, H, I = 64, 16, 32
    h = torch.randn(N, H, requires_grad=True)
    gate_up, down = torch.randn(2 * I, H, requires_grad=True), torch.randn(H, I, requires_grad=True)

    def kept(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h, gate_up, down)
        params = {t.untyped_storage().data_ptr() for t in (h, gate_up, down)}
        return sum(n for ptr, n in storages.items() if ptr not in params) // (N * 4)  # fp32 numbers per token

    assert kept(_plain) == 2 * I + I + I and kept(_lean) == 2 * I
