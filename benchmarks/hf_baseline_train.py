# Verbatim copy of the project's shared baseline ../shared/bench/hf_baseline_train.py (the plain-transformers
# training a user gets today, FLEXOLMO.md §7), vendored because shared/ does not travel to the GPU machine;
# benchmarks/train_bench.py runs it for side-by-side rows. Do not edit below this header: copy it again.
"""Baseline a user would reach for: plain transformers + torch training of a FlexOlmo 2-expert model.

Measures tokens/s, peak memory and MFU on one GPU for 1B-class shapes, side by side:
  dense   : Olmo2 dense, full training (the anchor's own cost)
  full-*  : FlexOlmo 2 experts top-2, all params trained, experts kernel eager / batched_mm / grouped_mm
  mlp-only: FlexOlmo, only mlp (both fused expert slots + gate) trainable: the naive 'freeze' a user can do in v5
Params fp32 + bf16 autocast + fused AdamW (HF Trainer's usual bf16 setup). Run one config per process.
"""
import json, os, sys, time
import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

SHAPE = dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
             pad_token_id=100277, eos_token_id=100257, tie_word_embeddings=False)
if os.environ.get("TINY"):
    SHAPE.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, pad_token_id=0, eos_token_id=1)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, S, WARM, STEPS = int(os.environ.get("B", 4)), int(os.environ.get("S", 2048)), 3, 8
PEAK = 989e12  # H100 SXM dense bf16


def build(kind):
    if kind == "dense":
        return Olmo2ForCausalLM(Olmo2Config(**SHAPE, attn_implementation="sdpa"))
    m = FlexOlmoForCausalLM(FlexOlmoConfig(**SHAPE, num_experts=2, num_experts_per_tok=2, attn_implementation="sdpa"))
    impl = {"full-eager": "eager", "full-batched": "batched_mm", "full-grouped": "grouped_mm", "mlp-only": "grouped_mm"}[kind]
    m.set_experts_implementation(impl)
    if kind == "mlp-only":
        for n, p in m.named_parameters():
            p.requires_grad = ".mlp." in n
    return m


def main(kind):
    torch.manual_seed(0)
    m = build(kind).to(DEV).train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=DEV == "cuda")
    x = torch.randint(0, SHAPE["vocab_size"] - 2, (B, S), device=DEV)
    n_all = sum(p.numel() for p in m.parameters()); n_emb = m.get_input_embeddings().weight.numel()
    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = m(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(WARM):
        step()
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    sync(); DEV == "cuda" and torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
    for _ in range(STEPS):
        step()
    sync(); dt = (time.perf_counter() - t) / STEPS
    tok_s = B * S / dt
    L, d = SHAPE["num_hidden_layers"], SHAPE["hidden_size"]
    flops_tok = 6 * (n_all - n_emb) + 6 * L * S * d  # matmul params (top-2 of 2 = all active) + causal attention
    print(json.dumps({"kind": kind, "tok_s": round(tok_s), "step_s": round(dt, 4), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else None,
                      "params_b": round(n_all / 1e9, 3), "trainable_b": round(sum(p.numel() for p in params) / 1e9, 3),
                      "mfu_full_flops": round(flops_tok * tok_s / PEAK, 3), "B": B, "S": S,
                      "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
