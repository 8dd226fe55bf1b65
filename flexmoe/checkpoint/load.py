"""Load a merged checkpoint with its expert biases: the stock MoE class of its anchor family (`FlexOlmoForCausalLM`,
`Qwen3MoeForCausalLM`) + biased-router swaps (`flexmoe.router.biased.BIASED_ROUTERS`)."""

from __future__ import annotations

from pathlib import Path

import torch

from safetensors import SafetensorError

from flexmoe.errors import CheckpointError
from flexmoe.checkpoint.verify import check_files
from flexmoe.io import families, hf_config
from flexmoe.io.merged import BIAS_FILE
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import router_bias_key


def read_biases(model_dir: str | Path, num_layers: int, num_experts: int) -> torch.Tensor | None:
    """(L, E) float32 raw biases from the sidecar, or None when the folder has none (e.g. a non-flexmoe model)."""
    path = Path(model_dir) / BIAS_FILE
    if not path.is_file():
        return None
    with LazyReader.from_file(path) as r:
        biases = [r.get(router_bias_key(layer)).float() for layer in range(num_layers)]
    for layer, b in enumerate(biases):
        if b.shape != (num_experts,):
            raise CheckpointError(f"{path}: {router_bias_key(layer)} has shape {list(b.shape)}, expected [{num_experts}]")
    return torch.stack(biases)


def apply_expert_bias(model, biases: torch.Tensor | None) -> None:
    """Swap every layer's `mlp.gate` for the biased router of the model's family (`BiasedTopKRouter` for FlexOlmo)
    that shares its weight; biases: (L, E) or None (zeros)."""
    from flexmoe.router.biased import BIASED_ROUTERS, BiasedTopKRouter

    biased = BIASED_ROUTERS.get(model.config.model_type, BiasedTopKRouter)
    for layer, block in enumerate(model.model.layers):
        bias = None if biases is None else biases[layer]
        block.mlp.gate = biased.replacing(block.mlp.gate, model.config, bias)


def load_model(model_dir: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               experts_implementation: str | None = None, apply_bias: bool = True):
    """Load a merged folder as its family's stock MoE class (`flex_olmo`: `FlexOlmoForCausalLM`, `qwen3_moe`:
    `Qwen3MoeForCausalLM`), with the flexmoe expert biases applied.

    Args:
        dtype: parameter dtype; None keeps the checkpoint's (`dtype="auto"`).
        device: move the model there after loading (no accelerate needed).
        experts_implementation: transformers' experts kernel: "eager", "batched_mm" or "grouped_mm".
        apply_bias: False gives exactly what stock `from_pretrained` gives.
    """
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a model directory (no config.json)")
    family = families.of_moe(hf_config.read_config(model_dir).get("model_type")) or families.OLMO2
    model_class = getattr(transformers, family.moe_class)
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    check_files(model_dir)
    try:
        model = model_class.from_pretrained(model_dir, **kwargs)
    except SafetensorError as e:  # a damaged folder written before manifests existed
        raise CheckpointError(f"{model_dir}: cannot read its weights ({e}); re-copy it from its source") from e
    if apply_bias:
        cfg = model.config
        apply_expert_bias(model, read_biases(model_dir, cfg.num_hidden_layers, cfg.num_experts))
    if device is not None:
        model.to(device)
    return model.eval()
