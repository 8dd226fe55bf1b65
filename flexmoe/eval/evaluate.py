"""`evaluate`: bits per byte per domain (+ routing statistics for MoE models): read each domain's text, build the
scorer, score with routing hooks, write the JSON and plots."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from flexmoe.config import EvalConfig, jsonable
from flexmoe.data import load_tokenizer
from flexmoe.errors import CheckpointError, ConfigError, DataError
from flexmoe.io import hf_config
from flexmoe.eval import bpb as B
from flexmoe.eval import routing as R
from flexmoe.eval.ensemble import load_ensemble
from flexmoe.router.biased import refuse_bad_top_k, routers, set_top_k


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
            tokenizer = load_tokenizer(cfg.model)
        scorer = B.CausalLMScorer(model, bf16=cfg.bf16) if isinstance(model, torch.nn.Module) else model
    elif cfg.model is None:
        raise ConfigError("no model: give a model directory")
    elif cfg.ensemble:
        paths = [cfg.model, *cfg.ensemble]
        scorer, tokenizer = load_ensemble(paths, bias=cfg.bias, device=device, bf16=cfg.bf16,
                                          priors=cfg.ensemble_priors, top_k=cfg.ensemble_top_k,
                                          prefix=cfg.ensemble_prefix,
                                          experts_implementation=_kernel(cfg))
        name = "ensemble(" + ", ".join(str(p) for p in paths) + ")"
    else:
        # Clear errors before anything is loaded: a missing directory, --top-k on a dense model or out of range.
        refuse_bad_top_k(hf_config.read_config(cfg.model), cfg.top_k, cfg.model)
        tokenizer = tokenizer or load_tokenizer(cfg.model)
        lm = B.load_causal_lm(cfg.model, bias=cfg.bias, device=device,
                              experts_implementation=_kernel(cfg))
        scorer = B.CausalLMScorer(lm, bf16=cfg.bf16)
    for m in _members(scorer):
        vocab = getattr(getattr(m, "config", None), "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise CheckpointError(f"{name}: tokenizer has {len(tokenizer)} tokens, the model only {vocab}")
    return scorer, tokenizer, name


def _kernel(cfg) -> str | None:
    return None if cfg.experts_implementation is None else cfg.experts_implementation.value


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


@contextlib.contextmanager
def top_k_override(cfg, scorer):
    """`cfg.top_k` set on every router of the MoE members for the duration (undone afterwards); yields those
    members."""
    moe = [m for m in _members(scorer) if routers(m)]
    saved_k = [(r, r.top_k) for m in moe for _, r in routers(m)]
    try:
        if cfg.top_k is not None:
            if not moe:
                raise ConfigError("--top-k needs a mixture-of-experts model; this one is dense")
            for m in moe:
                set_top_k(m, cfg.top_k)
        yield moe
    finally:
        for r, k in saved_k:
            r.top_k = k


def score_domains(cfg, scorer, tokenizer, docs: dict[str, list[str]], seq_len: int, *, progress: bool = True):
    """([DomainBPB per domain], RoutingStats | None) with `cfg.top_k` applied for the duration."""
    with top_k_override(cfg, scorer) as moe:
        recorder = None
        if cfg.routing and isinstance(scorer, B.CausalLMScorer) and moe:  # not for ensembles: several routers
            num = routers(scorer.model)[0][1].num_experts
            recorder = R.RoutingRecorder(scorer.model, R.expert_names(cfg.model, num))
        results = []
        with recorder if recorder is not None else contextlib.nullcontext():
            for dom, texts in docs.items():
                if recorder is not None:
                    recorder.domain = dom
                results.append(B.score_documents(
                    scorer, tokenizer, texts, domain=dom, seq_len=seq_len, batch_size=cfg.batch_size,
                    before_forward=recorder.set_mask if recorder is not None else None, progress=progress))
        return results, recorder.stats() if recorder is not None else None


def score_tasks(cfg, scorer, tokenizer, *, progress: bool = True) -> list:
    """[TaskScore per task of `cfg.tasks`] (flexmoe/eval/tasks.py) of the one model inside `scorer`, with
    `cfg.top_k` applied for the duration."""
    from flexmoe.eval.tasks import run_tasks

    members = _members(scorer)
    if not isinstance(scorer, B.CausalLMScorer) or len(members) != 1:
        raise ConfigError("--tasks needs one transformers causal LM, not an ensemble or a custom scorer")
    with top_k_override(cfg, scorer):
        return run_tasks(members[0], tokenizer, list(cfg.tasks), limit=cfg.limit, batch_size=cfg.batch_size,
                         max_length=cfg.seq_len, bf16=cfg.bf16, progress=progress)


@dataclasses.dataclass
class EvalResult:
    """Per-domain BPB (flexmoe/eval/bpb.py), routing statistics for MoE models, per-task accuracy
    (flexmoe/eval/tasks.py), and provenance."""

    model: str
    domains: list  # list[flexmoe.eval.bpb.DomainBPB]
    routing: object | None  # flexmoe.eval.routing.RoutingStats
    settings: dict
    versions: dict
    wall_s: float
    json_path: str | None = None
    plots: list[str] = dataclasses.field(default_factory=list)
    tasks: list = dataclasses.field(default_factory=list)  # list[flexmoe.eval.tasks.TaskScore]

    @property
    def mean_bpb(self) -> float | None:
        """Mean over the domains; None when only --tasks ran."""
        return sum(d.bpb for d in self.domains) / len(self.domains) if self.domains else None

    def accuracy(self, task: str, metric: str = "acc") -> float:
        return next(t.metrics[metric] for t in self.tasks if t.task == task)

    def bpb(self, domain: str) -> float:
        return next(d.bpb for d in self.domains if d.domain == domain)

    def to_json(self) -> dict:
        return {"format": "flexmoe-eval/1", "model": self.model, "mean_bpb": self.mean_bpb,
                "domains": [d.to_json() for d in self.domains],
                "routing": None if self.routing is None else self.routing.to_json(),
                "tasks": [t.to_json() for t in self.tasks],
                "settings": self.settings, "versions": self.versions, "wall_s": self.wall_s, "plots": self.plots}


def versions() -> dict:
    import torch
    import transformers

    from flexmoe import __version__

    return {"flexmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def evaluate(cfg: EvalConfig, out: Path | None, *, plots: Path | None, overwrite: bool, progress: bool, model=None,
             tokenizer=None) -> EvalResult:
    from flexmoe.io.atomic import atomic_dir, atomic_write_text, check_output

    for path in (out, plots):
        if path is not None:
            check_output(path, overwrite)
    t0 = time.perf_counter()
    # Before any model is loaded, so bad data or a missing extra fails fast.
    docs = read_domains(cfg.data, cfg.max_bytes)
    if cfg.tasks:
        from flexmoe.eval.tasks import check_tasks

        check_tasks(list(cfg.tasks))
    if plots is not None and not docs:
        raise ConfigError("--plots draws the --data domains: give --data too")
    device = cfg.device.torch()
    scorer, tokenizer, name = build_scorer(cfg, device, model=model, tokenizer=tokenizer)
    seq_len = window_length(cfg, scorer)
    results, routing = score_domains(cfg, scorer, tokenizer, docs, seq_len, progress=progress) if docs else ([], None)
    scores = score_tasks(cfg, scorer, tokenizer, progress=progress) if cfg.tasks else []
    settings = {**jsonable(cfg), "json_out": None if out is None else str(out),
                "plots": None if plots is None else str(plots), "overwrite": overwrite, "progress": progress}
    settings.update(device=str(device), seq_len=seq_len, top_k_used=routing.top_k if routing is not None else None)
    vers = versions()
    if cfg.tasks:
        from flexmoe.eval.tasks import versions as task_versions

        vers.update(task_versions())
    result = EvalResult(model=name, domains=results, routing=routing, settings=settings, versions=vers,
                        wall_s=0.0, tasks=scores)
    if plots is not None:
        from flexmoe.eval.plots import write_plots

        with atomic_dir(plots, overwrite=overwrite) as tmp:
            files = write_plots(tmp, results, routing, title=name)
        result.plots = [str(Path(plots) / f.name) for f in files]
    result.wall_s = time.perf_counter() - t0
    if out is not None:
        atomic_write_text(out, json.dumps(result.to_json(), indent=2) + "\n")
        result.json_path = str(out)
    return result
