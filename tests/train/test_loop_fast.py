"""The training loop's speed/memory path computes what the plain path computes: the chunked LM loss, bf16-held frozen
weights, and (slow) torch.compile of the decoder layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexmoe.config import Device, TrainConfig
from flexmoe.data import PackedData
from flexmoe.io.anchor import read_anchor
from flexmoe.expert.upcycle import expert_blocks, upcycle
from flexmoe.router.rows import random_row
from flexmoe.infer.norms import FusedRMSNorm
from flexmoe.train import losses, speed
from flexmoe.train.losses import CausalLMLoss, lm_loss, lm_losses, router_z_loss
from flexmoe.train.loop import train
from flexmoe.train.speed import frozen_matmul_weights


@pytest.fixture(scope="module")
def anchor(train_inputs):
    return read_anchor(train_inputs.anchor)


def _data(vocab: int, seq: int = 32, seed: int = 0) -> PackedData:
    g = torch.Generator().manual_seed(seed)
    return PackedData(torch.randint(0, vocab, (4000,), generator=g, dtype=torch.int32), seq)


@pytest.mark.parametrize("need_weight", [False, True])
def test_chunked_lm_loss_matches_autograd_of_lm_losses(monkeypatch, need_weight):
    monkeypatch.setattr(losses, "LOSS_CHUNK_LOGITS", 7 * 50)  # chunks of 7 tokens (V = 50), the last one shorter
    g = torch.Generator().manual_seed(1)
    N, H, V, z_coef = 50, 8, 50, 0.3  # a large z coefficient so its gradient term is tested too
    hidden0, weight0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    grads = []
    for chunked in (False, True):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_(need_weight)
        if chunked:
            total, ce, z = lm_loss(hidden, weight, targets, z_coef)
            assert not ce.requires_grad and not z.requires_grad
        else:
            ce, z = lm_losses(F.linear(hidden, weight)[None], targets[None])
            total = ce + z_coef * z
        (0.5 * total).backward()  # a scaled loss, as with gradient accumulation
        grads.append((total.detach(), ce.detach(), hidden.grad, weight.grad))
    for ref, got in zip(*grads):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_chunked_lm_loss_under_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(40, 16, generator=g, requires_grad=True), torch.randn(64, 16, generator=g)
    targets = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_ref, _ = lm_losses(F.linear(hidden, weight)[None], targets[None])
        ref = torch.autograd.grad(ce_ref, hidden)[0]
        loss, ce, _ = lm_loss(hidden, weight, targets, 0.0)
        got = torch.autograd.grad(loss, hidden)[0]
    torch.testing.assert_close(ce, ce_ref, rtol=0, atol=1e-6)  # the same bf16 logits, the same fp32 softmax
    torch.testing.assert_close(got, ref, rtol=0.02, atol=1e-4)


def test_training_loss_module_matches_the_stock_forward(anchor):
    """CausalLMLoss (hidden states -> chunked loss) = logits from the stock forward -> lm_losses + z-losses."""
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for fast in (False, True):
        model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
        module = CausalLMLoss(model, lm_z=1e-2, router_z=1e-1)
        module.chunked = fast
        assert CausalLMLoss(model, 0.0, 0.0).chunked  # an upcycled FlexOlmo takes the chunked path by default
        loss, ce = module(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), ce, [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_a, ce_a, grads_a), (loss_b, ce_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce_b, ce_a, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_frozen_matmul_weights_are_exactly_the_linear_and_public_ffn_weights(anchor):
    model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
    names = {n for n, p in model.named_parameters() if any(p is q for q in frozen_matmul_weights(model))}
    layers = range(model.config.num_hidden_layers)
    expected = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in layers for p in "qkvo"}
    expected |= {f"model.layers.{i}.mlp.public_{t}" for i in layers for t in ("gate_up", "down")}
    assert names == expected | {"lm_head.weight"}  # not embeddings, norms, r_pub or anything trainable


def test_bf16_holds_frozen_matmul_weights_in_bf16_with_the_same_numbers(anchor, monkeypatch):
    """Autocast casts those weights at every use anyway: holding them in bf16 must not change one bit of training."""
    data = _data(500)
    cfg = TrainConfig(max_steps=3, batch_size=2, seq_len=32, bf16=True, warmup_steps=1, device=Device.CPU)
    trained = []
    for hold in (False, True):
        if not hold:
            monkeypatch.setattr(speed, "hold_frozen_in", lambda model, dtype: [])
        else:
            monkeypatch.undo()
        model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
        seen = []
        result, model = train(model, data, cfg, progress=False,
                              on_step=lambda s: seen.append(model.lm_head.weight.dtype))
        assert seen == [torch.bfloat16 if hold else torch.float32] * 3
        assert all(p.dtype == torch.float32 for p in model.parameters())  # given back as it came
        trained.append([b.owner_gate_up.detach().clone() for b in expert_blocks(model)] + [result.final_loss])
    for a, b in zip(*trained):
        assert a == b if isinstance(a, float) else torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_forward_is_olmo2s(dtype):
    """The norm training runs eagerly (`speed.fuse_rms_norms`) computes OLMo-2's, fp32 weight under bf16 too."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    norm = Olmo2RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x0 = torch.randn(3, 7, 64).to(dtype)
    out, grads = [], []
    for forward in (norm.forward, FusedRMSNorm.replacing(norm).forward):
        x = x0.clone().requires_grad_()
        y = forward(x)
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        out.append(y)
        grads.append((x.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    assert out[0].dtype == out[1].dtype == dtype and torch.equal(out[0], out[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_training_puts_the_norms_back(anchor):
    model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
    norms = {n: m for n, m in model.named_modules() if "norm" in n.rsplit(".", 1)[-1]}
    weights = {n: m.weight for n, m in norms.items()}
    fused = []
    cfg = TrainConfig(max_steps=1, batch_size=2, seq_len=32, device=Device.CPU)
    train(model, _data(500), cfg, progress=False,
          on_step=lambda s: fused.append({n for n, m in model.named_modules() if isinstance(m, FusedRMSNorm)}))
    assert fused == [set(norms)] and len(norms) == 1 + 4 * model.config.num_hidden_layers  # q/k + 2 per layer
    after = dict(model.named_modules())
    assert all(after[n] is m and m.weight is weights[n] for n, m in norms.items())  # the same modules and weights


@pytest.mark.slow
def test_compiled_layers_train_like_eager_and_are_undone(anchor):
    import torch._functorch.config as functorch_config

    data = _data(500)
    before = functorch_config.ban_recompute_materialized_backward
    runs = []
    for compile_ in (False, True):
        model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=1)
        cfg = TrainConfig(max_steps=3, batch_size=2, seq_len=32, warmup_steps=1, log_every=1, compile=compile_,
                          device=Device.CPU)
        result, model = train(model, data, cfg, progress=False)
        runs.append((result.losses, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
        assert all(layer._compiled_call_impl is None for layer in model.model.layers)
        assert router_z_loss(model) is not None
    assert functorch_config.ban_recompute_materialized_backward == before
    (losses_a, params_a), (losses_b, params_b) = runs
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] == [1, 2, 3]
    for (_, a), (_, b) in zip(losses_a, losses_b):
        assert a == pytest.approx(b, abs=1e-4)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
