"""Anchor families: which dense transformers class an anchor is, which MoE class a merge of it is, and how one
config.json becomes the other. Only config.json and key names live here (no model code).

Every family's MoE class stores experts on disk as `save_pretrained` writes them (transformers v5 fuses them in
memory and un-fuses them on save). FlexOlmo and Qwen3-MoE write model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj
.weight and the router model.layers.{L}.mlp.gate.weight: flexmoe's canonical names (`flexmoe.io.keys`; dense FFN →
expert 0). Mixtral writes model.layers.{L}.block_sparse_moe.experts.{e}.w1/w3/w2.weight (gate/up/down) and
block_sparse_moe.gate.weight; `Family.to_disk` / `from_disk` translate at the file boundary (writer / reader),
so everything between works on canonical names.

Mixtral's router always renormalises the top-k weights (no `norm_topk_prob` switch), so a Mixtral merge equals
FlexOlmo's semantics only when k = E (`Family.renormalises`): merge / add / remove default its top_k to E and
refuse an explicit k < E.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Callable

from flexmoe.io.keys import DENSE_FFN_TEMPLATE, EXPERT_FFN_TEMPLATE, ROUTER_TEMPLATE

# transformers v5 saves E as either name (each MoE config's attribute_map aliases the other): stock Qwen3-MoE
# folders say num_local_experts, the released ones num_experts. Read both, write one (`Family.num_experts_key`).
_EXPERT_COUNT = ("num_experts", "num_local_experts")
# Keys a MoE config.json has and its dense anchor's does not (dropped by `dense_config`).
_MOE_ONLY = ("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
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
    renormalises: bool = False  # the MoE router always renormalises the top-k weights: only k = E is FlexOlmo's
    pre_norm: bool = False  # the router reads post_attention_layernorm's output (else, OLMo-2: the raw residual)
    num_experts_key: str = "num_experts"  # the MoE config.json's key for E
    dense_only: tuple[str, ...] = ()  # dense-only keys dropped by `moe_config` (`moe_check` refuses unusual values)
    moe_check: Callable[[dict], None] = field(default=lambda base: None)
    disk_names: tuple[tuple[str, str], ...] = ()  # (canonical regex, on-disk replacement) pairs
    canonical_names: tuple[tuple[str, str], ...] = ()  # their inverse: (on-disk regex, canonical replacement)

    def moe_config(self, base: dict, num_experts: int, top_k: int) -> dict:
        """A dense (or this family's MoE) config.json as the MoE one: top-k over a softmax of all E experts, no
        renormalisation (FlexOlmo's semantics); every other key is kept as is."""
        self.moe_check(base)
        cfg = {k: v for k, v in base.items() if k not in self.dense_only + _EXPERT_COUNT}
        cfg.update(self.moe_extra(base), model_type=self.moe_type, architectures=[self.moe_class],
                   num_experts_per_tok=top_k)
        cfg[self.num_experts_key] = num_experts
        if not self.renormalises:
            cfg["norm_topk_prob"] = False
        return cfg

    def num_experts(self, config: dict) -> int:
        """E of this family's MoE config.json, under either name (`KeyError` when it has neither)."""
        for key in (self.num_experts_key, *_EXPERT_COUNT):
            if key in config:
                return int(config[key])
        raise KeyError(self.num_experts_key)

    def to_disk(self, key: str) -> str:
        """flexmoe's canonical tensor name → the name this family's MoE class saves it under."""
        for pat, rep in self.disk_names:
            key = re.sub(pat, rep, key)
        return key

    def from_disk(self, key: str) -> str:
        """The name this family's MoE class saves a tensor under → flexmoe's canonical one."""
        for pat, rep in self.canonical_names:
            key = re.sub(pat, rep, key)
        return key

    def dense_config(self, moe: dict) -> dict:
        """This family's MoE config.json as its dense anchor's (`init-anchor --from-moe`)."""
        cfg = {k: v for k, v in moe.items() if k not in _MOE_ONLY + self.moe_drop}
        cfg.update(model_type=self.dense_type, architectures=[self.dense_class])
        return cfg


def _qwen3_moe(base: dict) -> dict:
    # every layer sparse (no dense-MLP layers), each expert the size of the dense FFN, no shared expert
    return {"mlp_only_layers": [], "decoder_sparse_step": 1, "moe_intermediate_size": int(base["intermediate_size"])}


# Mixtral on disk: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down), block_sparse_moe.gate (router).
_L, _E = r"^(model\.layers\.\d+)", r"(\d+)"
_MIXTRAL_PROJ = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
_MIXTRAL_TO_DISK = tuple((rf"{_L}\.mlp\.experts\.{_E}\.{ours}\.weight$", rf"\1.block_sparse_moe.experts.\2.{theirs}.weight")
                         for ours, theirs in _MIXTRAL_PROJ) + ((rf"{_L}\.mlp\.gate\.weight$", r"\1.block_sparse_moe.gate.weight"),)
_MIXTRAL_FROM_DISK = tuple((rf"{_L}\.block_sparse_moe\.experts\.{_E}\.{theirs}\.weight$", rf"\1.mlp.experts.\2.{ours}.weight")
                           for ours, theirs in _MIXTRAL_PROJ) + ((rf"{_L}\.block_sparse_moe\.gate\.weight$", r"\1.mlp.gate.weight"),)


def _llama_check(base: dict) -> None:
    from flexmoe.errors import ConfigError

    for k in ("attention_bias", "mlp_bias"):
        if base.get(k):
            raise ConfigError(f"config.json has {k}=true; Mixtral has no {k.split('_')[0]} biases, so this "
                              "Llama model cannot become a Mixtral merge")
    if int(base.get("pretraining_tp") or 1) != 1:
        raise ConfigError(f"config.json has pretraining_tp={base['pretraining_tp']}; set it to 1 (transformers "
                          "ignores it in the forward pass) before adopting this model")


def _mixtral(base: dict) -> dict:
    # Mistral's keys plus Mixtral's router settings: no jitter (deterministic routing), no aux loss at inference
    return {"sliding_window": base.get("sliding_window"), "router_jitter_noise": 0.0}


OLMO2 = Family("olmo2", "Olmo2ForCausalLM", "flex_olmo", "FlexOlmoForCausalLM", "an OLMo-2 model", "a FlexOlmo model",
               caveat="post-norm blocks: the router reads the raw residual stream")
QWEN3 = Family("qwen3", "Qwen3ForCausalLM", "qwen3_moe", "Qwen3MoeForCausalLM", "a Qwen3 model", "a Qwen3-MoE model",
               moe_extra=_qwen3_moe,
               moe_drop=("num_local_experts", "mlp_only_layers", "decoder_sparse_step", "moe_intermediate_size"),
               pre_norm=True,
               caveat="pre-norm blocks: the router reads the RMS-normalised residual (post_attention_layernorm)")

_MIXTRAL_CAVEAT = ("pre-norm blocks; Mixtral always renormalises the top-k weights, so only k = E is FlexOlmo's "
                   "routing: top_k defaults to E and an explicit k < E is refused")
_MIXTRAL_KW = dict(moe_type="mixtral", moe_class="MixtralForCausalLM", moe_label="a Mixtral model",
                   moe_extra=_mixtral, moe_drop=("num_local_experts", "router_jitter_noise"),
                   dense_only=("attention_bias", "mlp_bias", "pretraining_tp"), moe_check=_llama_check,
                   renormalises=True, pre_norm=True, num_experts_key="num_local_experts",
                   disk_names=_MIXTRAL_TO_DISK,
                   canonical_names=_MIXTRAL_FROM_DISK,
                   caveat=_MIXTRAL_CAVEAT)
LLAMA = Family("llama", "LlamaForCausalLM", label="a Llama model", **_MIXTRAL_KW)
MISTRAL = Family("mistral", "MistralForCausalLM", label="a Mistral model", **_MIXTRAL_KW)

FAMILIES = {f.dense_type: f for f in (OLMO2, QWEN3, LLAMA, MISTRAL)}  # keyed by the dense model_type
# a Mixtral folder's dense anchor (`init-anchor --from-moe`) is a Mistral one: Mixtral is Mistral + MoE blocks
_BY_MOE = {f.moe_type: f for f in (OLMO2, QWEN3, MISTRAL)}


def of_dense(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type)


def of_moe(model_type: str | None) -> Family | None:
    return _BY_MOE.get(model_type)


def of_any(model_type: str | None) -> Family | None:
    """The family whose dense or MoE model_type is `model_type`."""
    return FAMILIES.get(model_type) or _BY_MOE.get(model_type)
