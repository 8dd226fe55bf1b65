"""The training loop's speed options: none of them changes what is computed (benchmarks/train_bench.py measures
them, benchmarks/NOTES.md has the counts).

- with bf16, frozen matmul weights are held in bf16 for the run (`hold_frozen_in`): autocast would cast them at
  every use, so the numbers are the same, without the casts and with half their memory;
- `TrainConfig.compile` compiles each decoder layer (`compile_layers`) and the LM-loss kernel (`loss_kernel`);
- without it the RMSNorms run as `flexmoe.infer.norms.FusedRMSNorm`, torch's fused `F.rms_norm`
  (`fuse_rms_norms`; compiled, inductor fuses them itself), and the expert FFN through `upcycle.SwiGLUFFN`.

Each option returns its undo: the caller gets the model back as it gave it (eager, every tensor in its dtype,
its own norm modules).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

from flexmoe.expert.upcycle import ExpertMoEBlock
from flexmoe.infer.norms import FusedRMSNorm
from flexmoe.train.losses import loss_chunk

# forward: (weight * (x32 * rsqrt(mean(x32^2) + eps))).to(x.dtype), what `FusedRMSNorm` computes as one op
RMS_NORMS = (Olmo2RMSNorm, FlexOlmoRMSNorm)


def speed_up(model, *, bf16: bool, compile: bool) -> Callable[[], None]:
    """Apply the options of a run to `model` in place (before it is wrapped or sharded); returns the undo."""
    held = hold_frozen_in(model, torch.bfloat16) if bf16 else []
    restore = compile_layers(model) if compile else fuse_rms_norms(model)

    def undo() -> None:
        restore()
        for p, dtype in held:
            p.data = p.data.to(dtype)

    return undo


def loss_kernel(compile: bool):
    """The per-chunk kernel of `losses.ChunkedLMLoss`, compiled with the layers or not."""
    return torch.compile(loss_chunk, dynamic=False) if compile else loss_chunk


def frozen_matmul_weights(model) -> list[nn.Parameter]:
    """Frozen parameters used only as matmul weights: linear layers (not tied to the embedding) and an expert
    block's public FFN. Autocast casts these to its dtype at every use; norm weights and embeddings are used in
    fp32 arithmetic and are not listed."""
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            names = ("weight", "bias")
        elif isinstance(module, ExpertMoEBlock):
            names = ExpertMoEBlock.MATMUL_WEIGHTS
        else:
            continue
        for name in names:
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and not p.requires_grad and p.is_floating_point() and id(p) not in tied:
                found[id(p)] = p
    return list(found.values())


def hold_frozen_in(model, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Store `frozen_matmul_weights` in `dtype`; returns what to undo. The run's numbers do not change (autocast
    would make the same casts); after the run a weight from an fp32 anchor holds its bf16-rounded value."""
    changed = []
    for p in frozen_matmul_weights(model):
        if p.dtype != dtype:
            changed.append((p, p.dtype))
            p.data = p.data.to(dtype)
    return changed


def fuse_rms_norms(model) -> Callable[[], None]:
    """Swap every stock OLMo-2 / FlexOlmo RMSNorm of `model` for a `FusedRMSNorm` sharing its weight (eager runs
    only). The undo puts the stock modules back, each holding the parameter its fused stand-in holds by then
    (FSDP and `fsdp.gather_trainable_` replace parameters on the module they find in the tree)."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, RMS_NORMS) and not isinstance(child, FusedRMSNorm)]
    fused = [FusedRMSNorm.replacing(child) for _, _, child in swaps]
    for (parent, name, _), new in zip(swaps, fused):
        setattr(parent, name, new)

    def undo() -> None:
        for (parent, name, child), new in zip(swaps, fused):
            child._parameters["weight"] = new._parameters["weight"]
            setattr(parent, name, child)

    return undo


def compile_layers(model) -> Callable[[], None]:
    """torch.compile every decoder layer in place (parameter names, state dict and checkpointing unchanged);
    all layers share one compiled graph (a second one for a first layer that needs no input gradient).
    Returns the undo, so the returned model runs eagerly with any input later."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    layers = list(getattr(model, model.base_model_prefix).layers)
    for layer in layers:
        layer.compile(dynamic=False)
    knobs = [
        # Let the partitioner recompute cheap elementwise results that backward feeds to a matmul (the SwiGLU
        # product, bf16 weight copies) instead of keeping them from forward to backward: same numbers, less memory.
        (functorch_config, "ban_recompute_materialized_backward", False),
        # The layers' one side effect is the router logits kept for the router losses (`ExpertMoEBlock.
        # router_logits`, `TunableRouter.router_logits`; `flexmoe.train.losses` says why they cannot be returned).
        # Under activation checkpointing the recompute need not replay it (it stores the same values); without
        # this, dynamo breaks the graph at the checkpoint.
        (dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True),
    ]
    before = [(mod, name, getattr(mod, name)) for mod, name, _ in knobs if hasattr(mod, name)]
    for mod, name, value in knobs:
        if hasattr(mod, name):
            setattr(mod, name, value)

    def undo() -> None:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set
        for mod, name, value in before:
            setattr(mod, name, value)

    return undo
