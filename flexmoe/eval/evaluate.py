"""The steps of `flexmoe.api.evaluate`: read each domain's text, build the scorer, score with routing hooks."""

from __future__ import annotations

import contextlib

import torch

from flexmoe.errors import CheckpointError, ConfigError, DataError
from flexmoe.eval import bpb as B
from flexmoe.eval import routing as R
from flexmoe.eval.ensemble import load_ensemble


def read_domains(data: dict[str, str], max_bytes: int | None) -> dict[str, list[str]]:
    """Capped documents per domain; `DataError` for a domain with no text."""
    docs = {}
    for dom, path in data.items():
        docs[dom] = B.cap_documents(B.read_documents(path), max_bytes)
        if not docs[dom]:
            raise DataError(f"domain {dom!r}: {path} holds no text")
    return docs


def build_scorer(cfg, device: torch.device, *, model=None, tokenizer=None):
    """(scorer, tokenizer, display name) for an EvalConfig: a model dir, an ensemble of dirs, or `model`."""
    name = str(cfg.model) if cfg.model is not None else "in-memory model"
    if model is not None:
        if tokenizer is None:
            if cfg.model is None:
                raise ConfigError("an in-memory model needs a tokenizer (or cfg.model to load one from)")
            tokenizer = B.load_tokenizer(cfg.model)
        scorer = B.CausalLMScorer(model, bf16=cfg.bf16) if isinstance(model, torch.nn.Module) else model
    elif cfg.model is None:
        raise ConfigError("no model: give a model directory")
    elif cfg.ensemble:
        paths = [cfg.model, *cfg.ensemble]
        scorer, tokenizer = load_ensemble(paths, bias=cfg.bias, device=device, bf16=cfg.bf16,
                                          priors=cfg.ensemble_priors, top_k=cfg.ensemble_top_k,
                                          prefix=cfg.ensemble_prefix,
                                          experts_implementation=cfg.experts_implementation)
        name = "ensemble(" + ", ".join(str(p) for p in paths) + ")"
    else:
        # Clear errors before anything is loaded: a missing directory, --top-k on a dense model.
        if B.model_type(cfg.model) != "flex_olmo" and cfg.top_k is not None:
            raise ConfigError("--top-k needs a mixture-of-experts (flex_olmo) model; this one is dense")
        tokenizer = tokenizer or B.load_tokenizer(cfg.model)
        lm = B.load_causal_lm(cfg.model, bias=cfg.bias, device=device,
                              experts_implementation=cfg.experts_implementation)
        scorer = B.CausalLMScorer(lm, bf16=cfg.bf16)
    for m in _members(scorer):
        vocab = getattr(getattr(m, "config", None), "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise CheckpointError(f"{name}: tokenizer has {len(tokenizer)} tokens, the model only {vocab}")
    return scorer, tokenizer, name


def _members(scorer) -> list[torch.nn.Module]:
    """The plain LMs inside a scorer: one for a model, several for an ensemble, none for a custom scorer."""
    return [s.model for s in getattr(scorer, "scorers", [scorer]) if isinstance(s, B.CausalLMScorer)]


def window_length(cfg, scorer) -> int:
    """`cfg.seq_len`, or by default the shortest context of the member models capped at 2048 (the training
    default), or 1024 when no member says."""
    limits = [int(m.config.max_position_embeddings) for m in _members(scorer)
              if getattr(getattr(m, "config", None), "max_position_embeddings", None)]
    if cfg.seq_len is None:
        return min(min(limits), 2048) if limits else 1024
    if limits and cfg.seq_len > min(limits):
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's context of {min(limits)} positions; "
                          f"use --seq-len {min(limits)} or less")
    return cfg.seq_len


def score_domains(cfg, scorer, tokenizer, docs: dict[str, list[str]], seq_len: int):
    """([DomainBPB per domain], RoutingStats | None) with `cfg.top_k` applied for the duration."""
    moe = [m for m in _members(scorer) if R.routers(m)]
    saved_k = [(r, r.top_k) for m in moe for _, r in R.routers(m)]
    try:
        if cfg.top_k is not None:
            if not moe:
                raise ConfigError("--top-k needs a mixture-of-experts (flex_olmo) model; this one is dense")
            for m in moe:
                R.set_top_k(m, cfg.top_k)
        recorder = None
        if cfg.routing and isinstance(scorer, B.CausalLMScorer) and moe:  # not for ensembles: several routers
            num = R.routers(scorer.model)[0][1].num_experts
            recorder = R.RoutingRecorder(scorer.model, R.expert_names(cfg.model, num))
        results = []
        with recorder if recorder is not None else contextlib.nullcontext():
            for dom, texts in docs.items():
                if recorder is not None:
                    recorder.domain = dom
                results.append(B.score_documents(
                    scorer, tokenizer, texts, domain=dom, seq_len=seq_len, batch_size=cfg.batch_size,
                    before_forward=recorder.set_mask if recorder is not None else None, progress=cfg.progress))
        return results, recorder.stats() if recorder is not None else None
    finally:
        for r, k in saved_k:
            r.top_k = k
