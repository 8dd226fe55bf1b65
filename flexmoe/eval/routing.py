"""Routing statistics of a merged model: which experts each token's top-k picks, per domain and layer.

Forward hooks on every stock top-k router of an anchor family's MoE class (`FlexOlmoTopKRouter`,
`Qwen3MoeTopKRouter`, `MixtralTopKRouter`, or flexmoe's biased subclasses of them) read the router's
output `(router_logits (N, E), router_scores (N, k), router_indices (N, k))`, N = B*T flattened tokens, and
count only the tokens that are not padding. Per layer and expert:
- `fraction[L][e]`: share of tokens whose top-k includes e (so each row sums to k);
- `mean_prob[L][e]`: mean softmax probability of e over all experts (each row sums to 1). With the bias
  subclass this is the softmax of the logits it returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexmoe.errors import ConfigError
from flexmoe.router.biased import routers


@dataclass
class DomainRouting:
    tokens: int
    fraction: list[list[float]]  # (layers, experts)
    mean_prob: list[list[float]]  # (layers, experts)


@dataclass
class RoutingStats:
    experts: list[str]
    top_k: int
    domains: dict[str, DomainRouting] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def expert_names(model_dir: str | Path | None, num_experts: int) -> list[str]:
    """Names in router order from `flexmoe.json` when it is there and agrees; else expert0, expert1, ..."""
    if model_dir is not None:
        meta = Path(model_dir) / "flexmoe.json"
        if meta.is_file():
            try:
                names = [str(e["name"]) for e in json.loads(meta.read_text())["experts"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                names = []
            if len(names) == num_experts:
                return names
    return [f"expert{i}" for i in range(num_experts)]


class RoutingRecorder:
    """Accumulates routing counts while attached; use as a context manager around scoring.

    Call `set_mask(valid (B, T))` before each forward and set `.domain` before each domain.
    """

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self._routers = routers(model)
        if not self._routers:
            raise ConfigError("routing statistics need a mixture-of-experts model")
        self.num_experts = self._routers[0][1].num_experts
        self.names = names
        self.domain = ""
        self._mask: torch.Tensor | None = None
        self._hits: dict[str, torch.Tensor] = {}  # domain -> (layers, experts) float64
        self._probs: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._handles = []

    def set_mask(self, valid: torch.Tensor) -> None:
        self._mask = valid.reshape(-1)  # (B*T,)
        self._tokens[self.domain] = self._tokens.get(self.domain, 0) + int(valid.sum())

    def _hook(self, slot: int):
        def hook(module, args, output):
            logits, _, indices = output[0], output[1], output[2]  # (N, E), (N, k), (N, k)
            keep = self._mask.to(logits.device) if self._mask is not None else None
            if keep is not None and keep.numel() != logits.shape[0]:
                keep = None  # a forward not driven by the scorer (e.g. different shape): count everything
            if keep is not None:
                logits, indices = logits[keep], indices[keep]
            hits = torch.zeros(self.num_experts, dtype=torch.float64, device=logits.device)
            hits.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.float64, device=logits.device))
            probs = torch.softmax(logits.float(), dim=-1).sum(0).double()  # (E,)
            L = len(self._routers)
            self._hits.setdefault(self.domain, torch.zeros(L, self.num_experts, dtype=torch.float64))[slot] += hits.cpu()
            self._probs.setdefault(self.domain, torch.zeros(L, self.num_experts, dtype=torch.float64))[slot] += probs.cpu()
        return hook

    def __enter__(self) -> "RoutingRecorder":
        for slot, (_, r) in enumerate(self._routers):
            self._handles.append(r.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self) -> RoutingStats:
        top_k = int(self._routers[0][1].top_k)
        out = RoutingStats(experts=list(self.names), top_k=top_k)
        for dom, hits in self._hits.items():
            n = max(self._tokens.get(dom, 0), 1)
            out.domains[dom] = DomainRouting(tokens=self._tokens.get(dom, 0),
                                             fraction=(hits / n).tolist(), mean_prob=(self._probs[dom] / n).tolist())
        return out
