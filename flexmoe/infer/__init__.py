"""Fast inference for merged checkpoints of every anchor family, plugged into transformers' own extension points.

- `flexmoe.infer.experts`: an experts kernel registered in transformers' `ALL_EXPERTS_FUNCTIONS` ("flexmoe"):
  host-sync-free sort + grouped GEMM (Triton for decode-sized batches, `torch._grouped_mm` for prefill).
- `flexmoe.infer.decode`: greedy decoding over transformers' `StaticCache` with the decode step (and small
  prefills) captured in CUDA graphs per batch bucket.
- `flexmoe.infer.decode_layer`: a FlexOlmo layer's decode step in ten kernels (Triton ones in
  `flexmoe.infer.triton_decode`), which the decoder runs in place of the stock layer where the model qualifies.

The checkpoint format is untouched; the expert bias comes from the model's routers (`BiasedTopKRouter` after
`flexmoe.checkpoint.load.load_model`), which run unchanged inside the captured step.
"""

from __future__ import annotations


import torch

from flexmoe.infer.decode import FastDecoder, GenerateOutput
from flexmoe.infer.determinism import deterministic
from flexmoe.infer.experts import EXPERTS_IMPL, register

__all__ = ["FastDecoder", "GenerateOutput", "deterministic", "enable_fast_path", "fast_generate", "EXPERTS_IMPL"]


def enable_fast_path(model, *, cuda_graphs: bool | None = None, compile: bool | str = False,
                     experts: str = EXPERTS_IMPL, fuse_norms: bool = True,
                     fused: bool | str | None = None) -> FastDecoder:
    """Switch `model` to flexmoe's experts kernel and attach a `FastDecoder` (used by `fast_generate`).

    Args:
        model: a `FlexOlmoForCausalLM` (or `Qwen3MoeForCausalLM`, `MixtralForCausalLM`: the same experts layout) on
            its final device and dtype.
        cuda_graphs: capture decode steps in CUDA graphs (default: when on CUDA).
        compile: torch.compile each decoder layer for the decode step (see `FastDecoder`).
        experts: the registered experts kernel ("flexmoe", "flexmoe_grouped", "flexmoe_triton", or a stock one).
        fuse_norms: swap the RMSNorms for `flexmoe.infer.norms.FusedRMSNorm` (same weights, same math).
        fused: decode steps through `flexmoe.infer.decode_layer.FusedDecodeLayer` (see `FastDecoder`; default:
            where the model qualifies).
    Returns:
        The decoder; `model.generate` keeps working and also uses the new experts kernel.
    """
    register()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    if fuse_norms:
        from flexmoe.infer.norms import fuse_rms_norms

        fuse_rms_norms(model)
    decoder = FastDecoder(model.eval(), cuda_graphs=cuda_graphs, compile=compile, fused=fused)
    model._flexmoe_decoder = decoder
    return decoder


def fast_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
                  attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, **generate_kwargs) -> torch.Tensor:
    """A drop-in for greedy `model.generate(input_ids, max_new_tokens=..., ...)`: returns (B, T + n) token ids.

    EOS and pad ids default to the model's generation config, as in `generate`. Anything the fast path does not
    do (sampling, beams, logits processors) is handed to `model.generate` unchanged.
    """
    greedy = not generate_kwargs.get("do_sample", False) and generate_kwargs.get("num_beams", 1) == 1
    if not greedy or set(generate_kwargs) - {"do_sample", "num_beams"}:
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, **generate_kwargs)
    gen = getattr(model, "generation_config", None)
    if eos_token_id is None and gen is not None:
        eos_token_id = gen.eos_token_id
    if pad_token_id is None and gen is not None:
        pad_token_id = gen.pad_token_id
    decoder = getattr(model, "_flexmoe_decoder", None) or enable_fast_path(model)
    out = decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id)
    return out.sequences
