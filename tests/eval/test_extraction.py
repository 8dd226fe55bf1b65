"""The extraction audit: a model that memorised its documents is caught, a random one is not; reproducible samples,
Wilson intervals on known counts, every model kind (anchor, 2-expert, merged, opt-out), clean errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from flexmoe import api
from flexmoe.config import ExtractionConfig, MergeConfig, RemoveConfig
from flexmoe.errors import ConfigError, DataError
from flexmoe.eval.extraction import common_prefix, levenshtein, sample_prefixes, wilson_interval

PREFIX, GEN = 8, 16


def _write_docs(path: Path, n: int, words: int, seed: int) -> Path:
    """`n` documents of `words` random filler words: one token each under `save_tiny_tokenizer`."""
    rng = random.Random(seed)
    docs = [" ".join(f"w{rng.randrange(400)}" for _ in range(words)) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _memorise(out: Path, docs: Path, *, steps: int = 250) -> Path:
    """A tiny OLMo-2 trained with plain AdamW on random windows of `[EOS] d1 [EOS] d2 ...` (as packed training
    sees them) until it reproduces the documents from any offset."""
    from transformers import AutoTokenizer, Olmo2ForCausalLM

    from flexmoe.testing import save_tiny_tokenizer, tiny_olmo2_config

    save_tiny_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in texts]
    stream = torch.tensor([t for doc in ids for t in [tok.eos_token_id, *doc]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Olmo2ForCausalLM(tiny_olmo2_config(max_position_embeddings=64))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        window = PREFIX + GEN
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - window, (16,)).tolist()
            x = torch.stack([stream[s: s + window] for s in starts])  # (16, window)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out)
    return out


def _as_flex(dense_dir: Path, out: Path) -> Path:
    """The dense model as a 2-expert FlexOlmo whose experts are both its FFN: with top-2 of 2 and no
    renormalisation, p_0 FFN + p_1 FFN = FFN, so it computes the same function through the MoE code path."""
    from transformers import AutoTokenizer, FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2ForCausalLM

    dense = Olmo2ForCausalLM.from_pretrained(dense_dir)
    c = dense.config
    cfg = FlexOlmoConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False, rope_parameters=c.rope_parameters, num_experts=2,
                         num_experts_per_tok=2, norm_topk_prob=False)
    flex = FlexOlmoForCausalLM(cfg)
    src = dense.state_dict()
    state = {k: src[k] for k in flex.state_dict() if k in src}
    for i, layer in enumerate(dense.model.layers):
        gate_up = torch.cat((layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight))  # (2I, H)
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([gate_up, gate_up])  # (E, 2I, H)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([layer.mlp.down_proj.weight] * 2)  # (E, H, I)
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(2, c.hidden_size)  # any routing: both are used
    flex.load_state_dict(state)
    flex.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Owner documents, a model that memorised them, the same as a FlexOlmo, and flexmoe checkpoints of every kind
    built from a random anchor (which never saw the documents)."""
    from flexmoe.testing import build_random_anchor, build_random_package

    root = tmp_path_factory.mktemp("extraction")
    docs = _write_docs(root / "owner.jsonl", 12, 32, seed=0)
    memorised = _memorise(root / "memorised", docs)
    anchor = build_random_anchor(root / "anchor", seed=0, max_position_embeddings=64)
    pkgs = [build_random_package(root / n, anchor, n, s) for n, s in (("math", 1), ("code", 2))]
    merged = api.merge(MergeConfig(anchor, pkgs), root / "merged", progress=False).out
    return {"root": root, "docs": docs, "memorised": memorised, "flex": _as_flex(memorised, root / "flex"),
            "anchor": anchor, "two": api.merge(MergeConfig(anchor, pkgs[:1]), root / "two", progress=False).out, "merged": merged,
            "optout": api.remove(RemoveConfig(merged, "math"), root / "optout", progress=False).out}


def _audit(model, data, json_out=None, **kw):
    kw = {"prefix_len": PREFIX, "gen_len": GEN, **kw}
    return api.audit_extraction(ExtractionConfig(model=model, data=[data], **kw), json_out, progress=False)


@pytest.mark.parametrize("kind", ["memorised", "flex"])
def test_memorised_documents_are_extracted(world, kind):
    r = _audit(world[kind], world["docs"])
    assert r.n == 12 and r.documents == 12 and r.skipped_short == 0
    assert r.exact.rate >= 0.8 and r.half.rate >= r.exact.rate and r.paper.rate >= r.exact.rate
    assert r.lcp.rate >= r.exact.rate
    assert r.exact.low <= r.exact.rate <= r.exact.high
    assert r.fast is False and r.device == "cpu"  # the fast decoder is for CUDA only


@pytest.mark.parametrize("kind", ["anchor", "two", "merged", "optout"])
def test_random_models_of_every_kind_extract_nothing(world, kind):
    r = _audit(world[kind], world["docs"])
    assert r.n == 12 and r.exact.rate <= 0.05 and r.half.rate <= 0.05 and r.lcp.rate < 0.2
    assert r.exact.low == 0.0 and 0 < r.exact.high < 0.3  # 0 of 12: Wilson [0, 0.243]


def test_same_seed_same_samples_and_report_has_no_text(world, tmp_path):
    a = _audit(world["anchor"], world["docs"], seed=3, prefixes=5, json_out=tmp_path / "a.json")
    b = _audit(world["anchor"], world["docs"], seed=3, prefixes=5)
    c = _audit(world["anchor"], world["docs"], seed=4, prefixes=5)
    picks = lambda r: [(s.doc, s.offset) for s in r.samples]  # noqa: E731
    assert picks(a) == picks(b) != picks(c) and len(picks(a)) == 5 == len(set(s.doc for s in a.samples))
    out = json.loads((tmp_path / "a.json").read_text())
    assert out["seed"] == 3 and out["n"] == 5 and out["requested"] == 5 and out["prefix_len"] == PREFIX
    assert out["model"] == str(world["anchor"]) and out["exact_match"]["n"] == 5 and out["versions"]["torch"]
    dumped = json.dumps(out)
    texts = [json.loads(line)["text"] for line in world["docs"].read_text().splitlines()]
    assert not any(" ".join(t.split()[:2]) in dumped for t in texts)  # indices and offsets only, no text


def test_deterministic_audit_decodes_under_the_switch(world, tmp_path, deterministic_seen):
    det = _audit(world["memorised"], world["docs"], prefixes=4, deterministic=True, json_out=tmp_path / "d.json")
    n = len(deterministic_seen)
    plain = _audit(world["memorised"], world["docs"], prefixes=4)
    assert 0 < n < len(deterministic_seen) and all(deterministic_seen[:n]) and not any(deterministic_seen[n:])
    assert [s.lcp for s in det.samples] == [s.lcp for s in plain.samples]
    assert json.loads((tmp_path / "d.json").read_text())["settings"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()


def test_sampling_draws_one_offset_per_long_enough_document():
    lists = [[0] * 30, [0] * 10, [0] * 24, [0] * 50]
    picks = sample_prefixes(lists, count=10, need=24, seed=0)
    assert sorted(d for d, _ in picks) == [0, 2, 3]  # the 10-token document is too short; no document twice
    assert all(0 <= o <= len(lists[d]) - 24 for d, o in picks) and dict(picks)[2] == 0
    assert picks == sample_prefixes(lists, count=10, need=24, seed=0)


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634), (1, 10, 0.0179, 0.4042),
    (50, 1000, 0.0381, 0.0653),
])
def test_wilson_interval_on_known_counts(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_token_measures():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2 and common_prefix([], [1]) == 0
    assert levenshtein([1, 2, 3], [1, 2, 3]) == 0 and levenshtein([1, 3], [1, 2, 3]) == 1
    assert levenshtein([2, 3, 4], [1, 2, 3]) == 2 and levenshtein([], [1, 2]) == 2


def test_bad_inputs_raise_typed_errors_and_write_nothing(world, tmp_path):
    short = _write_docs(tmp_path / "short.jsonl", 3, PREFIX + GEN - 1, seed=1)
    out = tmp_path / "r.json"
    with pytest.raises(DataError, match="has the 24 tokens a sample needs .longest: 23.: lower --prefix-len"):
        _audit(world["anchor"], short, json_out=out)
    with pytest.raises(DataError, match="does not exist"):
        _audit(world["anchor"], tmp_path / "missing.jsonl", json_out=out)
    with pytest.raises(ConfigError, match="expert package.*flexmoe merge"):
        _audit(world["root"] / "math", world["docs"], json_out=out)
    long_docs = _write_docs(tmp_path / "long.jsonl", 2, 80, seed=2)
    with pytest.raises(ConfigError, match="= 68 exceeds the model's context of 64 positions"):
        _audit(world["anchor"], long_docs, gen_len=60, json_out=out)
    with pytest.raises(ConfigError, match="gen_len must be at least 1"):
        _audit(world["anchor"], world["docs"], gen_len=0, json_out=out)
    assert not out.exists()


def test_fast_decoder_continues_like_generate(world):
    # The CUDA branch's decoder, run here on CPU (no graphs): the same continuations as stock `generate`.
    from flexmoe.eval.bpb import load_causal_lm
    from flexmoe.eval.extraction import greedy_continuations

    prefixes = torch.tensor([[5 + i + j for j in range(PREFIX)] for i in range(3)])  # (3, P)
    outs = [greedy_continuations(load_causal_lm(world["flex"]), prefixes, GEN, batch_size=2, fast=fast, eos_id=0,
                                 pad_id=1, progress=False) for fast in (False, True)]
    assert outs[0] == outs[1] and all(len(g) <= GEN for g in outs[0])


@pytest.mark.gpu
def test_fast_path_on_cuda(world):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fast, stock = (_audit(world["flex"], world["docs"], device="cuda", fast=f) for f in (True, False))
    assert fast.fast and not stock.fast and fast.exact.rate >= 0.8 and stock.exact.rate >= 0.8
