"""Anchor families: which dense transformers class an anchor is, which MoE class a merge of it is, and how one
config.json becomes the other. Only config.json and key names live here (no model code).

Every family's MoE class stores experts on disk as `save_pretrained` writes them (transformers v5 fuses them in
memory and un-fuses them on save): model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight and the router
model.layers.{L}.mlp.gate.weight, so one key mapping (`flexmoe.io.keys`) serves all: dense FFN → expert 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from flexmoe.io.keys import DENSE_FFN_TEMPLATE, EXPERT_FFN_TEMPLATE, ROUTER_TEMPLATE

# Keys a MoE config.json has and its dense anchor's does not (dropped by `dense_config`).
_MOE_ONLY = ("num_experts", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
             "output_router_logits")


@dataclass(frozen=True)
class Family:
    """One anchor family: dense `dense_type` (class `dense_class`) → MoE `moe_type` (class `moe_class`)."""

    dense_type: str
    dense_class: str
    moe_type: str
    moe_class: str
    label: str  # "an OLMo-2 model", for errors
    moe_label: str  # "a FlexOlmo model"
    moe_extra: Callable[[dict], dict] = field(default=lambda base: {})  # MoE-only keys derived from the dense config
    moe_drop: tuple[str, ...] = ()  # MoE-only keys beyond _MOE_ONLY, dropped by `dense_config`
    dense_ffn: str = DENSE_FFN_TEMPLATE  # "…{layer}…{proj}…"; expert 0 of a merge is this tensor
    expert_ffn: str = EXPERT_FFN_TEMPLATE  # "…{layer}…{expert}…{proj}…"
    router: str = ROUTER_TEMPLATE  # "…{layer}…", shape (E, hidden)
    caveat: str = ""

    def moe_config(self, base: dict, num_experts: int, top_k: int) -> dict:
        """A dense (or this family's MoE) config.json as the MoE one: top-k over a softmax of all E experts, no
        renormalisation (FlexOlmo's semantics); every other key is kept as is."""
        cfg = dict(base)
        cfg.update(self.moe_extra(base), model_type=self.moe_type, architectures=[self.moe_class],
                   num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False)
        return cfg

    def dense_config(self, moe: dict) -> dict:
        """This family's MoE config.json as its dense anchor's (`init-anchor --from-moe`)."""
        cfg = {k: v for k, v in moe.items() if k not in _MOE_ONLY + self.moe_drop}
        cfg.update(model_type=self.dense_type, architectures=[self.dense_class])
        return cfg


def _qwen3_moe(base: dict) -> dict:
    # every layer sparse (no dense-MLP layers), each expert the size of the dense FFN, no shared expert
    return {"mlp_only_layers": [], "decoder_sparse_step": 1, "moe_intermediate_size": int(base["intermediate_size"])}


OLMO2 = Family("olmo2", "Olmo2ForCausalLM", "flex_olmo", "FlexOlmoForCausalLM", "an OLMo-2 model", "a FlexOlmo model",
               caveat="post-norm blocks: the router reads the raw residual stream")
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", "qwen3_moe", "Qwen3MoeForCausalLM", "a Qwen3 model", "a Qwen3-MoE model",
               moe_extra=_qwen3_moe,
               moe_drop=("num_local_experts", "mlp_only_layers", "decoder_sparse_step", "moe_intermediate_size"),
               caveat="pre-norm blocks: the router reads the RMS-normalised residual (post_attention_layernorm)")

FAMILIES = {f.dense_type: f for f in (OLMO2, QWEN3)}  # keyed by the dense model_type
_BY_MOE = {f.moe_type: f for f in FAMILIES.values()}


def of_dense(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type)


def of_moe(model_type: str | None) -> Family | None:
    return _BY_MOE.get(model_type)


def of_any(model_type: str | None) -> Family | None:
    """The family whose dense or MoE model_type is `model_type`."""
    return FAMILIES.get(model_type) or _BY_MOE.get(model_type)
