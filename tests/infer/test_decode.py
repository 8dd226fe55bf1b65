"""Fast greedy decoding against stock `generate` with stock eager experts (fp32, CPU, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

from flexmoe.infer import enable_fast_path, fast_generate
from flexmoe.infer.decode import _left_align, bucket_for

NEW = 32


def _model(num_experts=4, k=2, layers=2, seed=0) -> FlexOlmoForCausalLM:
    torch.manual_seed(seed)
    cfg = FlexOlmoConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=num_experts, num_experts_per_tok=k,
                         norm_topk_prob=False, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                         tie_word_embeddings=False)
    model = FlexOlmoForCausalLM(cfg).eval()
    model.set_experts_implementation("eager")
    return model


def _biased(model, seed=3):
    from flexmoe.checkpoint.load import apply_expert_bias

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    biases = -3 * torch.rand(cfg.num_hidden_layers, cfg.num_experts, generator=g)  # strong enough to move routing
    biases[:, 0] = 0.0  # the public expert
    apply_expert_bias(model, biases)
    return model


def _prompts(batch=3, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0  # left padding of different lengths
    if batch > 2:
        mask[2, :1] = 0
    return ids, mask


def _stock(model, ids, mask, new=NEW):
    """Greedy tokens and per-step logits from stock `generate` with stock eager experts."""
    model.set_experts_implementation("eager")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


def _fast(model, ids, mask, new=NEW, **kwargs):
    out = enable_fast_path(model, **kwargs).generate(ids, mask, max_new_tokens=new, output_logits=True)
    return out.sequences[:, ids.shape[1]:], out.logits


def _check(model, ids, mask, **kwargs):
    ref_tokens, ref_logits = _stock(model, ids, mask)
    tokens, logits = _fast(model, ids, mask, **kwargs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    return ref_tokens


def test_greedy_matches_stock_without_bias():
    model = _model()
    ids, mask = _prompts()
    _check(model, ids, mask)


def test_greedy_matches_stock_with_bias():
    model = _model()
    ids, mask = _prompts()
    unbiased, _ = _stock(model, ids, mask)
    biased = _check(_biased(model), ids, mask)
    assert not torch.equal(biased, unbiased)  # the bias changed the routing, so the comparison means something


def test_zero_bias_is_identical_to_stock():
    from flexmoe.checkpoint.load import apply_expert_bias

    model = _model()
    ids, mask = _prompts(batch=2)
    ref_tokens, ref_logits = _stock(model, ids, mask)
    apply_expert_bias(model, None)  # BiasedTopKRouter with b = 0
    tokens, logits = _fast(model, ids, mask)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_experts,k", [(8, 4), (3, 1)])
def test_other_expert_counts(num_experts, k):
    model = _model(num_experts=num_experts, k=k)
    ids, mask = _prompts(batch=1)
    _check(model, ids, mask)


def test_eager_attention_and_batch_bucketing():
    model = _model()
    model.set_attn_implementation("eager")
    ids, mask = _prompts(batch=3)  # padded to a bucket of 4 rows internally
    assert bucket_for(3) == 4
    _check(model, ids, mask)


def test_compiled_decode_layers_match():
    """compile='eager' runs dynamo over the decode layers (graph breaks, recompiles) without inductor's codegen."""
    model = _model(layers=3)
    ids, mask = _prompts(batch=2)
    ref_tokens, ref_logits = _stock(model, ids, mask, new=8)
    tokens, logits = _fast(model, ids, mask, new=8, compile="eager")
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


def test_stops_at_eos_like_generate():
    model = _model()
    ids, mask = _prompts(batch=2)
    ref_tokens, _ = _stock(model, ids, mask, new=8)
    eos = int(ref_tokens[0, 2])  # a token the model does produce early in row 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    out = fast_generate(model, ids, NEW, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_right_padding_is_left_aligned():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    new_ids, new_mask = _left_align(ids, mask)
    assert new_ids.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert new_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]


def test_sampling_falls_back_to_generate():
    model = _model()
    ids, _ = _prompts(batch=1)
    torch.manual_seed(0)
    out = fast_generate(model, ids, 4, do_sample=True, top_k=5)
    assert out.shape == (1, ids.shape[1] + 4)


def test_load_model_fast_matches_stock_on_a_merged_checkpoint(ckpt, tmp_path):
    """`flexmoe.load_model(dir, fast=True)` serves a real merged folder (bias applied) exactly like stock eager."""
    from flexmoe import api
    from flexmoe.config import MergeConfig

    merged = api.merge(MergeConfig(ckpt.anchor, list(ckpt.pkg.values())[:2], top_k=2), tmp_path / "m", progress=False).out
    reference = api.load_model(merged, experts_implementation="eager")
    fast = api.load_model(merged, fast=True)
    assert fast.config._experts_implementation != "eager"
    ids, mask = _prompts(batch=2, length=10)
    ids = ids % reference.config.vocab_size
    ref_tokens, ref_logits = _stock(reference, ids, mask)
    out = fast._flexmoe_decoder.generate(ids, mask, max_new_tokens=NEW, output_logits=True)
    assert torch.equal(out.sequences[:, ids.shape[1]:], ref_tokens)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-5)


def test_deterministic_mode_decodes_through_its_own_steps():
    """`torch.use_deterministic_algorithms` changes the attention kernels a decode step may use, so a runner (and
    its CUDA graph) made before the switch is not reused after it; the tokens stay those of stock generate."""
    from flexmoe.infer.decode import FastDecoder

    m = _model()
    ids, mask = _prompts()
    dec = FastDecoder(m)
    first = dec.generate(ids, mask, max_new_tokens=NEW)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        again = dec.generate(ids, mask, max_new_tokens=NEW)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(dec._runners) == 2
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.sequences[:, ids.shape[1]:], _stock(m, ids, mask)[0])


def test_deterministic_mode_keeps_cudnn_attention_out_of_prompt_and_steps():
    """Every attention call of a generation, the prompt's and the steps', sees SDPA's cuDNN backend off under
    `deterministic()` and on otherwise (the backend flags are process-wide, so this holds on CPU as on CUDA)."""
    from flexmoe.infer import deterministic
    from flexmoe.infer.decode import FastDecoder

    m = _model()
    ids, mask = _prompts()
    seen: list[tuple[int, bool]] = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs
                                              else args[0].shape[1], torch.backends.cuda.cudnn_sdp_enabled())),
        with_kwargs=True) for layer in m.model.layers]
    try:
        dec = FastDecoder(m)
        with deterministic():
            dec.generate(ids, mask, max_new_tokens=4)
        det, seen[:] = list(seen), []
        dec.generate(ids, mask, max_new_tokens=4)
    finally:
        for h in hooks:
            h.remove()
    assert {q for q, _ in det} == {1, ids.shape[1] + (-ids.shape[1]) % 32} == {q for q, _ in seen}  # prompt, steps
    assert not any(on for _, on in det) and all(on for _, on in seen)
