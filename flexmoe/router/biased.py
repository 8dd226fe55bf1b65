"""The FlexOlmo expert bias as a small subclass of transformers' `FlexOlmoTopKRouter` (and, for Qwen3 anchors, of
`Qwen3MoeTopKRouter`, which computes the same softmax-then-top-k).

Stock transformers' router has no bias slot, and the bias cannot be folded into the router weight because the
router reads the un-normalised residual stream. So merged checkpoints keep the biases in a sidecar file that stock
`from_pretrained` never reads, and `flexmoe.checkpoint.load.load_model` swaps each router for this class.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from flexmoe.errors import ConfigError


class _Biased:
    """The expert bias, mixed in before a stock top-k router class (its `__init__(config)`, `weight`, `top_k`,
    `num_experts`, `hidden_dim`; `norm_topk_prob` where it has one: Mixtral's always renormalises)."""

    norm_topk_prob = False

    def __init__(self, config):
        super().__init__(config)
        self.expert_bias = nn.Parameter(torch.zeros(self.num_experts))  # (E,) raw b; applied as min(b, 0)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The biased router logits (T, E) of hidden states (T, H): the one step a subclass changes."""
        router_logits = F.linear(hidden_states, self.weight)  # (T, E)
        return router_logits + self.expert_bias.clamp(max=0).to(router_logits.dtype)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # (T, H)
        router_logits = self.logits(hidden_states)  # (T, E)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)  # over all E experts
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)  # (T, k)
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), router_indices

    @classmethod
    def replacing(cls, router: FlexOlmoTopKRouter | Qwen3MoeTopKRouter, config, bias: torch.Tensor | None = None):
        """A biased router sharing `router.weight` (the same Parameter object) and its top-k settings.

        Args:
            bias: (E,) raw biases; None means zeros (then it routes exactly like `router`).
        """
        new = cls(config)
        new.weight = router.weight
        new.top_k, new.norm_topk_prob = router.top_k, getattr(router, "norm_topk_prob", cls.norm_topk_prob)
        b = torch.zeros(new.num_experts) if bias is None else bias.detach().float().reshape(-1)
        if b.shape != (new.num_experts,):
            raise ValueError(f"expert_bias must have shape ({new.num_experts},), got {tuple(b.shape)}")
        new.expert_bias = nn.Parameter(b.to(router.weight.device).clone())
        return new


class BiasedTopKRouter(_Biased, FlexOlmoTopKRouter):
    """Identical to `FlexOlmoTopKRouter` except: `logits[:, e] += min(expert_bias[e], 0)` before the softmax.

    The clamp keeps the bias a pure penalty (FlexOlmo §3: an expert may only be pushed away from tokens far
    from its domain). With all biases >= 0 it computes exactly what the stock router computes.
    Returns the same triple as the parent: (router_logits (T, E) biased, router_scores (T, k), router_indices (T, k)).
    Subclasses that route differently override `logits` only (router tuning: `flexmoe.router.tune.TunableRouter`).
    """


class BiasedQwen3MoeTopKRouter(_Biased, Qwen3MoeTopKRouter):
    """`BiasedTopKRouter` for a `Qwen3MoeForCausalLM` (an instance of the stock `Qwen3MoeTopKRouter`, so transformers'
    router-logit recorder still finds it). It reads the post-attention RMS-normalised residual (pre-norm block)."""


class BiasedMixtralTopKRouter(_Biased, MixtralTopKRouter):
    """`BiasedTopKRouter` for a `MixtralForCausalLM` (an instance of the stock `MixtralTopKRouter`). Mixtral always
    renormalises the top-k weights, so this does too; flexmoe writes Mixtral merges with k = E only, where
    renormalising a softmax over all E experts changes nothing (FlexOlmo's semantics)."""

    norm_topk_prob = True


# The stock top-k router classes of the families' MoE models (their biased subclasses are instances too), and
# those that always renormalise the top-k weights (FlexOlmo's routing only at k = E).
STOCK_ROUTERS = (FlexOlmoTopKRouter, Qwen3MoeTopKRouter, MixtralTopKRouter)
RENORMALISING_ROUTERS = (MixtralTopKRouter,)

# The biased router of each anchor family's MoE model_type (flexmoe.io.families).
BIASED_ROUTERS = {"flex_olmo": BiasedTopKRouter, "qwen3_moe": BiasedQwen3MoeTopKRouter,
                  "mixtral": BiasedMixtralTopKRouter}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router module) of every top-k router in `model`, in layer order; [] for a dense model."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, STOCK_ROUTERS):
            m = _LAYER.search(name)
            found.append((int(m.group(1)) if m else len(found), module))
    return sorted(found, key=lambda x: x[0])


def top_k_in_range(k: int, num_experts: int) -> int:
    """The k in effect for a requested `k` (0 = all) of `num_experts`; a `ConfigError` where it is out of range.
    Callers that know E from a config.json check before loading any weights."""
    k = num_experts if k == 0 else k
    if not 1 <= k <= num_experts:
        raise ConfigError(f"top-k {k} is out of range: the model has {num_experts} experts (use 1..{num_experts}, "
                          f"or 0 / 'all')")
    return k


def refuse_bad_top_k(config: dict, k: int | None, model_dir: str | Path) -> None:
    """Before any weights of `model_dir` load (whose progress bar would precede the error), from its config.json
    `config`: a `ConfigError` where `k` (0 = all) cannot be set on it, a dense model or out of its experts' range;
    nothing for k None."""
    from flexmoe.io import hf_config

    if k is None:
        return
    kind = config.get("model_type")
    if not hf_config.is_moe(kind):
        raise ConfigError(f"--top-k needs a mixture-of-experts model; {model_dir} is a dense {kind!r} model")
    top_k_in_range(k, hf_config.family(config).num_experts(config))


def set_top_k(model: torch.nn.Module, k: int) -> int:
    """Route every token to `k` experts (0 = all); returns the k in effect. The model is changed in place."""
    rs = routers(model)
    if not rs:
        raise ConfigError("--top-k needs a mixture-of-experts model; this one is dense")
    num = rs[0][1].num_experts
    k = top_k_in_range(k, num)
    if k < num and isinstance(rs[0][1], RENORMALISING_ROUTERS):
        raise ConfigError(f"top-k {k} < {num} experts on a {type(model).__name__}: its router renormalises the "
                          f"top-k weights, which is not FlexOlmo's routing; use top-k {num} (or 0 / 'all')")
    for _, r in rs:
        r.top_k = k
    if hasattr(model, "config"):
        model.config.num_experts_per_tok = k
    return k
