"""BTM-style ensemble: reduces to its member, is a proper Bayesian mixture, goes through the BPB path."""

from __future__ import annotations

import pytest
import torch

from flexmoe import api
from flexmoe.config import EvalConfig
from flexmoe.errors import ConfigError
from flexmoe.eval.bpb import CausalLMScorer, load_causal_lm, read_documents, score_documents
from flexmoe.data import load_tokenizer
from flexmoe.eval.ensemble import Ensemble


@pytest.fixture(scope="module")
def members(eval_models):
    dense = CausalLMScorer(load_causal_lm(eval_models.dense))
    flex = CausalLMScorer(load_causal_lm(eval_models.flex["flex2"], bias=False))
    return dense, flex, load_tokenizer(eval_models.dense)


def _bpb(scorer, tok, docs):
    return score_documents(scorer, tok, docs, domain="d", seq_len=48, batch_size=4, progress=False)


def test_one_model_and_two_copies_equal_the_model(members, eval_data):
    dense, _, tok = members
    docs = read_documents(eval_data["code"])
    alone = _bpb(dense, tok, docs).bpb
    assert _bpb(Ensemble([dense]), tok, docs).bpb == pytest.approx(alone, rel=1e-6)
    assert _bpb(Ensemble([dense, dense], priors=[0.3, 0.7]), tok, docs).bpb == pytest.approx(alone, rel=1e-6)
    assert _bpb(Ensemble([dense, dense], top_k=1), tok, docs).bpb == pytest.approx(alone, rel=1e-6)


def test_window_likelihood_is_the_bayesian_mixture(members):
    # Prefix-posterior weighting makes the product of mixed next-token probabilities over a window equal
    # sum_m prior_m * p_m(window): the identity that defines a Bayesian model average.
    dense, flex, tok = members
    torch.manual_seed(0)
    x = torch.randint(2, 400, (2, 30))
    inputs, targets = x[:, :-1], x[:, 1:]
    mask = torch.ones_like(inputs)
    mask[1, 20:] = 0  # right padding in one row
    priors = [0.25, 0.75]
    with torch.inference_mode():
        mixed = Ensemble([dense, flex], priors=priors)(inputs, mask, targets)
        lps = torch.stack([s(inputs, mask, targets) for s in (dense, flex)])  # (M, B, T)
    valid = mask.bool()
    for b in range(2):
        per_model = torch.stack([lps[m, b][valid[b]].sum() + torch.log(torch.tensor(priors[m])) for m in range(2)])
        assert mixed[b][valid[b]].sum().item() == pytest.approx(per_model.logsumexp(0).item(), rel=1e-5)


def test_top1_ensemble_follows_one_member_per_token(members):
    dense, flex, _ = members
    x = torch.randint(2, 400, (1, 25))
    with torch.inference_mode():
        mixed = Ensemble([dense, flex], top_k=1)(x[:, :-1], None, x[:, 1:])[0]
        a, b = dense(x[:, :-1], None, x[:, 1:])[0], flex(x[:, :-1], None, x[:, 1:])[0]
    assert all(min(abs(m - u), abs(m - v)) < 1e-5 for m, u, v in zip(mixed.tolist(), a.tolist(), b.tolist()))


def test_ensemble_through_evaluate(eval_models, eval_data):
    data = {"code": str(eval_data["code"])}
    single = api.evaluate(EvalConfig(model=eval_models.dense, data=data, seq_len=48), progress=False)
    pair = api.evaluate(EvalConfig(model=eval_models.dense, data=data, seq_len=48, ensemble=[eval_models.dense]), progress=False)
    assert pair.routing is None and pair.model.startswith("ensemble(")
    assert pair.bpb("code") == pytest.approx(single.bpb("code"), rel=1e-6)


def test_bad_ensemble_settings(members):
    dense, _, _ = members
    with pytest.raises(ConfigError):
        Ensemble([])
    with pytest.raises(ConfigError, match="priors"):
        Ensemble([dense, dense], priors=[1.0])
    with pytest.raises(ConfigError, match="top-k"):
        Ensemble([dense], top_k=2)


class _Fixed:
    """A scorer that returns fixed per-token log-probs, whatever the input."""

    device = torch.device("cpu")

    def __init__(self, probs: list[float]):
        self.lp = torch.tensor([probs]).log()

    def __call__(self, input_ids, attention_mask, targets):
        return self.lp


def test_short_prefix_weights_members_by_the_last_tokens_only():
    a, b = _Fixed([0.5, 0.5, 0.5, 0.9, 0.9, 0.9]), _Fixed([0.9, 0.9, 0.9, 0.1, 0.1, 0.1])
    x = torch.zeros(1, 6, dtype=torch.long)
    whole = Ensemble([a, b])(x, None, x).exp()[0]
    one = Ensemble([a, b], prefix=1)(x, None, x).exp()[0]
    # At t=4 the last token (t=3) alone says a: weights 0.9 / 0.1 -> 0.9 * 0.9 + 0.1 * 0.1.
    assert one[4].item() == pytest.approx(0.82, abs=1e-4)
    # The whole-window posterior still remembers b's good start there.
    assert whole[4].item() < 0.6
    # A prefix as long as the window changes nothing.
    assert torch.allclose(Ensemble([a, b], prefix=6)(x, None, x).exp()[0], whole)
    with pytest.raises(ConfigError, match="prefix"):
        Ensemble([a], prefix=0)
