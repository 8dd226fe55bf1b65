"""BTM-style ensemble (FLEXOLMO.md §6): mix separately trained LMs by the domain posterior of the prefix.

For models m = 1..M sharing one tokenizer, at each position t of a window:
    w_m(t) ∝ prior_m * p_m(x_1 .. x_t)          (likelihood of the window's prefix under model m)
    p(y_t | x_<=t) = sum_m w_m(t) * p_m(y_t | x_<=t)
optionally keeping only the `top_k` largest weights (renormalised). With `prefix = W` the likelihood counts only
the last W tokens before t (a sliding window): a 1024-token prefix of one-domain text makes the ensemble an oracle
domain selector, a short one says how well it follows text whose domain changes. The prefix likelihood is the running sum of
each model's own target log-probs, so it comes from the same forward passes: M forwards per batch, no more.
Only the probability of the observed next token is needed for BPB, and the mixture's probability of a token is
the weighted sum of the models' probabilities of that token, so no (B, T, V) distribution is materialised.
`Ensemble` has the scorer interface of `flexmoe.eval.bpb`, so its BPB goes through the same code path.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.eval.bpb import CausalLMScorer, Scorer, load_causal_lm
from flexmoe.data import load_tokenizer


class Ensemble:
    """A mixture of scorers weighted by the posterior of the prefix.

    Args:
        scorers: the member models (see `flexmoe.eval.bpb.Scorer`), all over the same tokenizer.
        priors: prior weight of each member (normalised here); default uniform.
        top_k: mix only the k members with the largest posterior at each position; default all.
        prefix: the posterior at t counts only the last `prefix` tokens before t; default the whole window.
    """

    def __init__(self, scorers: list[Scorer], *, priors: list[float] | None = None, top_k: int | None = None,
                 prefix: int | None = None):
        if not scorers:
            raise ConfigError("an ensemble needs at least one model")
        priors = [1.0] * len(scorers) if priors is None else list(priors)
        if len(priors) != len(scorers) or any(p <= 0 for p in priors):
            raise ConfigError(f"ensemble priors must be {len(scorers)} positive numbers, got {priors}")
        if top_k is not None and not 1 <= top_k <= len(scorers):
            raise ConfigError(f"ensemble top-k {top_k} is out of range 1..{len(scorers)}")
        self.scorers = scorers
        self.device = scorers[0].device
        total = sum(priors)
        self.log_prior = torch.tensor([math.log(p / total) for p in priors], dtype=torch.float32)  # (M,)
        if prefix is not None and prefix < 1:
            raise ConfigError(f"ensemble prefix must be at least 1 token, got {prefix}")
        self.top_k, self.prefix = top_k, prefix

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
        lps = torch.stack([
            s(input_ids.to(s.device), None if attention_mask is None else attention_mask.to(s.device),
              targets.to(s.device)).float().to(self.device)
            for s in self.scorers])  # (M, B, T)
        if attention_mask is not None:
            lps = lps.masked_fill(~attention_mask.to(self.device).bool(), 0.0)  # padding adds nothing to a prefix
        running = lps.cumsum(-1)  # (M, B, T): log p_m of the targets up to and including t
        prefix = running - lps  # (M, B, T): the same before t (exclusive running sum)
        if self.prefix is not None and self.prefix + 1 < prefix.shape[-1]:
            W = self.prefix + 1  # keep targets t-prefix .. t-1: subtract the running sum up to t-prefix-1
            prefix = prefix - torch.nn.functional.pad(running[..., :-W], (W, 0))
        log_w = self.log_prior.to(self.device)[:, None, None] + prefix  # (M, B, T)
        if self.top_k is not None and self.top_k < len(self.scorers):
            keep = torch.zeros_like(log_w, dtype=torch.bool).scatter_(0, log_w.topk(self.top_k, dim=0).indices, True)
            log_w = log_w.masked_fill(~keep, float("-inf"))  # exactly k members, even when weights tie
        log_w = log_w - log_w.logsumexp(0, keepdim=True)
        return (log_w + lps).logsumexp(0)  # (B, T)


def load_ensemble(paths: list[str | Path], *, bias: bool = True, device: str | torch.device = "cpu",
                  bf16: bool = False, priors: list[float] | None = None, top_k: int | None = None,
                  prefix: int | None = None, experts_implementation: str | None = None):
    """Load model directories as an `Ensemble`; returns (ensemble, tokenizer). Their tokenizers must agree."""
    tokenizer, vocab = None, None
    scorers = []
    for p in paths:
        tok = load_tokenizer(p)
        if tokenizer is None:
            tokenizer, vocab = tok, tok.get_vocab()
        elif tok.get_vocab() != vocab:
            raise CheckpointError(f"{p}: its tokenizer differs from {paths[0]}'s; ensemble members must share one")
        model = load_causal_lm(p, bias=bias, device=device, experts_implementation=experts_implementation)
        scorers.append(CausalLMScorer(model, bf16=bf16))
    return Ensemble(scorers, priors=priors, top_k=top_k, prefix=prefix), tokenizer
