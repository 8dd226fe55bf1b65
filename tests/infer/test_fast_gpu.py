"""The fast path on a CUDA GPU: CUDA graphs, the Triton and grouped-GEMM kernels, no host syncs, stock loading.

Run on the GPU machine: `python3 -m pytest -q -m gpu tests/infer/test_fast_gpu.py -p no:cacheprovider`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(dtype, num_experts=4, k=2, layers=2, seed=0):
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    torch.manual_seed(seed)
    cfg = FlexOlmoConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=num_experts, num_experts_per_tok=k,
                         norm_topk_prob=False, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return FlexOlmoForCausalLM(cfg).to("cuda", dtype).eval()


def _experts(num_experts, dtype=torch.bfloat16):
    m = _model(dtype, num_experts=num_experts, layers=1)
    return m.model.layers[0].mlp.experts


@pytest.mark.parametrize("tokens,num_experts,k", [(1, 4, 2), (32, 4, 2), (100, 8, 4), (1000, 4, 2)])
def test_kernels_agree_bf16(tokens, num_experts, k):
    from flexmoe.infer import experts as X
    from flexmoe.infer.triton_moe import fused_experts

    ex = _experts(num_experts)
    x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
    w, idx = torch.randn(tokens, num_experts, device="cuda").softmax(-1).topk(k, -1)
    w = w.to(torch.bfloat16)
    with torch.inference_mode():
        ex32 = _experts(num_experts, torch.float32)
        ex32.gate_up_proj.data.copy_(ex.gate_up_proj.float())
        ex32.down_proj.data.copy_(ex.down_proj.float())
        ref = X._dense(ex32, x.float(), idx, w.float())
        for out in (X._grouped(ex, x, idx, w), fused_experts(x, ex.gate_up_proj, ex.down_proj, idx, w)):
            assert ((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_experts_paths_do_not_sync():
    from flexmoe.infer import experts as X

    ex = _experts(4)
    x = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
    w, idx = torch.randn(8, 4, device="cuda").softmax(-1).topk(2, -1)
    w = w.to(torch.bfloat16)
    with torch.inference_mode():
        for fn in (X.flexmoe_experts_forward, X.flexmoe_grouped_experts_forward, X.flexmoe_triton_experts_forward):
            fn(ex, x, idx, w)  # warm-up: Triton autotuning synchronises
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn(ex, x, idx, w)
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_graphs_replay_exactly_what_eager_steps_compute():
    from flexmoe.infer import FastDecoder, enable_fast_path

    m = _model(torch.bfloat16)
    ids = torch.randint(2, 512, (3, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    g = enable_fast_path(m).generate(ids, mask, max_new_tokens=24, output_logits=True)
    e = FastDecoder(m, cuda_graphs=False).generate(ids, mask, max_new_tokens=24, output_logits=True)
    assert torch.equal(g.sequences, e.sequences)
    assert torch.equal(g.logits, e.logits)


@pytest.mark.parametrize("rows", [3, 1])  # batch 1: one valid row in every expert block, the batch-1 graphs
def test_fused_decode_layer_close_to_the_stock_layers(rows):
    """bf16: the fused decode step (the default for FlexOlmo on CUDA) against the same decoder through the stock
    layers; the prefill (stock layers in both) gives equal first logits, the fused steps close ones."""
    from flexmoe.checkpoint.load import apply_expert_bias
    from flexmoe.infer import FastDecoder, enable_fast_path

    m = _model(torch.bfloat16, layers=3)
    apply_expert_bias(m, -2 * torch.rand(3, 4))
    ids = torch.randint(2, 512, (rows, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[-1, :6] = 0
    dec = enable_fast_path(m)
    assert dec.fused
    out = dec.generate(ids, mask, max_new_tokens=16, output_logits=True)
    ref = FastDecoder(m, fused=False).generate(ids, mask, max_new_tokens=16, output_logits=True)
    assert torch.equal(out.logits[:, 0], ref.logits[:, 0])
    # bf16 rounding may flip a near-tie argmax, after which the two continuations differ: compare the logits of
    # every step up to a row's first differing token (same inputs up to there). A near-tie in a router flips one
    # token's expert (measured: one step of 16 at 0.72 at batch 1, seed 0; none in seeds 1-3): most steps, not all.
    new, new_ref = out.sequences[:, ids.shape[1]:], ref.sequences[:, ids.shape[1]:]
    rel = []
    for r in range(rows):
        differ = (new[r] != new_ref[r]).nonzero()
        last = int(differ[0]) if len(differ) else new.shape[1] - 1
        a, b = out.logits[r, 1:last + 1].float(), ref.logits[r, 1:last + 1].float()
        rel += ((a - b).norm(dim=-1) / b.norm(dim=-1)).tolist()
    assert len(rel) >= 5 and sorted(rel)[int(0.9 * len(rel)) - 1] < 3e-2, rel  # bf16, 3 layers
    if rows > 1:
        assert (out.sequences == ref.sequences).float().mean() > 0.9
    again = torch.randint(2, 512, (rows, 20), device="cuda")  # the same shapes: every graph replays with new inputs
    eager = FastDecoder(m, cuda_graphs=False).generate(again, max_new_tokens=16, output_logits=True)
    assert torch.equal(dec.generate(again, max_new_tokens=16, output_logits=True).logits, eager.logits)


@pytest.mark.parametrize("B,HQ,HKV,L,last", [(1, 16, 16, 192, 150), (32, 16, 16, 192, 150), (1, 32, 32, 2048, 2000),
                                             (4, 8, 2, 320, 64)])
def test_split_kv_attention_close_to_sdpa_and_repeatable(B, HQ, HKV, L, last):
    """bf16 split-KV decode attention within 1e-2 of fp32 SDPA over the written slots (left padding in one row),
    bit-identical when called again; the slots past `last` hold NaN and never reach the result."""
    import torch.nn.functional as F

    from flexmoe.infer.triton_attention import decode_attention

    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(B, HKV, L, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    keys[:, :, last + 1:] = float("nan")
    values[:, :, last + 1:] = float("nan")
    slots = torch.arange(L, device="cuda")
    pad = torch.zeros(B, dtype=torch.long, device="cuda")
    pad[-1] = min(last, 37)
    seen = (slots[None, :] >= pad[:, None]) & (slots[None, :] <= last)
    mask = torch.zeros(B, 1, 1, L, device="cuda", dtype=torch.bfloat16).masked_fill_(
        ~seen[:, None, None], torch.finfo(torch.bfloat16).min)
    length = torch.tensor(last, device="cuda")
    got = decode_attention(q, keys, values, mask, length, 128 ** -0.5)
    n = last + 1
    want = F.scaled_dot_product_attention(q.float(), keys[:, :, :n].float(), values[:, :, :n].float(),
                                          attn_mask=mask[..., :n].float(), scale=128 ** -0.5,
                                          enable_gqa=HQ != HKV).reshape(B, HQ * 128)
    assert ((got.float() - want).norm() / want.norm()) < 1e-2
    assert torch.equal(decode_attention(q, keys, values, mask, length, 128 ** -0.5), got)


def _batch32_model():
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    torch.manual_seed(0)
    cfg = FlexOlmoConfig(vocab_size=512, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                         pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)  # head dim 128, as at 1B
    return FlexOlmoForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def test_default_decoder_repeats_batch_32():
    """With the split-KV attention (the default) two decoders in one process give the same batch-32 logits, which
    SDPA's cuDNN kernel did not (benchmarks/NOTES.md §6)."""
    from flexmoe.infer import FastDecoder, decode_layer

    assert decode_layer.DECODE_ATTENTION == "split_kv"
    m = _batch32_model()
    ids = torch.randint(2, 512, (32, 128), device="cuda")
    a = FastDecoder(m).generate(ids, max_new_tokens=16, output_logits=True)
    b = FastDecoder(m).generate(ids, max_new_tokens=16, output_logits=True)
    assert torch.equal(a.logits, b.logits)


def test_deterministic_mode_leaves_cudnn_attention_out(monkeypatch):
    """Inside `deterministic()` (strict: an operation without a deterministic kernel would raise) the decode steps
    and the prompt run no cuDNN attention kernel (whose batch-32 steps were not repeatable on an H100), the expert
    kernels skip the autotuner, and two decoders repeat their logits exactly. Decode steps through SDPA here (the
    split-KV attention runs no SDPA at all)."""
    from torch.profiler import ProfilerActivity, profile

    from flexmoe.infer import FastDecoder, decode_layer, deterministic
    from flexmoe.infer import triton_moe as M

    monkeypatch.setattr(decode_layer, "DECODE_ATTENTION", "sdpa")

    m = _batch32_model()
    ids = torch.randint(2, 512, (32, 128), device="cuda")

    def cudnn_kernels(dec):  # cuDNN attention kernels of the prompt, and of 4 decode steps
        counts = []
        for n in (1, 5):
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                dec.generate(ids, max_new_tokens=n)
                torch.cuda.synchronize()
            counts.append(sum("cudnn" in e.name and "sdpa" in e.name for e in p.events()))
        return counts[0], counts[1] - counts[0]

    if cudnn_kernels(FastDecoder(m, cuda_graphs=False))[1] == 0:
        pytest.skip("this torch does not dispatch these decode steps to cuDNN attention")
    M._gate_up_kernel.cache.clear()
    M._down_kernel.cache.clear()
    with deterministic():
        assert cudnn_kernels(FastDecoder(m, cuda_graphs=False)) == (0, 0)
        dec = FastDecoder(m)
        assert dec.fused
        a = dec.generate(ids, max_new_tokens=16, output_logits=True)
        b = dec.generate(ids, max_new_tokens=16, output_logits=True)
        c = FastDecoder(m).generate(ids, max_new_tokens=16, output_logits=True)
    assert not M._gate_up_kernel.cache and not M._down_kernel.cache  # no autotuned tiles, which may differ by run
    assert torch.equal(a.logits, b.logits) and torch.equal(a.logits, c.logits)


def test_fp32_graphs_match_stock_eager_with_bias():
    from flexmoe.infer import enable_fast_path
    from flexmoe.checkpoint.load import apply_expert_bias

    m = _model(torch.float32)
    apply_expert_bias(m, -2 * torch.rand(2, 4))
    ids = torch.randint(2, 512, (2, 16), device="cuda")
    m.set_experts_implementation("eager")
    with torch.inference_mode():
        ref = m.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    out = enable_fast_path(m).generate(ids, max_new_tokens=32, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logits, torch.stack(ref.logits, 1).float(), rtol=0, atol=1e-4)


def test_compiled_graphs_close_to_uncompiled():
    from flexmoe.infer import FastDecoder, enable_fast_path

    m = _model(torch.bfloat16, layers=3)
    ids = torch.randint(2, 512, (2, 16), device="cuda")
    ref = enable_fast_path(m, fused=False).generate(ids, max_new_tokens=8, output_logits=True)
    out = FastDecoder(m, compile=True, fused=False).generate(ids, max_new_tokens=8, output_logits=True)
    first = (out.logits[:, 0] - ref.logits[:, 0]).norm() / ref.logits[:, 0].norm()
    assert first < 2e-2


def test_checkpoint_still_loads_in_stock_transformers(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from flexmoe.infer import fast_generate
    from flexmoe.io.keys import router_bias_key
    from flexmoe.checkpoint.load import BIAS_FILE, load_model

    m = _model(torch.float32).cpu()
    m.save_pretrained(tmp_path)
    save_file({router_bias_key(L): -torch.rand(4) for L in range(2)}, str(tmp_path / BIAS_FILE))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(stock).__name__ == "FlexOlmoForCausalLM"
    fm = load_model(tmp_path, device="cuda")
    ids = torch.randint(2, 512, (1, 12), device="cuda")
    out = fast_generate(fm, ids, 8, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 20)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_other_families_fast_path_matches_stock(family, tmp_path):
    """Qwen3-MoE and Mixtral keep their experts as FlexOlmo does: flexmoe's kernel and CUDA graphs serve them (fp32:
    the same tokens as stock eager `generate`; bf16: the Triton kernel, close to the fp32 logits)."""
    from flexmoe import api
    from flexmoe.checkpoint.load import load_model
    from flexmoe.config import MergeConfig
    from flexmoe.infer import enable_fast_path
    from flexmoe.testing import build_random_anchor, build_random_package

    anchor = build_random_anchor(tmp_path / "anchor", family=family)
    pkgs = [build_random_package(tmp_path / n, anchor, n, s, ffn_std=0.1) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    api.merge(MergeConfig(anchor, pkgs, top_k=2 if family == "qwen3" else None), tmp_path / "m", progress=False)
    ids = torch.randint(2, 512, (2, 16), device="cuda")
    ref_model = load_model(tmp_path / "m", device="cuda")
    ref_model.set_experts_implementation("eager")
    ref_model.generation_config.eos_token_id = None  # the fast decoder is not told an EOS either: 24 tokens each
    with torch.inference_mode():
        ref = ref_model.generate(ids, max_new_tokens=24, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
    out = enable_fast_path(load_model(tmp_path / "m", device="cuda")).generate(ids, max_new_tokens=24,
                                                                                output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logits, torch.stack(ref.logits, 1).float(), rtol=0, atol=1e-4)
    bf16 = enable_fast_path(load_model(tmp_path / "m", dtype=torch.bfloat16, device="cuda"))
    low = bf16.generate(ids, max_new_tokens=1, output_logits=True).logits[:, 0]
    want = torch.stack(ref.logits, 1)[:, 0].float()
    assert (low - want).norm() / want.norm() < 3e-2
