"""Model shapes of the benchmarks (OLMo-2 anchors, untied LM head, no grouped-query attention) and their sizes.

    1b    the 1B-class shape of FLEXOLMO.md §7 (flexmoe's `base` preset): 16 layers, hidden 2048, FFN 8192
    7b    the FlexOlmo release's anchor (OLMo-2 7B): 32 layers, hidden 4096, FFN 11008, 32 heads of 128
    tiny  a toy shape that runs each benchmark's code path on CPU in seconds

Sizes at 7b (bf16 = 2 bytes a parameter):
  per layer: attention 4*H^2 = 67.1M, one FFN 3*H*I = 135.3M; embedding and LM head V*H = 411.0M each
  dense anchor 7.30B (14.6 GB); 2 experts 11.63B; merged 7x7B 33.27B = 66.5 GB; 8 experts 37.60B = 75.2 GB
  one expert package (its FFNs) 4.33B = 8.66 GB; full fine-tune of 2x7B: 16 bytes x 11.63B = 186 GB
"""

from __future__ import annotations

SHAPES = {
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
    "1b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16),
    "7b": dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
}


def get(name: str) -> dict:
    try:
        return dict(SHAPES[name])
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}: choose from {', '.join(SHAPES)}") from None


def hf_config_kwargs(shape: dict, **extra) -> dict:
    """The shape as transformers' Olmo2Config / FlexOlmoConfig keyword arguments."""
    return dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_heads"], **extra)


def param_counts(shape: dict, experts: int = 1) -> dict[str, int]:
    """Parameters by part of a model of `shape` with `experts` FFNs a layer (1 = the dense anchor; a router of
    `experts` rows a layer when more than one)."""
    H, I, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    attn = L * 4 * H * H
    ffn_one = L * 3 * H * I
    norms = L * 4 * H + H  # q_norm, k_norm, post-attention, post-feedforward; the final norm
    router = L * experts * H if experts > 1 else 0
    out = dict(attention=attn, ffn_one=ffn_one, ffn=experts * ffn_one, embedding=V * H, lm_head=V * H,
               norms=norms, router=router)
    out["total"] = attn + out["ffn"] + 2 * V * H + norms + router
    out["shared"] = out["total"] - out["ffn"] - router  # what every expert shares with the anchor
    return out
