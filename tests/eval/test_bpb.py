"""Bits per byte: the documented formula, windowing, batching, capping and data errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flexmoe import api
from flexmoe.config import EvalConfig
from flexmoe.errors import DataError
from flexmoe.eval.bpb import CausalLMScorer, cap_documents, load_causal_lm, read_documents, score_documents
from flexmoe.data import load_tokenizer


@pytest.fixture(scope="module")
def dense(eval_models):
    return load_causal_lm(eval_models.dense), load_tokenizer(eval_models.dense)


def _non_eos_tokens(tokenizer, docs):
    return sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)


@pytest.mark.parametrize("seq_len,batch_size", [(7, 3), (1000, 1)])
def test_uniform_model_scores_log2_vocab_per_token(eval_models, eval_data, dense, seq_len, batch_size):
    # A zero LM head makes every next-token distribution uniform over V, so each token costs ln V nats exactly.
    model, tok = dense
    uniform = load_causal_lm(eval_models.dense)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    docs = read_documents(eval_data["code"])
    r = score_documents(CausalLMScorer(uniform), tok, docs, domain="code", seq_len=seq_len,
                        batch_size=batch_size, progress=False)
    vocab = uniform.config.vocab_size
    nbytes = sum(len(d.encode()) for d in docs)
    assert r.tokens == _non_eos_tokens(tok, docs)  # every token predicted once, whatever the windowing
    assert r.bytes == nbytes
    assert r.bpb == pytest.approx(math.log2(vocab) * r.tokens / nbytes, rel=1e-6)


def test_bpb_equals_hand_computed_nll(dense):
    model, tok = dense
    docs = ["def f(x):\n    return x + 1\n", "In the beginning God created the heaven and the earth."]
    ids = [tok.eos_token_id]
    for d in docs[:1]:
        ids += tok(d, add_special_tokens=False)["input_ids"]
    ids += [tok.eos_token_id] + tok(docs[1], add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]).logits.float(), -1)[0]  # (T, V)
    targets = x[0, 1:]
    nll = -sum(float(logp[t, y]) for t, y in enumerate(targets.tolist()) if y != tok.eos_token_id)
    expected = nll / (math.log(2) * sum(len(d.encode()) for d in docs))
    r = score_documents(CausalLMScorer(model), tok, docs, domain="x", seq_len=len(ids), batch_size=1, progress=False)
    assert r.bpb == pytest.approx(expected, rel=1e-5)


def test_batching_and_padding_do_not_change_bpb(dense, eval_data):
    model, tok = dense
    docs = read_documents(eval_data["speeches"])
    a = score_documents(CausalLMScorer(model), tok, docs, domain="s", seq_len=50, batch_size=1, progress=False)
    b = score_documents(CausalLMScorer(model), tok, docs, domain="s", seq_len=50, batch_size=4, progress=False)
    assert (a.tokens, a.bytes) == (b.tokens, b.bytes)
    assert a.bpb == pytest.approx(b.bpb, rel=1e-5)


def test_bf16_autocast_is_close_to_float32(dense, eval_data):
    model, tok = dense
    docs = read_documents(eval_data["public"])
    a = score_documents(CausalLMScorer(model), tok, docs, domain="p", seq_len=128, batch_size=4, progress=False)
    b = score_documents(CausalLMScorer(model, bf16=True), tok, docs, domain="p", seq_len=128, batch_size=4,
                        progress=False)
    assert b.bpb == pytest.approx(a.bpb, rel=0.02) and b.bpb != a.bpb


def test_cap_documents_is_deterministic_and_cuts_at_a_character():
    docs = ["ab", "", "cdé", "fgh"]  # é is two bytes
    assert cap_documents(docs, None) == ["ab", "cdé", "fgh"]
    assert cap_documents(docs, 4) == ["ab", "cd"]  # é would cross the cap: cut before it
    assert cap_documents(docs, 6) == ["ab", "cdé"]
    assert cap_documents(docs, 7) == ["ab", "cdé", "f"]
    assert cap_documents(docs, 1) == ["a"]


def test_max_bytes_caps_each_domain(eval_models, eval_data):
    r = api.evaluate(EvalConfig(model=eval_models.dense, data={k: str(v) for k, v in eval_data.items()}, max_bytes=300, seq_len=64), progress=False)
    assert [d.bytes for d in r.domains] == [300, 300, 300]


def test_read_documents_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.txt").write_text("three")
    assert read_documents(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_documents(tmp_path) == ["one", "two", "three"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing.jsonl")


def test_empty_domain_is_an_error(eval_models, tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="empty"):
        api.evaluate(EvalConfig(model=eval_models.dense, data={"e": str(tmp_path / "empty.jsonl")}), progress=False)


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu(eval_models, eval_data):
    data = {"code": str(eval_data["code"])}
    cpu = api.evaluate(EvalConfig(model=eval_models.flex["flex3"], data=data, seq_len=64), progress=False)
    gpu = api.evaluate(EvalConfig(model=eval_models.flex["flex3"], data=data, seq_len=64, device="cuda", bf16=True), progress=False)
    assert gpu.settings["device"].startswith("cuda")
    assert gpu.bpb("code") == pytest.approx(cpu.bpb("code"), rel=0.02)
