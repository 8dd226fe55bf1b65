"""Anchor presets: zero-argument builders with literal sizes, each a spec sheet for one scale.

`tiny` trains end to end on a laptop CPU in well under a minute (tests, the demo); `small` (~67M parameters
with a 32k vocabulary) is for one GPU; `base` is the 1B-class shape of FLEXOLMO.md §7.
"""

from __future__ import annotations

import dataclasses

from flexmoe.config import AnchorConfig, DType, TrainConfig
from flexmoe.errors import ConfigError


def tiny() -> AnchorConfig:
    """0.3M parameters: 2 layers, hidden 64, 4 heads, FFN 256, byte-level BPE of 1024, sequences of 128."""
    return AnchorConfig(
        name="tiny",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=256,
        dtype=DType.FLOAT32,
        train=TrainConfig(max_steps=100, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=10,
                          weight_decay=0.1, log_every=10),
    )


def small() -> AnchorConfig:
    """67M parameters: 8 layers, hidden 512, 8 heads, FFN 2048, 32k vocabulary, sequences of 1024; one GPU."""
    return AnchorConfig(
        name="small",
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=2048,
        num_layers=8,
        num_heads=8,
        max_position_embeddings=2048,
        dtype=DType.FLOAT32,
        train=TrainConfig(max_steps=10000, batch_size=32, seq_len=1024, lr=2e-3, warmup_steps=500,
                          weight_decay=0.1, bf16=True, checkpoint_every=1000, log_every=50),
    )


def base() -> AnchorConfig:
    """1.5B parameters (1B-class): 16 layers, hidden 2048, 16 heads, FFN 8192, dolma2 vocabulary 100352."""
    return AnchorConfig(
        name="base",
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=16,
        max_position_embeddings=4096,
        dtype=DType.BFLOAT16,
        train=TrainConfig(max_steps=50000, batch_size=4, grad_accum=8, seq_len=2048, lr=4e-4, warmup_steps=2000,
                          weight_decay=0.1, bf16=True, checkpoint_every=1000, log_every=50),
    )


PRESETS = {"tiny": tiny, "small": small, "base": base}


def get(name: str) -> AnchorConfig:
    """The preset called `name`; `ConfigError` listing the known ones otherwise."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def training(name: str, **changes) -> TrainConfig:
    """The training settings of preset `name` with `changes`, e.g. `training("tiny", max_steps=50, device=...)`:
    the `train` of a `TrainAnchorConfig`."""
    return dataclasses.replace(get(name).train, **changes)
