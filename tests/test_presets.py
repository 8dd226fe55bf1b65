from __future__ import annotations

import pytest

from flexmoe import presets
from flexmoe.config import AnchorConfig
from flexmoe.errors import ConfigError


def _params(c: AnchorConfig) -> int:
    """Olmo2 parameter count: untied embeddings + head, attention with q/k norms, SwiGLU FFN, two norms per layer."""
    h, f = c.hidden_size, c.intermediate_size
    per_layer = 4 * h * h + 2 * h + 3 * h * f + 2 * h
    return 2 * c.vocab_size * h + c.num_layers * per_layer + h


@pytest.mark.parametrize("name, low, high", [("tiny", 1e5, 1e6), ("small", 50e6, 100e6), ("base", 1.0e9, 2.0e9)])
def test_preset_sizes(name, low, high):
    c = presets.get(name)
    assert isinstance(c, AnchorConfig) and c.name == name
    assert low <= _params(c) <= high
    assert c.hidden_size % c.num_heads == 0
    assert c.train.seq_len <= c.max_position_embeddings


def test_base_is_the_1b_class_shape_of_the_paper():
    c = presets.base()
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads) == (16, 2048, 8192, 100352, 16)


def test_tiny_model_builds_with_real_transformers():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    c = presets.tiny()
    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                         num_attention_heads=c.num_heads, max_position_embeddings=c.max_position_embeddings))
    assert sum(p.numel() for p in model.parameters()) == _params(c)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge': choose one of tiny, small, base"):
        presets.get("huge")
