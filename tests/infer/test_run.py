"""`api.generate` (flexmoe/infer/run.py): deterministic decoding runs every forward under torch's switch, only there."""

from __future__ import annotations

import pytest
import torch

from flexmoe import api
from flexmoe.config import GenerateConfig


@pytest.mark.parametrize("fast", [True, False])
def test_deterministic_generation(eval_models, fast, deterministic_seen):
    cfg = dict(model=eval_models.flex["flex3"], prompts=["the lord god said", "def f(x):"], max_new_tokens=6,
               fast=fast)
    seen = deterministic_seen
    det = api.generate(GenerateConfig(**cfg, deterministic=True))
    n = len(seen)
    plain = api.generate(GenerateConfig(**cfg))
    assert 0 < n < len(seen) and all(seen[:n]) and not any(seen[n:])
    assert det.deterministic and not plain.deterministic and det.to_json()["deterministic"]
    assert det.texts == plain.texts and det.new_tokens == plain.new_tokens  # a CPU run repeats anyway
    assert not torch.are_deterministic_algorithms_enabled()
