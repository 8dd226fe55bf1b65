"""`api.generate`: load a model directory with its tokenizer and continue prompts, fast path or stock."""

from __future__ import annotations

import dataclasses
import time

import torch

from flexmoe.config import DType, GenerateConfig
from flexmoe.infer import FastDecoder, deterministic, enable_fast_path


@dataclasses.dataclass
class GenerateResult:
    """Greedy continuations, with timings of the prefill and the decode loop (device-synchronised)."""

    model: str
    prompts: list[str]
    texts: list[str]  # the continuations only
    new_tokens: list[int]  # tokens generated per prompt (fewer than the maximum where an EOS ended it)
    prefill_s: float
    decode_s: float
    device: str
    fast: bool
    deterministic: bool = False
    top_k: int | None = None  # experts a token was routed to (None: a dense model)

    @property
    def tok_s(self) -> float:
        return sum(self.new_tokens) / max(self.prefill_s + self.decode_s, 1e-9)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "tok_s": self.tok_s}


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    with deterministic(cfg.deterministic):
        return _run_generate(cfg)


def _run_generate(cfg: GenerateConfig) -> GenerateResult:
    from flexmoe.checkpoint.load import load_model
    from flexmoe.data import load_tokenizer
    from flexmoe.io import hf_config
    from flexmoe.router.biased import refuse_bad_top_k, set_top_k

    device = cfg.device.torch()
    dtype = (cfg.dtype or (DType.BFLOAT16 if device.type == "cuda" else DType.FLOAT32)).torch
    config = hf_config.read_config(cfg.model)  # a clear error for a missing directory before anything loads
    kind = str(config.get("model_type"))
    refuse_bad_top_k(config, cfg.top_k, cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    if hf_config.is_moe(kind):
        model = load_model(cfg.model, dtype=dtype, device=device, apply_bias=cfg.bias)
        top_k = model.config.num_experts_per_tok if cfg.top_k is None else set_top_k(model, cfg.top_k)
    else:  # a dense anchor: the static-cache decoder works for it too (it has no experts to swap)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
        top_k = None
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = tokenizer(list(cfg.prompts), return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    eos = model.generation_config.eos_token_id
    if cfg.fast:
        # every family's MoE class keeps its experts as FlexOlmo does (gated, (E, 2I, H) / (E, H, I), no bias), so
        # flexmoe's experts kernel serves them all; a dense anchor has no experts to swap
        decoder = enable_fast_path(model) if hf_config.is_moe(kind) else FastDecoder(model.eval())
        out = decoder.generate(ids, mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad_id)
        seqs, prefill_s, decode_s = out.sequences, out.prefill_s, out.decode_s
    else:
        t0 = time.perf_counter()
        with torch.inference_mode():
            seqs = model.generate(ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        prefill_s, decode_s = 0.0, time.perf_counter() - t0
    new = seqs[:, ids.shape[1]:].tolist()
    stops = set([eos] if isinstance(eos, int) else (eos or []))
    counts = [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new]  # up to the EOS
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(new, counts)], skip_special_tokens=True)
    return GenerateResult(model=str(cfg.model), prompts=list(cfg.prompts), texts=texts, new_tokens=counts,
                          prefill_s=prefill_s, decode_s=decode_s, device=str(device), fast=cfg.fast,
                          deterministic=cfg.deterministic, top_k=top_k)
