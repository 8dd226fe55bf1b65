"""Proxy data for router tuning (FLEXOLMO.md §4): the public documents that look most like one domain.

A logistic-regression classifier over sentence embeddings learns domain (1) against public (0) from a seeded
sample of each; every public candidate is then scored, and the share `fraction` with the highest scores is kept.
Run it once per domain and give all outputs to `tune-router`: the proxy data stands in for the owners' data,
which router tuning never sees.

Each document is embedded as router rows are (`flexmoe.router.embed.document_embeddings`): the mean of its unit-normalised
chunk embeddings, up to `max_chunks_per_doc` chunks of the embedder's maximum length spread over the document, so
a long document is judged by more than its opening. The classifier starts from zeros and is fitted full-batch in float64 by L-BFGS for a fixed
number of iterations, with balanced class weights and a small L2 penalty, so the same inputs give the same choice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.config import ProxyConfig
from flexmoe.data import load_documents
from flexmoe.router.embed import document_embeddings, load_embedder
from flexmoe.errors import ConfigError, DataError
from flexmoe.io.atomic import atomic_write_text, check_output

L2 = 1e-3  # on the classifier weights (not the intercept): keeps a separable problem bounded
LBFGS_ITERS = 100


@dataclass
class ProxyResult:
    path: Path
    selected: int  # public documents written
    public_docs: int  # public documents scored
    domain_docs: int  # domain documents the classifier learned from
    train_accuracy: float  # of the classifier on its own (balanced) training sample
    min_score: float  # lowest domain probability among the selected documents
    wall_s: float

    def to_json(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (dim,), b ()) of a class-balanced, L2-penalised logistic regression of labels y (N,) in {0, 1} on x (N, dim),
    as a function of raw x: features are standardised inside (embedders put most of a vector's length in a
    direction all texts share, so raw differences between domains are small)."""
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)  # (dim,) each
    x = (x - mean) / std
    pos = y.sum()
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (len(y) - pos))  # (N,) each class weighs one half
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=LBFGS_ITERS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight, reduction="sum")
        loss = nll + L2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach() / std  # undo the standardisation: logits = x_raw @ w + b
    return w, b.detach() - mean @ w


def select_proxy(cfg: ProxyConfig, out: Path, *, overwrite: bool = False, progress: bool = True) -> ProxyResult:
    """Write the public documents most like the domain to `out` (.jsonl: `text` and the classifier's `score`),
    in their original order, atomically."""
    t0 = time.perf_counter()
    out = check_output(out, overwrite)
    device = str(cfg.device.torch())
    if not out.name.endswith(".jsonl"):
        raise ConfigError(f"--out {out}: name it *.jsonl so that `--data` reads it back")
    public, domain = load_documents(cfg.public), load_documents(cfg.domain)
    if not public.texts or not domain.texts:
        raise DataError("select-proxy needs public and domain documents; one of them is empty")
    g = torch.Generator().manual_seed(cfg.seed)
    candidates = torch.arange(len(public.texts))
    if cfg.max_public_docs is not None and cfg.max_public_docs < len(candidates):
        candidates = torch.randperm(len(candidates), generator=g)[:cfg.max_public_docs].sort().values
    dom_pick = torch.randperm(len(domain.texts), generator=g)[:cfg.num_domain_docs]
    neg_pick = torch.randperm(len(candidates), generator=g)[:len(dom_pick)]  # positions within `candidates`
    texts = [public.texts[i] for i in candidates.tolist()] + [domain.texts[i] for i in dom_pick.tolist()]
    emb, _ = document_embeddings(texts, load_embedder(cfg.embedder, device), batch_size=cfg.batch_size,
                                 max_chunks_per_doc=cfg.max_chunks_per_doc, progress=progress)
    pub_emb, dom_emb = emb[:len(candidates)], emb[len(candidates):]  # (P, dim), (D, dim)

    x = torch.cat((dom_emb, pub_emb[neg_pick]))
    y = torch.cat((torch.ones(len(dom_pick)), torch.zeros(len(neg_pick))))
    w, b = fit_logistic(x, y)
    accuracy = float(((x @ w + b > 0).double() == y.double()).double().mean())
    scores = torch.sigmoid(pub_emb @ w + b)  # (P,) probability of "domain"
    k = max(1, round(cfg.fraction * len(candidates)))
    top = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values  # ties: corpus order
    lines = [json.dumps({"text": public.texts[int(candidates[i])], "score": round(float(scores[i]), 6)})
             for i in top.tolist()]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return ProxyResult(path=out, selected=k, public_docs=len(candidates), domain_docs=len(dom_pick),
                       train_accuracy=accuracy, min_score=float(scores[top].min()), wall_s=time.perf_counter() - t0)
