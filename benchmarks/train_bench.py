"""Training throughput and memory at the 1B-class shape: flexmoe train-expert vs full fine-tuning, dense training
and plain transformers, side by side in one run (issue 7).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py            # priority-ordered rows, ~4 min budget
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py --quick    # expert, hf:full-eager, expert+compile
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py --budget-s 540   # every row (~9 min)
    PYTHONPATH=. python3 benchmarks/train_bench.py --rows expert+compile --batch 1  # one row, one batch size
    TINY=1 PYTHONPATH=. python benchmarks/train_bench.py --quick                 # CPU smoke run (also: --tiny)
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py --shape 7b # the 7B shape, ~3.5 min (below)
    PYTHONPATH=. python benchmarks/train_bench.py --shape 7b --tiny --mem-gib 0.5  # its code path on CPU

Shape: 16 layers, hidden 2048, FFN 8192, 16 heads (head dim 128), vocab 100352, untied head; a random bf16 anchor in
the real on-disk layout is written once to a temp folder (`flexmoe.testing.build_synthetic_anchor`, ~3 GB) and every
flexmoe row loads it through the production code. bf16 autocast, sequences of 4096, 2 sequences a step (8192 tokens,
the token count of FLEXOLMO.md §7's B4 x 2048), one optimizer step per micro-batch; a row that runs out of memory is
retried with half the batch. Each row runs in a fresh subprocess so its peak memory is its own.

Rows (each `flexmoe.train.loop.train`, exactly what `flexmoe train-expert` / `train-anchor` run, with `on_step`
recording CUDA events; `+compile` = TrainConfig.compile, `+ckpt` = grad_checkpointing):
  expert[+compile][+ckpt]  `upcycle(anchor, row, top_k=2)`: shared layers, public FFN and r_pub frozen (bf16),
                           owner FFN + r_i + bias trainable (fp32 master, fused AdamW)
  expert+compile+cudnn     the same with SDPA limited to cuDNN attention (flash, mem-efficient and math off)
  full[+compile]           the same 2-expert model with every parameter trainable (fp32, autocast)
  dense[+compile]          the anchor as a dense Olmo2ForCausalLM, every parameter trainable (train-anchor's cost)
  hf:<kind>                benchmarks/hf_baseline_train.py (verbatim copy of the shared baseline: plain transformers,
                           fp32 params + autocast + fused AdamW), kinds full-eager, mlp-only, dense; same B and S
  hf:full-eager@B4x2048    the baseline at FLEXOLMO.md §7's own setting (20.9k tok/s, 70.9 GiB there): same card?

Timing: warm-up steps (compilation included) are not timed; then `--steps` steps between two CUDA events, no host
sync inside the window except what the loop itself does. Peak memory = torch.cuda.max_memory_allocated over the timed
steps (as the baseline script measures it). The expert rows are then profiled for 2 more steps (torch.profiler): GPU
time by kernel class (matmul, attention, compiled/triton, eager elementwise, optimizer, copies) and the GPU-busy share,
written to $OUT/train_profile.txt.

FLOPs counted (per token, executed; `flops_per_token`): matmuls only, 2 flops per multiply-add.
  forward:  attention projections 2*(2H^2 + 2H*Hkv); attention core QK^T and PV over the causal half, 2*S*H in all
            (S/2 keys on average, 2 matmuls); router 2*E*H; each FFN slot that runs 6*I*H (both slots run on every
            token: top-2 of 2, and top-1 masks rather than skips); LM head 2*V*H.
  backward: activation gradients wherever autograd needs them, weight gradients only for trainable tensors, so:
            LM head dX 2VH (+ dW 2VH if trained); per layer, a FFN slot costs dX-into-its-product 2IH when it trains or
            its input needs a gradient, dX-into-its-input 4IH when the input needs one, dW 6IH when it trains;
            attention core backward 4*S*H (dQ, dK, dV, dP; flash attention's recompute of QK^T is not counted) and
            the o_proj dX when anything at or below the layer's attention needs a gradient; q/k/v dX 6H^2 when the
            layer input needs one; dW of the projections when they train. A layer's input needs a gradient when
            anything below it trains: for expert and mlp-only rows not layer 0 (embedding frozen), so layer 0 runs
            no attention backward at all. Embedding backward is a scatter (no matmul flops).
  At S=4096: expert 10.52 GFLOP/token, full 13.31, dense 8.48, mlp-only 12.16 (benchmarks/NOTES.md).
MFU = flops_per_token * tokens/s / 989e12 (H100 SXM dense bf16 datasheet peak; the measured 8192^3 matmul peak on
these machines is ~790 TFLOP/s, so 40% MFU is ~50% of what a large GEMM reaches).

--shape 7b (issue 18): hidden 4096, 32 layers, FFN 11008, vocab 100352, 32 heads (OLMo-2 7B, the FlexOlmo release's
anchor; benchmarks/shapes.py). B 1 x S 4096 with grad_accum 2, so a step is 8192 tokens as at the 1B shape (two
sequences of 4096 would need ~146 GB eagerly: the 2x7B expert's 84.7 GB of weights, gradients and AdamW state plus
62 GB of activations). The
flexmoe rows build the model as `flexmoe train-expert` does: on the meta device, then allocated on the GPU and filled
there from the anchor file one tensor at a time (`expert_skeleton` + `fill_expert_`), frozen matmul weights in bf16.
The hf rows run `_run_hf_row`, the vendored baseline's recipe (fp32 parameters, bf16 autocast, fused AdamW, stock
`labels=` loss, same experts implementation) with three differences, all needed at this size: the model is built
directly on the GPU (no 46 GB CPU init), it takes `grad_accum` like the flexmoe rows, and it can run fewer layers
or with gradient checkpointing. Rows:
  expert+compile, expert  as at 1b;
  hf:full-eager           the 2x7B full fine-tune: 16 bytes x 11.6B = 186 GB of weights, gradients and AdamW state
                          alone, so it is not run: reported as "oom (predicted N GB > M GB)" (`predict_hf_peak`);
                          --try-oom runs it anyway and reports the torch.OutOfMemoryError it meets;
  hf:mlp-only             the naive freeze: 150 GB of weights, gradients and state, 235 GB predicted: likewise;
  hf:full-eager@fit       the largest baseline that fits: the same 2-expert model and recipe with the most layers
                          (a multiple of 2) whose predicted peak is within 93% of the GPU's memory, e.g. @14L;
                          retried with 2 layers fewer on OOM. Its tok/s is also given scaled to 32 layers at its
                          measured MFU (tok/s x its FLOPs/token / the 32-layer FLOPs/token): `x hf` uses that;
  hf:dense+ckpt           the dense 7B (the anchor alone: train-anchor's cost), all 32 layers, full fine-tune with
                          gradient checkpointing (non-reentrant; recompute FLOPs not counted in its MFU).
Predicted peaks (`predict_hf_peak`): fp32 params 4P + AdamW 8P_t (+ gradients 4P_t when they outlive a micro-step)
+ the bf16 copies autocast keeps for backward 2P_matmul + saved activations (65.3 H + 15.7 I bytes a token and layer
for the 2-expert eager model, 50.4 H + 7.94 I dense: saved-tensor bytes measured on CPU under bf16 autocast, two
shapes) + 11 V bytes a token of logits, softmax and logit gradients; the 1b hf:full-eager row this gives is 69.9 GiB
against the 70.9 GiB measured on an H100, hf:mlp-only 64.9 against 72.9 (a lower bound: its grouped_mm experts keep
more; tests/benchmarks/test_train_bench.py). At 7b: 2x7B full fine-tune 271 GB, dense 7B with checkpointing 126 GB.

Writes $OUT/train_bench.json (OUT defaults to runs/bench), $OUT/train_profile.txt, $OUT/train_bench_errors.txt (only
when a row failed) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import shapes as shape_table  # noqa: E402

HF_SCRIPT = Path(__file__).resolve().parent / "hf_baseline_train.py"
PEAK_FLOPS = 989e12  # H100 SXM dense bf16, datasheet (the H200's is the same)

FULL_SHAPE = shape_table.get("1b")
TINY_SHAPE = shape_table.get("tiny")  # = hf TINY
SHAPE_7B = shape_table.get("7b")
FULL_RUN = dict(batch=2, seq=4096, grad_accum=1, warmup=3, steps=8, profile_steps=2)
TINY_RUN = dict(batch=2, seq=64, grad_accum=1, warmup=1, steps=2, profile_steps=1)
RUN_7B = dict(batch=1, seq=4096, grad_accum=2, warmup=2, steps=6, profile_steps=1)
TINY_RUN_7B = {**TINY_RUN, "grad_accum": 2}

ROWS = {
    "expert": dict(kind="expert"),
    "expert+compile": dict(kind="expert", compile=True),
    "expert+compile+ckpt": dict(kind="expert", compile=True, ckpt=True),
    "expert+compile+cudnn": dict(kind="expert", compile=True, sdpa="cudnn"),
    "full": dict(kind="full"),
    "full+compile": dict(kind="full", compile=True),
    "dense": dict(kind="dense"),
    "dense+compile": dict(kind="dense", compile=True),
    "hf:full-eager": dict(kind="hf", hf="full-eager"),
    "hf:mlp-only": dict(kind="hf", hf="mlp-only"),
    "hf:dense": dict(kind="hf", hf="dense"),
    # The baseline at FLEXOLMO.md §7's own setting (B4 x 2048: 20.9k tok/s, 70.9 GiB there): is this card that one?
    "hf:full-eager@B4x2048": dict(kind="hf", hf="full-eager", batch=4, seq=2048),
    # The largest 2-expert baseline that fits the GPU (fewer layers; `fit_layers`), and the dense model with
    # gradient checkpointing: both through `_run_hf_row`, for shapes whose full fine-tune does not fit (7b).
    "hf:full-eager@fit": dict(kind="hf", hf="full-eager", layers="fit"),
    "hf:dense+ckpt": dict(kind="hf", hf="dense", ckpt=True),
}
# Most informative first (the budget cuts from the end); the rows that need no compiler come before those that do.
DEFAULT_ROWS = ["expert", "hf:full-eager", "expert+compile", "hf:mlp-only", "full", "dense", "full+compile",
                "dense+compile", "expert+compile+ckpt", "hf:full-eager@B4x2048", "hf:dense", "expert+compile+cudnn"]
QUICK_ROWS = ["expert", "hf:full-eager", "expert+compile"]
# 7b: train-expert's default (compiled) first, then the baselines that say why plain transformers cannot do it.
DEFAULT_ROWS_7B = ["expert+compile", "hf:full-eager", "hf:mlp-only", "hf:full-eager@fit", "expert", "hf:dense+ckpt"]
QUICK_ROWS_7B = ["expert+compile", "hf:full-eager", "hf:full-eager@fit"]
# Rough wall seconds of a row at full size on an H100 / H200 (start-up, anchor load, compile, steps): for the budget.
COST_S = {"compile": 75, "eager": 30, "hf:mlp-only": 45, "hf": 30}
COST_S_7B = {"compile": 70, "eager": 40, "hf": 40}
# What each row trains, for the FLOP count.
MODES = {"expert": "expert", "full": "full", "dense": "dense", "hf:full-eager": "full",
         "hf:full-eager@B4x2048": "full", "hf:mlp-only": "mlp-only", "hf:dense": "dense",
         "hf:full-eager@fit": "full", "hf:dense+ckpt": "dense"}
PROFILED = ("expert", "expert+compile")
FIT_FRACTION = 0.93  # a row fits when its predicted peak is within this share of the GPU's memory


def mode_of(name: str) -> str:
    return MODES[name if ROWS[name]["kind"] == "hf" else ROWS[name]["kind"]]


def flops_per_token(shape: dict, seq: int, mode: str) -> dict[str, float]:
    """Executed matmul FLOPs per token of one training step (forward + backward), by part; see the docstring.

    mode: expert (owner FFN slot + router row trained), mlp-only (both FFN slots + router trained), full (all
    trained, 2 slots), dense (all trained, 1 FFN, no router).
    """
    H, I, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    kv = H  # no grouped-query attention at this shape
    dense = mode == "dense"
    all_train = mode in ("full", "dense")
    slots = [True] if dense else [mode != "expert", True]  # trainable flag of each FFN slot: [public, owner]
    qkv, o = 2 * (H * H + 2 * H * kv), 2 * H * H  # forward flops of the projections
    core = 2 * seq * H  # QK^T and PV over the causal half (seq / 2 keys on average)
    ffn = 6 * I * H  # one slot: gate_up 4IH + down 2IH
    router = 0 if dense else 2 * 2 * H
    out = dict(attn_proj=0.0, attn_core=0.0, ffn=0.0, router=0.0, head=0.0)
    for layer in range(L):
        x_grad = all_train or layer > 0  # something below this layer's input trains
        attn_bwd = x_grad or all_train
        out["attn_proj"] += qkv + o + (qkv if x_grad else 0) + (o if attn_bwd else 0) + ((qkv + o) if all_train else 0)
        out["attn_core"] += core + (2 * core if attn_bwd else 0)
        h_grad = x_grad  # the FFN input h = x + norm(attn(x)) needs a gradient exactly when x does (or all train)
        for trains in slots:
            out["ffn"] += ffn
            out["ffn"] += (2 * I * H if (trains or h_grad) else 0) + (4 * I * H if h_grad else 0) + (ffn if trains else 0)
        if router:
            out["router"] += router + (router if h_grad else 0) + router  # the router row(s) always train
    out["head"] = 2 * V * H * (2 + (1 if all_train else 0))  # forward, dX, dW when trained
    out["total"] = sum(out.values())
    return out


def shape_and_run(tiny: bool, name: str = "1b") -> tuple[dict, dict]:
    """(model shape, run settings) of `--shape name`; `tiny`: the toy shape with that shape's run logic."""
    if name == "7b":
        return (dict(TINY_SHAPE), dict(TINY_RUN_7B)) if tiny else (dict(SHAPE_7B), dict(RUN_7B))
    return (dict(TINY_SHAPE), dict(TINY_RUN)) if tiny else (dict(FULL_SHAPE), dict(FULL_RUN))


# Saved-tensor bytes a token and decoder layer of stock transformers under bf16 autocast (fp32 params), from
# `torch.autograd.graph.saved_tensors_hooks` on CPU at (H, I) = (128, 256) and (256, 768), 1 and 2 layers, 256 and
# 512 tokens (slopes): coefficients of H and I. The 2-expert model is FlexOlmo top-2 of 2 with the eager experts.
SAVED_PER_TOKEN_LAYER = {"full": (65.3, 15.7), "dense": (50.4, 7.94)}
SAVED_PER_TOKEN_VOCAB = 11  # logits (bf16) + fp32 log-softmax kept + the fp32 logit gradient, bytes per token x V


def predict_hf_peak(shape: dict, mode: str, tokens: int, *, grad_accum: int = 1, ckpt: bool = False) -> dict:
    """Predicted peak bytes of a plain-transformers training step (`_run_hf_row` / the vendored baseline: fp32
    params, bf16 autocast, fused AdamW) of `tokens` tokens a micro-step, by part, and "total".

    mode: full (2 experts, all trained), mlp-only (2 experts, only their FFNs and router), dense (the anchor).
    The peak is at the start of the (last) backward: params, AdamW state, gradients if a previous micro-step left
    them, autocast's bf16 weight copies and every saved activation; or at the end of backward (all gradients), if
    larger. mlp-only (whose baseline runs the grouped_mm experts) takes the eager 2-expert model's activations: a
    lower bound (1b: 64.9 GiB predicted, 72.9 measured).
    """
    H, I, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    counts = shape_table.param_counts(shape, 1 if mode == "dense" else 2)
    P = counts["total"]
    Pt = P if mode in ("full", "dense") else counts["ffn"] + counts["router"]
    matmul = P - counts["embedding"] - counts["norms"]
    out = {"params": 4 * P, "adam": 8 * Pt, "grads_kept": 4 * Pt if grad_accum > 1 else 0}
    a_h, a_i = SAVED_PER_TOKEN_LAYER["dense" if mode == "dense" else "full"]
    per_layer = (a_h * H + a_i * I) * tokens
    logits = SAVED_PER_TOKEN_VOCAB * V * tokens
    if ckpt:  # kept: each layer's fp32 input; transient: one layer recomputed with its bf16 weight copies
        layer_matmul = (matmul - V * H) / L  # one layer's matmul weights (the LM head is the rest)
        out.update(bf16_copies=2 * (V * H + layer_matmul), activations=4 * H * tokens * L + per_layer, logits=logits)
    else:
        out.update(bf16_copies=2 * matmul, activations=per_layer * L, logits=logits)
    start_of_backward = sum(out.values())
    end_of_backward = 4 * P + 12 * Pt
    out["total"] = max(start_of_backward, end_of_backward)
    return out


def fit_layers(shape: dict, mode: str, tokens: int, grad_accum: int, limit: float) -> list[int]:
    """Layer counts to try for the largest baseline that fits `limit` bytes, best first: every multiple of
    max(1, L // 16) below the shape's L whose predicted peak is within FIT_FRACTION of the limit (then smaller ones,
    for an OOM retry)."""
    L = shape["num_layers"]
    step = max(1, L // 16)
    fits = [n for n in range(L, 0, -step)
            if predict_hf_peak({**shape, "num_layers": n}, mode, tokens, grad_accum=grad_accum)["total"]
            <= FIT_FRACTION * limit]
    return fits


# ---------------------------------------------------------------- child: one row in a fresh process


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if "adam" in n:
        return "optimizer"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "wgmma", "matmul", "splitk")):
        return "matmul"
    if "triton" in n:
        return "compiled (triton)"
    if any(k in n for k in ("memcpy", "memset", "copy_kernel", "cat_", "catarraybatched")):
        return "copy"
    if "nccl" in n:
        return "comm"
    return "eager elementwise/other"


def _profile_summary(prof, wall_s: float, steps: int) -> tuple[dict, str]:
    """GPU time per kernel class and the busy share of the profiled steps, plus a top-kernel table."""
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        # a record_function range (the optimizer's "Optimizer.step#AdamW.step") shows on the GPU as an annotation
        # spanning its kernels: counted, it would count them twice
        if t and str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False):
            kernels.append((e.key, t / 1e3, e.count))  # ms over the profiled steps
    if not kernels:  # a CPU run (the toy shape): operators' own CPU time instead
        kernels = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages() if e.self_cpu_time_total]
    by: dict[str, float] = {}
    for name, ms, _ in kernels:
        by[_classify(name)] = by.get(_classify(name), 0.0) + ms
    busy = sum(by.values())
    summary = {"gpu_ms_per_step": round(busy / steps, 2), "wall_ms_per_step": round(1e3 * wall_s / steps, 2),
               "gpu_busy": round(busy / (1e3 * wall_s), 3) if wall_s else None,
               "ms_per_step": {k: round(v / steps, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}
    lines = [f"{'ms/step':>9} {'calls':>6}  kernel"]
    for name, ms, count in sorted(kernels, key=lambda k: -k[1])[:25]:
        lines.append(f"{ms / steps:9.2f} {count // steps:6d}  [{_classify(name)}] {name[:110]}")
    return summary, "\n".join(lines)


def _run_flexmoe_row(row: dict) -> dict:
    import torch

    from flexmoe.config import Device, TrainConfig
    from flexmoe.data import PackedData
    from flexmoe.io.anchor import read_anchor
    from flexmoe.expert.upcycle import expert_skeleton, fill_expert_, load_dense
    from flexmoe.router.rows import random_row
    from flexmoe.train.loop import train

    cuda = torch.cuda.is_available()
    if row.get("sdpa") == "cudnn" and cuda:  # an error, not a silent fallback, if cuDNN cannot take the shape
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
    B, S, W, N = row["batch"], row["seq"], row["warmup"], row["steps"]
    A = row.get("grad_accum", 1)
    P = row["profile_steps"] if row.get("profile") else 0
    anchor = read_anchor(row["anchor"])
    torch.manual_seed(0)
    t_load = time.perf_counter()
    info: dict = {}
    if row["kind"] == "dense":
        model, init = load_dense(anchor), None
    else:
        # As `flexmoe train-expert` builds it: on the meta device, allocated where it trains and filled there from
        # the anchor one tensor at a time (so host memory never holds the model), frozen matmul weights in bf16
        # (what bf16 training holds them in anyway). The full row trains every tensor, all in fp32.
        full = row["kind"] == "full"
        model = expert_skeleton(anchor, top_k=2, frozen_dtype=None if full else torch.bfloat16)
        if full:
            for p in model.parameters():
                p.requires_grad_(True)
        owner_row = random_row(anchor.public_row, 0)

        def init(placed, put):
            t = time.perf_counter()
            fill_expert_(placed, anchor, owner_row, put)
            if cuda:
                torch.cuda.synchronize()
            info["fill_s"] = round(time.perf_counter() - t, 1)
    load_s = time.perf_counter() - t_load
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = PackedData(torch.randint(0, vocab - 2, ((W + N + P) * A * B * S + 1,), generator=g, dtype=torch.int32), S)
    cfg = TrainConfig(max_steps=W + N + P, batch_size=B, grad_accum=A, seq_len=S, lr=1e-4, warmup_steps=1,
                      bf16=True, compile=bool(row.get("compile")), grad_checkpointing=bool(row.get("ckpt")),
                      log_every=W + N + P, device=Device.CUDA if cuda else Device.CPU)
    marks: dict[int, object] = {}
    prof_box: dict = {}
    t0 = time.perf_counter()

    def on_step(step: int) -> None:
        if step == 1:
            if cuda:
                torch.cuda.synchronize()
            info["first_step_s"] = round(time.perf_counter() - t0, 2)  # compilation included
        if W <= step <= W + N:
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks[step] = ev
            else:
                marks[step] = time.perf_counter()
            if step == W and cuda:
                torch.cuda.reset_peak_memory_stats()  # allocator stats are host-side: no sync needed
            if step == W + N and cuda:
                info["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                info["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if P and step == W + N:
            from torch.profiler import ProfilerActivity, profile

            if cuda:
                torch.cuda.synchronize()
            prof_box["prof"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            prof_box["prof"].__enter__()
            prof_box["t"] = time.perf_counter()
        if P and step == W + N + P:
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - prof_box["t"]
            prof_box["prof"].__exit__(None, None, None)
            prof_box["summary"], prof_box["table"] = _profile_summary(prof_box["prof"], wall, P)

    result, model = train(model, data, cfg, on_step=on_step, progress=False, init=init)
    if cuda:
        torch.cuda.synchronize()
        times = [marks[s].elapsed_time(marks[s + 1]) / 1e3 for s in range(W, W + N)]  # type: ignore[attr-defined]
    else:
        times = [marks[s + 1] - marks[s] for s in range(W, W + N)]  # type: ignore[operator]
    times.sort()
    total = sum(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = dict(tok_s=round(A * B * S * N / total), step_ms=round(1e3 * total / N, 1),
               step_ms_median=round(1e3 * times[len(times) // 2], 1), step_ms_spread=round(1e3 * (times[-1] - times[0]), 1),
               load_s=round(load_s, 1), loss=result.final_loss, params_b=_sig(sum(p.numel() for p in model.parameters()) / 1e9),
               trainable_b=_sig(trainable / 1e9), **info)
    if "summary" in prof_box:
        out["profile"] = prof_box["summary"]
        out["profile_table"] = prof_box["table"]
    return out


def _run_hf_row(row: dict) -> dict:
    """The vendored baseline's recipe (hf_baseline_train.py: plain transformers, fp32 params, bf16 autocast, fused
    AdamW, `labels=` loss, the same build per kind) for shapes it cannot run: the model is built directly on the
    device, `row["layers"]` decoder layers, `grad_accum` micro-steps a step, optional gradient checkpointing."""
    import torch
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    shape, kind = row["shape"], row["hf"]
    tiny = shape["vocab_size"] < 50000
    config = shape_table.hf_config_kwargs({**shape, "num_layers": row["layers"]},
                                          max_position_embeddings=max(4096, row["seq"]),
                                          pad_token_id=0 if tiny else 100277, eos_token_id=1 if tiny else 100257,
                                          tie_word_embeddings=False)
    B, S, A, W, N = row["batch"], row["seq"], row["grad_accum"], row["warmup"], row["steps"]
    torch.manual_seed(0)
    t_load = time.perf_counter()
    with torch.device(dev):
        if kind == "dense":
            m = Olmo2ForCausalLM(Olmo2Config(**config, attn_implementation="sdpa"))
        else:
            m = FlexOlmoForCausalLM(FlexOlmoConfig(**config, num_experts=2, num_experts_per_tok=2,
                                                   attn_implementation="sdpa"))
            impl = {"full-eager": "eager", "full-batched": "batched_mm", "full-grouped": "grouped_mm",
                    "mlp-only": "grouped_mm"}[kind]
            m.set_experts_implementation(impl)
            if kind == "mlp-only":
                for n, p in m.named_parameters():
                    p.requires_grad = ".mlp." in n
    m.train()
    if row.get("ckpt"):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    x = torch.randint(0, shape["vocab_size"] - 2, (B, S), device=dev)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t_load

    def step():
        for _ in range(A):
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = m(input_ids=x, labels=x).loss
            (loss / A).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(W):
        step()
        if i == 0:
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(N):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / N
    trainable = sum(p.numel() for p in params)
    return dict(tok_s=round(B * S * A / dt), step_ms=round(1e3 * dt, 1), load_s=round(load_s, 1),
                first_step_s=round(first, 2) if W else None, loss=float(loss.detach()),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                params_b=_sig(sum(p.numel() for p in m.parameters()) / 1e9), trainable_b=_sig(trainable / 1e9),
                layers=row["layers"])


def child(row: dict) -> None:
    """Run one row, print one JSON line; an out-of-memory error is reported as {"error": "oom"}."""
    import torch

    try:
        out = _run_hf_row(row) if row.get("kind") == "hf" else _run_flexmoe_row(row)
    except torch.OutOfMemoryError:
        out = {"error": "oom"}
    except Exception as e:  # reported by the parent; the traceback goes to stderr
        traceback.print_exc()
        first = str(e).splitlines()[0][:200] if str(e) else ""
        out = {"error": "oom" if "out of memory" in str(e).lower() else f"{type(e).__name__}: {first}"}
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent: rows in subprocesses, table, JSON


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _run_subprocess(cmd: list[str], env: dict, timeout: float) -> tuple[dict, str]:
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr or b""  # bytes, whatever `text` says
        tail = (err.decode(errors="replace") if isinstance(err, bytes) else err)[-3000:]
        return {"error": f"timeout after {timeout:.0f} s"}, tail
    found = _last_json(proc.stdout)
    if found is None:
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        found = {"error": "oom" if oom else f"exit {proc.returncode}, no result"}
    return found, proc.stderr[-4000:]


def row_cost_s(name: str, shape_name: str = "1b") -> float:
    costs = COST_S_7B if shape_name == "7b" else COST_S
    if "compile" in name:
        return costs["compile"]
    if name.startswith("hf:"):
        return costs.get(name, costs["hf"])
    return costs["eager"]


def inline_hf(name: str, shape_name: str) -> bool:
    """Whether an hf row runs `_run_hf_row` (7b, or options the vendored baseline lacks) or the vendored script."""
    spec = ROWS[name]
    return spec["kind"] == "hf" and (shape_name == "7b" or "layers" in spec or bool(spec.get("ckpt")))


def run_row(name: str, batch: int, seq: int, args, run: dict, anchor: Path, env: dict, timeout: float, *,
            shape: dict | None = None, shape_name: str = "1b", layers: int | None = None) -> tuple[dict, str]:
    spec = ROWS[name]
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    if inline_hf(name, shape_name):
        row = {"kind": "hf", "hf": spec["hf"], "ckpt": bool(spec.get("ckpt")), "shape": shape,
               "layers": layers or shape["num_layers"], "batch": batch, "seq": seq,
               **{k: run[k] for k in ("grad_accum", "warmup", "steps")}}
        return _run_subprocess(me + [json.dumps(row)], env, timeout)
    if spec["kind"] == "hf":
        env = {**env, "B": str(batch), "S": str(seq)}
        res, tail = _run_subprocess([sys.executable, str(HF_SCRIPT), spec["hf"]], env, timeout)
        if "tok_s" in res:  # the baseline's own fields, renamed to this table's
            res["step_ms"] = round(1e3 * res.pop("step_s"), 1)
            res["hf_mfu_6n"] = res.pop("mfu_full_flops")  # its 6N + attention count, for reference
            for key in ("kind", "B", "S", "torch", "gpu"):
                res.pop(key, None)
        return res, tail
    row = {**spec, **run, "batch": batch, "seq": seq, "anchor": str(anchor),
           "profile": name in PROFILED and not args.no_profile}
    return _run_subprocess(me + [json.dumps(row)], env, timeout)


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def table(rows: list[dict], ref: dict | None) -> str:
    head = (f"{'row':<22} {'B x S':>8} {'tok/s':>8} {'step ms':>8} {'peak GiB':>9} {'MFU':>6} {'GF/tok':>7} "
            f"{'x hf tok/s':>10} {'x hf mem':>8} {'train B':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = "tok_s" in r
        speed = r["tok_s"] / ref["tok_s"] if ok and ref else None
        if ok and ref and r["row"] == ref["row"]:
            speed = 1.0  # the reference itself (at 7b its tok/s scaled to the full depth)
        mem = r["peak_gib"] / ref["peak_gib"] if ok and ref and r.get("peak_gib") and ref.get("peak_gib") else None
        note = r.get("error", "")
        if ok and r.get("first_step_s") is not None:
            note = f"first step {r['first_step_s']} s"
        if ok and r.get("predicted_gib") is not None:
            note += f"; predicted {r['predicted_gib']} GiB"
        if ok and r.get("tok_s_scaled_32l"):
            note += f"; {r['tok_s_scaled_32l']:,} tok/s scaled to {r['scaled_layers']} layers"
        accum = f"x{r['grad_accum']}" if r.get("grad_accum", 1) > 1 else ""
        lines.append(f"{r['row']:<22} {str(r['batch']) + 'x' + str(r['seq']) + accum:>8} "
                     f"{_fmt(r.get('tok_s'), ',d'):>8} "
                     f"{_fmt(r.get('step_ms')):>8} {_fmt(r.get('peak_gib')):>9} "
                     f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f'):>6} {r['gflop_per_token']:>7.2f} "
                     f"{_fmt(speed, '.2f'):>10} {_fmt(mem, '.2f'):>8} {_fmt(r.get('trainable_b')):>8}  {note}")
    return "\n".join(lines)


def goals(rows: list[dict], ref: dict | None) -> dict:
    """Issue 7's goals for the best expert row: >= 1.8x hf full-eager tok/s at <= 0.5x its peak memory, MFU >= 40%."""
    experts = [r for r in rows if r["row"].startswith("expert") and "tok_s" in r]
    if not experts or not ref:
        return {}
    best = max(experts, key=lambda r: r["tok_s"])
    speed = best["tok_s"] / ref["tok_s"]
    mem = best["peak_gib"] / ref["peak_gib"] if best.get("peak_gib") and ref.get("peak_gib") else None
    return {"row": best["row"], "speedup_vs_hf_full": round(speed, 2), "memory_vs_hf_full": mem and round(mem, 3),
            "mfu": best.get("mfu"), "speed_goal_1.8x": speed >= 1.8, "memory_goal_0.5x": mem is not None and mem <= 0.5,
            "mfu_goal_40pct": (best.get("mfu") or 0) >= 0.40}


def goals_7b(rows: list[dict], ref: dict | None, limit: float | None) -> dict:
    """Issue 18's goals at 7b for the best expert row: it runs on one GPU, MFU >= 50%; beside it, what the 2x7B
    full fine-tune would need and the speed against the largest baseline that fits, scaled to 32 layers."""
    experts = [r for r in rows if r["row"].startswith("expert") and "tok_s" in r]
    if not experts:
        return {}
    best = max(experts, key=lambda r: r["tok_s"])
    full = next((r for r in rows if r["row"] == "hf:full-eager"), {})
    out = {"row": best["row"], "mfu": best.get("mfu"), "mfu_goal_50pct": (best.get("mfu") or 0) >= 0.50,
           "peak_gib": best.get("peak_gib"), "runs_on_one_gpu": True,
           "hf_full_finetune": full.get("error") or (f"{full['tok_s']} tok/s" if "tok_s" in full else None),
           "hf_full_finetune_predicted_gib": full.get("predicted_gib"),
           "gpu_gib": limit and round(limit / 2**30, 1)}
    if ref:
        out.update(baseline=ref["row"], speedup_vs_baseline_scaled=round(best["tok_s"] / ref["tok_s"], 2),
                   mfu_vs_baseline=ref.get("mfu"))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=("1b", "7b"), help="model shape (benchmarks/shapes.py)")
    ap.add_argument("--quick", action="store_true", help=f"rows {', '.join(QUICK_ROWS)} (7b: {', '.join(QUICK_ROWS_7B)})")
    ap.add_argument("--rows", default=None, help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--tiny", action="store_true", help="toy shape on CPU in seconds (same as TINY=1)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per micro-step (default 2, 7b: 1; halved on OOM)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 1, 7b: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8, 7b: 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 7b: 2)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no row that would end after this")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled steps of the expert rows")
    ap.add_argument("--mem-gib", type=float, default=None,
                    help="device memory for the OOM predictions (default: the GPU's; none on CPU)")
    ap.add_argument("--try-oom", action="store_true", help="run hf rows predicted not to fit, to meet the OOM")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic anchor goes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic anchor")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return {}
    t_start = time.perf_counter()
    tiny = args.tiny or bool(os.environ.get("TINY"))
    seven = args.shape == "7b"
    shape, run = shape_and_run(tiny, args.shape)
    for key in ("batch", "seq", "grad_accum", "steps", "warmup"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    quick, default = (QUICK_ROWS_7B, DEFAULT_ROWS_7B) if seven else (QUICK_ROWS, DEFAULT_ROWS)
    names = args.rows.split(",") if args.rows else quick if args.quick else default
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    out_dir = Path(os.environ.get("OUT", "runs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    errors_path = out_dir / "train_bench_errors.txt"
    errors_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if tiny:
        env["TINY"] = "1"
    import torch

    from flexmoe.testing import build_synthetic_anchor

    cuda = torch.cuda.is_available()
    device = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda}
    try:
        import transformers

        device["transformers"] = transformers.__version__
        import accelerate

        device["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    # total_memory needs no CUDA context here (one would hold ~0.5 GB of the GPU while the rows run)
    limit = (args.mem_gib * 2**30 if args.mem_gib
             else torch.cuda.get_device_properties(0).total_memory if cuda else None)
    work = Path(tempfile.mkdtemp(prefix="flexmoe-train-bench-", dir=args.workdir))
    anchor = work / "anchor"
    if any(ROWS[n]["kind"] != "hf" for n in names):
        print(f"[{time.perf_counter() - t_start:6.1f}s] building a random bf16 anchor {shape} in {anchor}", flush=True)
        from flexmoe.io import manifest
        from flexmoe.io.anchor import ANCHOR_META

        build_synthetic_anchor(anchor, dtype=torch.bfloat16, **shape)
        config = json.loads((anchor / "config.json").read_text())
        config["max_position_embeddings"] = max(run["seq"], config.get("max_position_embeddings", 0))
        (anchor / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        manifest.seal(anchor, ANCHOR_META)  # the folder changed after it was sealed: record it again
        print(f"[{time.perf_counter() - t_start:6.1f}s] anchor built", flush=True)
    rows: list[dict] = []
    profiles: list[str] = []
    try:
        for name in names:
            spent = time.perf_counter() - t_start
            spec = ROWS[name]
            batch, seq = spec.get("batch", run["batch"]), spec.get("seq", run["seq"])
            if tiny:  # the toy shape keeps its own sizes
                batch, seq = run["batch"], run["seq"]
            label, layers, candidates, predicted = name, shape["num_layers"], [], None
            if inline_hf(name, args.shape):
                mode, tokens = mode_of(name), batch * seq
                if spec.get("layers") == "fit":
                    candidates = fit_layers(shape, mode, tokens, run["grad_accum"], limit) if limit else [layers]
                    layers = candidates.pop(0) if candidates else 1
                    label = f"{name.split('@')[0]}@{layers}L"
                predicted = predict_hf_peak({**shape, "num_layers": layers}, mode, tokens,
                                            grad_accum=run["grad_accum"], ckpt=bool(spec.get("ckpt")))["total"]
            fl = flops_per_token({**shape, "num_layers": layers}, seq, mode_of(name))
            base = {"row": label, "batch": batch, "seq": seq, "grad_accum": run["grad_accum"],
                    "gflop_per_token": round(fl["total"] / 1e9, 3)}
            if predicted is not None:
                base["predicted_gib"] = _sig(predicted / 2**30)
            if predicted is not None and limit and predicted > limit and not args.try_oom:
                print(f"[{spent:6.1f}s] {label}: not run, predicted {predicted / 1e9:.3g} GB > {limit / 1e9:.3g} GB",
                      flush=True)
                rows.append({**base, "error": f"oom (predicted {predicted / 1e9:.3g} GB > {limit / 1e9:.3g} GB)"})
                continue
            if spent + (2 if tiny else row_cost_s(name, args.shape)) > args.budget_s:
                print(f"[{spent:6.1f}s] {label}: skipped (budget {args.budget_s:.0f} s)", flush=True)
                rows.append({**base, "error": "skipped (budget)"})
                continue
            while True:
                timeout = max(60.0, args.budget_s + 60 - (time.perf_counter() - t_start))
                print(f"[{time.perf_counter() - t_start:6.1f}s] {label}: batch {batch} x {seq} ...", flush=True)
                res, tail = run_row(name, batch, seq, args, run, anchor, env, timeout, shape=shape,
                                    shape_name=args.shape, layers=layers)
                if res.get("error") == "oom" and candidates:  # the largest baseline that fits: 2 layers fewer
                    print(f"[{time.perf_counter() - t_start:6.1f}s] {label}: oom, predicted "
                          f"{base['predicted_gib']} GiB", flush=True)
                    layers = candidates.pop(0)
                    label = f"{name.split('@')[0]}@{layers}L"
                    fl = flops_per_token({**shape, "num_layers": layers}, seq, mode_of(name))
                    predicted = predict_hf_peak({**shape, "num_layers": layers}, mode_of(name), batch * seq,
                                                grad_accum=run["grad_accum"], ckpt=bool(spec.get("ckpt")))["total"]
                    base.update(row=label, gflop_per_token=round(fl["total"] / 1e9, 3),
                                predicted_gib=_sig(predicted / 2**30))
                    continue
                if res.get("error") == "oom" and batch > 1 and not inline_hf(name, args.shape):
                    batch //= 2
                    base["batch"] = batch
                    continue
                break
            r = {**base, **res, "flops_per_token": {k: round(v / 1e9, 4) for k, v in fl.items()}}
            if "tok_s" in r:
                r["mfu"] = _sig(fl["total"] * r["tok_s"] / PEAK_FLOPS)
            if "tok_s" in r and layers != shape["num_layers"]:  # the same MFU at the shape's own depth
                full_fl = flops_per_token(shape, seq, mode_of(name))["total"]
                r["tok_s_scaled_32l"] = round(r["tok_s"] * fl["total"] / full_fl)
                r["scaled_layers"] = shape["num_layers"]
            if res.get("error") == "oom" and predicted is not None:
                r["error"] = f"oom (predicted {predicted / 1e9:.3g} GB)"
            if "profile_table" in r:
                profiles.append(f"==== {name} (B {batch} x {seq}): {json.dumps(r['profile'])}\n{r.pop('profile_table')}\n")
            if "error" in r:
                with open(errors_path, "a") as f:
                    f.write(f"==== {label} batch {batch}: {r['error']}\n{tail}\n")
            print(f"[{time.perf_counter() - t_start:6.1f}s] {label}: "
                  + (f"{r['tok_s']:,} tok/s, {r.get('peak_gib')} GiB, MFU {100 * r['mfu']:.1f}%" if "tok_s" in r else r["error"]),
                  flush=True)
            rows.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if seven:  # the largest baseline that fits, at its measured MFU scaled to the full depth
        fit = next((r for r in rows if r["row"].startswith("hf:full-eager@") and "tok_s" in r), None)
        ref = fit and {**fit, "tok_s": fit.get("tok_s_scaled_32l", fit["tok_s"]), "peak_gib": None}
        ref_note = (f"x hf = vs {fit['row']} of this run, its tok/s scaled to {shape['num_layers']} layers at its "
                    f"MFU" if fit else "no baseline row ran")
        goal = goals_7b(rows, ref, limit)
    else:
        ref = next((r for r in rows if r["row"] == "hf:full-eager" and "tok_s" in r), None)
        ref_note = "x hf = vs hf:full-eager of this run"
        goal = goals(rows, ref)
    report = {"device": device, "shape_name": args.shape, "shape": shape, "run": run, "peak_flops": PEAK_FLOPS,
              "device_bytes": limit, "rows": rows, "goals": goal, "wall_s": round(time.perf_counter() - t_start, 1)}
    (out_dir / "train_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if profiles:
        (out_dir / "train_profile.txt").write_text("\n".join(profiles))
    for p in profiles:
        print(p.splitlines()[0][:400])
    print(f"\ntrain_bench --shape {args.shape} on {device['gpu']} (torch {device['torch']}, transformers "
          f"{device.get('transformers')}); MFU vs {PEAK_FLOPS / 1e12:.0f} TFLOP/s; {ref_note}; wall {report['wall_s']} s")
    print(table(rows, ref))
    if report["goals"]:
        print("goals:", json.dumps(report["goals"]))
    return report


if __name__ == "__main__":
    main()
