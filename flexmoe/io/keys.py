"""The one source of truth for state-dict names.

Three layouts share these names (see docs/FORMAT.md):
- anchor  (dense `Olmo2ForCausalLM` / `Qwen3ForCausalLM` on disk):  model.layers.{L}.mlp.{gate,up,down}_proj.weight
- package (one expert, `expert.safetensors`):   same FFN names as the anchor, plus the router row and bias
- merged  (`FlexOlmoForCausalLM` / `Qwen3MoeForCausalLM`): model.layers.{L}.mlp.experts.{e}.{proj}.weight, mlp.gate.weight
Everything that is not an FFN or router tensor is *shared* and must be bit-identical everywhere.
"""

from __future__ import annotations

import re

FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
DENSE_FFN_TEMPLATE = "model.layers.{layer}.mlp.{proj}.weight"
EXPERT_FFN_TEMPLATE = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
ROUTER_TEMPLATE = "model.layers.{layer}.mlp.gate.weight"

_DENSE_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
_PKG_ROW = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.weight$")
_PKG_BIAS = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.bias$")


def dense_ffn_key(layer: int, proj: str) -> str:
    """Anchor (and expert package) FFN weight name."""
    return DENSE_FFN_TEMPLATE.format(layer=layer, proj=proj)


def expert_key(layer: int, expert: int, proj: str) -> str:
    """Merged-checkpoint FFN weight of expert `expert` (0 = public)."""
    return EXPERT_FFN_TEMPLATE.format(layer=layer, expert=expert, proj=proj)


def router_key(layer: int) -> str:
    """Merged-checkpoint router weight, shape (E, hidden)."""
    return ROUTER_TEMPLATE.format(layer=layer)


def router_bias_key(layer: int) -> str:
    """Merged-checkpoint expert bias, shape (E,), stored in the sidecar file, applied as min(b, 0)."""
    return f"model.layers.{layer}.mlp.gate.expert_bias"


def package_row_key(layer: int) -> str:
    """Expert package router row r_i, shape (hidden,)."""
    return f"model.layers.{layer}.mlp.router.weight"


def package_bias_key(layer: int) -> str:
    """Expert package expert bias b_i, shape () (raw; applied as min(b, 0))."""
    return f"model.layers.{layer}.mlp.router.bias"


def parse_dense_ffn(key: str) -> tuple[int, str] | None:
    m = _DENSE_FFN.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def parse_expert_key(key: str) -> tuple[int, int, str] | None:
    m = _EXPERT_FFN.match(key)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def parse_router_key(key: str) -> int | None:
    m = _ROUTER.match(key)
    return int(m.group(1)) if m else None


def is_shared(key: str) -> bool:
    """True for tensors that every expert shares with the anchor (embeddings, attention, norms, LM head)."""
    return not (
        _DENSE_FFN.match(key) or _EXPERT_FFN.match(key) or _ROUTER.match(key)
        or _PKG_ROW.match(key) or _PKG_BIAS.match(key)
    )


_MATMUL = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight|lm_head\.weight)$")


def is_matmul_weight(key: str) -> bool:
    """True for shared tensors used only as matmul weights (attention projections, LM head): not the embedding,
    whose rows are looked up, nor norms, which act in fp32."""
    return bool(_MATMUL.match(key))


def anchor_view_key(merged_key: str) -> str | None:
    """Name a merged-checkpoint tensor would have in the anchor, or None if it is not an anchor tensor.

    Expert 0 (public FFN) maps back to the dense FFN; owner experts and the router have no anchor name.
    This lets the anchor fingerprint be recomputed from a merged checkpoint.
    """
    parsed = parse_expert_key(merged_key)
    if parsed is not None:
        layer, expert, proj = parsed
        return dense_ffn_key(layer, proj) if expert == 0 else None
    if _ROUTER.match(merged_key):
        return None
    return merged_key


def natural_order(name: str) -> tuple:
    """Sort key of the canonical tensor order of every checkpoint flexmoe writes: "layers.10" after "layers.9".

    Writing in this order makes the shard layout depend only on which tensors are present, so surgery round trips
    are byte-identical. Ints and strings are never compared with each other.
    """
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
