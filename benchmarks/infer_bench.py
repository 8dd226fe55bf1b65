"""Inference benchmark: stock transformers vs flexmoe's fast path on merged FlexOlmo models (issue 8).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/infer_bench.py            # full set, ~4 min on one H100
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/infer_bench.py --quick    # E=4, k=2 only
    TINY=1 PYTHONPATH=. python benchmarks/infer_bench.py --quick                 # CPU smoke run
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/infer_bench.py --shape 7b # 7x7B and 8x7B top-4, ~3.5 min
    TINY=1 PYTHONPATH=. python benchmarks/infer_bench.py --shape 7b --no-stock   # its code path on CPU

Model: the 1B-class shared shape (16 layers, hidden 2048, FFN 8192, vocab 100352, 16 heads), bf16 random weights,
E experts, top-k without renormalisation; the same shape and measurements as ../shared/bench/hf_baseline_infer.py.
Rows (per E, k):
- `eager`, `grouped_mm`: stock `model(...)` / `model.generate(...)` with that experts implementation.
- `flexmoe`: flexmoe's registered experts kernel (Triton for decode batches, grouped GEMM for prefill) and
  `FastDecoder` (static cache, decode step captured in a CUDA graph per batch bucket).
- `flexmoe_grouped`: the same decoder with the CUTLASS grouped GEMM for decode too (kernel A/B).
- `flexmoe_sdpa`: `flexmoe` with SDPA (cuDNN's kernel on Hopper) for the decode steps' attention instead of the
  split-KV kernels (flexmoe.infer.triton_attention; attention A/B).
- `flexmoe_determ`: `flexmoe` under `flexmoe.infer.deterministic()` (what `generate --deterministic` runs: no cuDNN
  attention, fixed expert-kernel tiles), first combination only. Every flexmoe row records `same_tokens_b*`, the
  share of tokens its three timed calls agree on.
- `flexmoe+compile`: `flexmoe` with the decoder layers compiled by torch.compile before capture (E=4, k=2).
Columns: prefill tok/s (B32 x 512, no cache, last-token logits); decode tok/s at batch 1 and 32 (prompt 128, greedy;
`gen` = new tokens / whole generate call as the stock script times it, 64 new tokens for flexmoe and 32 for the
much slower stock rows; `step` = tokens / decode loop only); `%bw` = that rate over the memory-bandwidth bound;
peak GiB allocated. `flexmoe` decodes through the fused decode layer (flexmoe.infer.decode_layer, ten kernels a
layer) and replays small prefills from a CUDA graph; `flexmoe_unfused` is the same decoder through the stock layers
(the path before the fused layer). The compile row is capped at 90 s of compiling.

Bytes per decode step (the bound; each tensor read once, bf16 = 2 bytes):
  per layer: attention q,k,v,o 4*H*H + router E*H + norms 4*H + experts n_act*3*H*I, where n_act is the number of
  distinct experts the B tokens chose (measured with router hooks; = k at batch 1, about E at batch 32);
  plus KV-cache reads 2*B*H*ctx per layer (ctx = prompt + half the new tokens: the mean attended length);
  plus lm_head V*H, final norm, B embedding rows.  bound tok/s = B / (bytes / bandwidth), bandwidth from the
  datasheet (H100 SXM 3.35 TB/s; the measured device-to-device copy rate is printed beside it).
E=4, k=2, batch 1: 16*(33.6M + 201.3M) + 411M ~= 4.17 GB/step -> ~800 tok/s at 3.35 TB/s.

--shape 7b (issue 18): the FlexOlmo release's shape (OLMo-2 7B: 32 layers, hidden 4096, FFN 11008, vocab 100352,
32 heads; benchmarks/shapes.py), combos 7:7 (the released 7x7B: all 7 experts active, num_experts_per_tok 7) and
8:4 (top-4 of 8). The merged model is built in GPU memory directly with random bf16 weights (no checkpoint on disk).
Memory, checked before each build (`memory_plan`): 7x7B is 33.27B parameters = 66.5 GB, 8x7B 75.2 GB; the static
KV cache of batch 32 at the decode's cache length (prompt 128 + 64 new, rounded to 192) is 32 x 192 x 32 layers x
2 x 4096 x 2 B = 3.2 GB; prefill transients (B32 x 512 through 7 experts) ~9 GB: 78 GB (7x7B) and 84 GB (8x7B
top-4) in all, well inside 141 GB, so the context stays as at 1b.
Bound at 7b (H200 datasheet 4.8 TB/s): E7 k7 batch 1 reads 65.8 GB/step (attention 4.30 GB + 7 experts x 8.66 GB
+ LM head 0.82 GB + KV 0.08 GB) -> 72.9 tok/s; batch 32 68.4 GB (KV 2.68 GB) -> 2.25k tok/s. E8 k4 batch 1: 4
experts, 39.8 GB -> 120.5 tok/s; batch 32: all 8 experts hit, 77.1 GB -> 1.99k tok/s.

Writes $OUT/infer_bench.json (OUT defaults to runs/bench) and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flexmoe.infer import deterministic  # noqa: E402

SHAPE = dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
             pad_token_id=100277, eos_token_id=100257, tie_word_embeddings=False)
PB, PS, DS, NEW = 32, 512, 128, 64
STOCK_NEW = 32  # stock decode is slow (17 tok/s at batch 1): half the tokens, the same rate, less wall time
BATCHES = (1, 32)
TINY = bool(os.environ.get("TINY"))
if TINY:
    SHAPE.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, pad_token_id=0, eos_token_id=1)
    PB, PS, DS, NEW = 2, 16, 8, 4
    STOCK_NEW = 4
    BATCHES = (1, 2)
COMBOS = "4:2,8:2,4:4,8:4"
BUDGET_S = 230.0


def use_shape(name: str) -> None:
    """Switch the module's shape to `name` of benchmarks/shapes.py ("1b" is the default above); TINY keeps the toy
    sizes, with the shape's experts/top-k combinations."""
    global SHAPE, COMBOS, BUDGET_S
    if name == "1b":
        return
    from benchmarks import shapes

    COMBOS, BUDGET_S = {"7b": ("7:7,8:4", 210.0)}[name]
    if TINY:
        return
    shape = shapes.get(name)
    SHAPE = {**SHAPE, **shapes.hf_config_kwargs(shape)}


DEV = "cuda" if torch.cuda.is_available() else "cpu"
DATASHEET_BW = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
T0 = time.perf_counter()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def short(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


class Errors:
    def __init__(self, path: Path):
        self.path = path

    def add(self, where: str, e: BaseException) -> str:
        with open(self.path, "a") as f:
            f.write(f"==== {where}\n{traceback.format_exc()}\n")
        msg = short(e)
        log(f"{where}: {msg}")
        return msg


def datasheet_bw() -> float:
    if DEV != "cuda":
        return 0.05e12
    name = torch.cuda.get_device_name()
    for key in ("H100 PCIe", "H100", "H200", "A100"):
        if key in name:
            return DATASHEET_BW[key]
    return 3.35e12


def copy_bw() -> float:
    """Measured device-to-device copy rate, bytes read + written per second."""
    if DEV != "cuda":
        return 0.0
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    bw = 2 * a.numel() * 10 / (time.perf_counter() - t)
    del a, b
    return bw


def build(E: int, k: int):
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            m = FlexOlmoForCausalLM(FlexOlmoConfig(**SHAPE, num_experts=E, num_experts_per_tok=k,
                                                   norm_topk_prob=False, attn_implementation="sdpa")).eval()
    finally:
        torch.set_default_dtype(prev)
    return m


def memory_plan(E: int, k: int) -> dict:
    """Bytes of the bf16 merged model with E experts, its static KV cache at the largest decode batch, and a rough
    prefill transient (B x S tokens, each through k experts' gate/up output and product), against the device's
    memory."""
    H, I, V, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    kv_dim = H * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    params = L * (2 * H * H + 2 * H * kv_dim + E * 3 * H * I + E * H + 4 * H) + 2 * V * H + H
    cache_len = -(-(DS + NEW) // 64) * 64  # FastDecoder rounds the cache to 64 slots
    kv = L * 2 * max(BATCHES) * cache_len * kv_dim * 2
    prefill = PB * PS * (min(k, E) * 3 * I * 2 + 8 * H * 2)  # per token: k x (gate/up + product), hidden copies
    total = 2 * params + kv + prefill
    dev = torch.cuda.mem_get_info()[1] if DEV == "cuda" else None
    return {"params_b": round(params / 1e9, 3), "weights_gb": round(2 * params / 1e9, 2),
            "kv_gb": round(kv / 1e9, 2), "prefill_gb": round(prefill / 1e9, 2), "total_gb": round(total / 1e9, 2),
            "device_gb": dev and round(dev / 1e9, 1), "fits": dev is None or total < 0.95 * dev}


def active_experts(m, x: torch.Tensor, batch: int) -> float:
    """Mean number of distinct experts chosen per layer per decode step (router hooks, stock generate)."""
    counts = []

    def hook(_mod, _inp, out):
        idx = out[2]  # (T, k)
        if idx.shape[0] == batch:  # decode steps only, not the prompt
            counts.append(torch.unique(idx).numel())

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in m.model.layers]
    try:
        m.set_experts_implementation("grouped_mm" if DEV == "cuda" else "eager")
        with torch.inference_mode():
            m.generate(x[:batch, :DS], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=SHAPE["pad_token_id"])
    finally:
        for h in handles:
            h.remove()
    return sum(counts) / max(1, len(counts))


def step_bytes_parts(E: int, k: int, batch: int, n_active: float) -> dict[str, float]:
    """Bytes one decode step must read, by part (the docstring's formula)."""
    H, I, V, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    kv_dim = H * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    ctx = DS + NEW / 2
    return {"attention": L * (2 * H * H + 2 * H * kv_dim) * 2, "experts": L * n_active * 3 * H * I * 2,
            "router_norms": L * (E * H + 4 * H) * 2, "kv_cache": L * 2 * batch * kv_dim * ctx * 2,
            "lm_head_embed": (V * H + H + batch * H) * 2}


def step_bytes(E: int, k: int, batch: int, n_active: float) -> float:
    return sum(step_bytes_parts(E, k, batch, n_active).values())


def timed(fn, reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_reset():
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else None


def measure_prefill(m, xp, row, label, errors) -> None:
    """Prefill tok/s of a B32 x 512 forward (no cache, last-token logits) into row["prefill"]."""
    try:
        with torch.inference_mode():
            row["prefill"] = round(PB * PS / timed(lambda: m(input_ids=xp, use_cache=False, logits_to_keep=1), 2))
    except Exception as e:
        row["prefill"] = errors.add(f"{label} E{row['E']}k{row['k']} prefill", e)


def run_stock(m, impl, xp, x, row, budget, errors):
    m.set_experts_implementation(impl)
    peak_reset()
    measure_prefill(m, xp, row, impl, errors)
    for b in BATCHES:
        if budget.over():
            row[f"gen_b{b}"] = "skipped (budget)"
            continue
        try:
            gen = dict(do_sample=False, pad_token_id=SHAPE["pad_token_id"])
            with torch.inference_mode():
                m.generate(x[:b, :DS], max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
                sync()
                t = time.perf_counter()
                m.generate(x[:b, :DS], max_new_tokens=STOCK_NEW, min_new_tokens=STOCK_NEW, **gen)
                sync()
            row[f"gen_b{b}"] = round(b * STOCK_NEW / (time.perf_counter() - t), 1)
        except Exception as e:
            row[f"gen_b{b}"] = errors.add(f"{impl} E{row['E']}k{row['k']} decode b{b}", e)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    row["peak_gib"] = peak_gib()


@contextlib.contextmanager
def attention(impl: str):
    """The fused layer's decode attention for a row: SDPA (cuDNN's kernel on Hopper) for `flexmoe_sdpa`, else the
    default split-KV kernels."""
    from flexmoe.infer import decode_layer

    was = decode_layer.DECODE_ATTENTION
    decode_layer.DECODE_ATTENTION = "sdpa" if impl == "flexmoe_sdpa" else was
    try:
        yield
    finally:
        decode_layer.DECODE_ATTENTION = was


def run_flexmoe(m, experts, compile_, xp, x, row, budget, errors, prefill=True, fused=None):
    from flexmoe.infer import enable_fast_path
    from flexmoe.infer.decode import FastDecoder

    peak_reset()
    dec = enable_fast_path(m, experts=experts, compile=compile_, fused=fused)
    row["fused"] = dec.fused
    if prefill:
        measure_prefill(m, xp, row, row["impl"], errors)
    for b in BATCHES:
        if budget.over():
            row[f"gen_b{b}"] = "skipped (budget)"
            continue
        try:
            t = time.perf_counter()
            dec.generate(x[:b, :DS], max_new_tokens=NEW)  # capture (and compile) happen here
            row[f"setup_s_b{b}"] = round(time.perf_counter() - t, 1)
            walls, loops, seqs = [], [], []
            for _ in range(3):
                t = time.perf_counter()
                out = dec.generate(x[:b, :DS], max_new_tokens=NEW)
                sync()
                walls.append(time.perf_counter() - t)  # the whole call, host work included, as for stock
                loops.append(out.decode_s)
                seqs.append(out.sequences)
            total, loop = statistics.median(walls), statistics.median(loops)
            row[f"gen_b{b}"] = round(b * NEW / total, 1)
            row[f"step_b{b}"] = round(b * (NEW - 1) / loop, 1)
            # the share of tokens the three calls agree on (1.0: repeatable; SDPA's cuDNN kernel is not at batch 32)
            row[f"same_tokens_b{b}"] = round(min(float((s == seqs[0]).float().mean()) for s in seqs), 4)
        except Exception as e:
            row[f"gen_b{b}"] = errors.add(f"{row['impl']} E{row['E']}k{row['k']} decode b{b}", e)
            try:  # without graphs, to tell a capture problem from a kernel problem
                out = FastDecoder(m, cuda_graphs=False).generate(x[:b, :DS], max_new_tokens=8)
                row[f"nograph_b{b}"] = round(b * 8 / (out.prefill_s + out.decode_s), 1)
            except Exception as e2:
                row[f"nograph_b{b}"] = errors.add(f"{row['impl']} E{row['E']}k{row['k']} no-graph b{b}", e2)
    row["peak_gib"] = peak_gib()
    m.__dict__.pop("_flexmoe_decoder", None)
    del dec
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def profile_decode(m, x, batch: int, out_dir: Path, errors) -> dict:
    """Kernels of eager decode steps (no graph, so each kernel is visible): count and device time per step.

    Compared with the graph step time of the table this says whether a step is bound by its kernels' device
    time (then the top kernels say which) or by gaps between them. Full table: $OUT/profile_b{batch}.txt.
    """
    from torch.profiler import ProfilerActivity, profile

    from flexmoe.infer.decode import FastDecoder

    res = {}
    try:
        m.set_experts_implementation("flexmoe")
        dec = FastDecoder(m, cuda_graphs=False)
        steps = 8
        dec.generate(x[:batch, :DS], max_new_tokens=2)  # warm-up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dec.generate(x[:batch, :DS], max_new_tokens=1)
            sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof2:
            dec.generate(x[:batch, :DS], max_new_tokens=1 + steps)
            sync()
        def kernels(p):  # not the GPU-side spans of record_function ranges, which would count their kernels twice
            return [(e.name, _device_us(e)) for e in p.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]

        res = decode_kernels(kernels(prof2), kernels(prof), steps)
        sort = "self_device_time_total"
        try:
            table = prof2.key_averages().table(sort_by=sort, row_limit=25)
        except Exception:
            table = prof2.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        (out_dir / f"profile_b{batch}.txt").write_text(table)  # prompt and steps together, operators and kernels
    except Exception as e:
        res["error"] = errors.add(f"profile b{batch}", e)
    return res


def decode_kernels(kernels: list[tuple[str, float]], prefill: list[tuple[str, float]], steps: int,
                   top: int = 6) -> dict:
    """Per decode step, from (kernel name, device us) of a profile of prompt + `steps` steps and of one of the prompt
    alone: kernel count, kernel ms, and the `top` kernels by time, each as "name ms-a-step xcalls-a-step".

    The prompt's kernels are taken out by name, so a kernel that prefill and steps share (the expert kernels of a
    short prompt, the GEMMs) is counted for the steps only.
    """
    by_name: dict[str, list[float]] = {}
    for sign, events in ((1, kernels), (-1, prefill)):
        for name, us in events:
            entry = by_name.setdefault(name, [0.0, 0.0])
            entry[0] += sign
            entry[1] += sign * us
    per_step = sorted(((n, c / steps, us / steps) for n, (c, us) in by_name.items() if c > 0), key=lambda r: -r[2])
    return {"kernels_per_step": round((len(kernels) - len(prefill)) / steps, 1),
            "kernel_ms_per_step": round((sum(us for _, us in kernels) - sum(us for _, us in prefill)) / steps / 1e3, 3),
            "top": [f"{n[:40]} {us / 1e3:.3f}ms x{c:g}" for n, c, us in per_step[:top]]}


def _device_us(event) -> float:
    return getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)


def correctness(m, x, errors) -> dict:
    """bf16 checks on the big model: graph replay == eager step; flexmoe vs stock; Triton vs grouped kernel."""
    from flexmoe.infer import enable_fast_path
    from flexmoe.infer.decode import FastDecoder
    from flexmoe.infer.experts import _grouped, _grouped_mm_ok

    res = {}
    prompt = x[:2, :DS]
    try:
        dec = enable_fast_path(m)
        g = dec.generate(prompt, max_new_tokens=16, output_logits=True)
        e = FastDecoder(m, cuda_graphs=False).generate(prompt, max_new_tokens=16, output_logits=True)
        res["graph_equals_eager_tokens"] = bool(torch.equal(g.sequences, e.sequences))
        res["graph_vs_eager_max_logit_diff"] = float((g.logits - e.logits).abs().max())
        m.set_experts_implementation("grouped_mm")
        with torch.inference_mode():
            ref = m.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=SHAPE["pad_token_id"])
        ref_logits = torch.stack(ref.logits, 1).float()
        res["first_logits_rel_err_vs_stock"] = float((g.logits[:, 0] - ref_logits[:, 0]).norm()
                                                     / ref_logits[:, 0].norm())
        same = (g.sequences[:, DS:] == ref.sequences[:, DS:]).float()
        res["tokens_agree_with_stock_grouped_mm"] = float(same.mean())
        m.__dict__.pop("_flexmoe_decoder", None)
    except Exception as e:
        res["decode"] = errors.add("correctness decode", e)
    try:  # experts kernels on random routing, bf16
        ex = m.model.layers[0].mlp.experts
        if DEV == "cuda" and _grouped_mm_ok(ex.gate_up_proj):
            from flexmoe.infer.triton_moe import fused_experts

            for T in (1, 32, 100):
                h = torch.randn(T, SHAPE["hidden_size"], device=DEV, dtype=torch.bfloat16)
                w, idx = torch.randn(T, ex.num_experts, device=DEV).softmax(-1).topk(m.config.num_experts_per_tok, -1)
                with torch.inference_mode():
                    ref = _grouped(ex, h, idx, w.to(torch.bfloat16)).float()
                    out = fused_experts(h, ex.gate_up_proj, ex.down_proj, idx, w.to(torch.bfloat16)).float()
                res[f"triton_vs_grouped_rel_err_T{T}"] = float((out - ref).norm() / ref.norm())
    except Exception as e:
        res["kernels"] = errors.add("correctness kernels", e)
    return res


def stock_load_check(errors) -> dict:
    """A tiny merged checkpoint with a bias sidecar: stock AutoModelForCausalLM and flexmoe both load it."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM

    from flexmoe.infer import fast_generate
    from flexmoe.io.keys import router_bias_key
    from flexmoe.checkpoint.load import BIAS_FILE, load_model

    res = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            cfg = FlexOlmoConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                 norm_topk_prob=False, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
            FlexOlmoForCausalLM(cfg).save_pretrained(d)
            save_file({router_bias_key(L): -torch.rand(4) for L in range(2)}, str(Path(d) / BIAS_FILE))
            stock = AutoModelForCausalLM.from_pretrained(d)
            res["stock_loads"] = type(stock).__name__
            fm = load_model(d, device=DEV)
            res["flexmoe_router"] = type(fm.model.layers[0].mlp.gate).__name__
            ids = torch.randint(2, 256, (1, 10), device=DEV)
            fm.set_experts_implementation("eager")
            with torch.inference_mode():
                ref = fm.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            out = fast_generate(fm, ids, 16, eos_token_id=None, pad_token_id=0)
            res["biased_fp32_tokens_equal_stock_eager"] = bool(torch.equal(out[:, :ref.shape[1]], ref))
    except Exception as e:
        res["error"] = errors.add("stock load check", e)
    return res


class TimeLimit:
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; a no-op where signals are unavailable)."""

    def __init__(self, seconds: float):
        self.seconds = max(1, int(seconds))

    def __enter__(self):
        import signal

        self._old = signal.signal(signal.SIGALRM, self._fire) if hasattr(signal, "SIGALRM") else None
        if self._old is not None:
            signal.alarm(self.seconds)
        return self

    def _fire(self, *_):
        raise TimeoutError(f"gave up after {self.seconds} s")

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self._old)
        return False


class Budget:
    def __init__(self, seconds: float):
        self.deadline = T0 + seconds

    def over(self, reserve: float = 0.0) -> bool:
        return time.perf_counter() + reserve > self.deadline

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def table(rows, bw) -> str:
    head = f"{'impl':<16} {'E':>2} {'k':>2} {'prefill':>8} | " + " | ".join(
        f"{'gen b' + str(b):>9} {'%bw':>5} {'step b' + str(b):>9} {'%bw':>5}" for b in BATCHES) + f" | {'peak':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for b in BATCHES:
            gen, step, pct = r.get(f"gen_b{b}"), r.get(f"step_b{b}"), r.get(f"pct_bw_b{b}")
            pct_gen = r.get(f"pct_bw_gen_b{b}")
            gen_s = f"{gen:>9}" if isinstance(gen, (int, float)) else f"{str(gen)[:9]:>9}"
            cells.append(f"{gen_s} {pct_gen if pct_gen is not None else '-':>5} {step if step is not None else '-':>9} "
                         f"{pct if step is not None and pct is not None else '-':>5}")
        pre = r.get("prefill")
        pre_s = f"{pre:>8}" if isinstance(pre, (int, float)) else f"{str(pre if pre is not None else '-')[:8]:>8}"
        lines.append(f"{r['impl']:<16} {r['E']:>2} {r['k']:>2} {pre_s} | " + " | ".join(cells)
                     + f" | {r.get('peak_gib') or '-':>6}")
    errs = [f"{r['impl']} E{r['E']}k{r['k']} {key}: {v}" for r in rows for key, v in r.items()
            if isinstance(v, str) and v.startswith(("error", "oom"))]
    return "\n".join(lines + (["errors:"] + errs if errs else []))


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=("1b", "7b"), help="model shape (benchmarks/shapes.py)")
    ap.add_argument("--quick", action="store_true", help="the first combination only (1b: E=4, k=2)")
    ap.add_argument("--combos", default=None, help="E:k list, e.g. 4:2,8:2 (default: 4:2,8:2,4:4,8:4; 7b: 7:7,8:4)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this "
                                                                  "(default 230 s; 7b: 210 s)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock rows")
    args = ap.parse_args(argv)
    use_shape(args.shape)
    combos = [tuple(map(int, c.split(":"))) for c in (args.combos or COMBOS).split(",")]
    if args.quick:
        combos = combos[:1]
    if args.budget_s is None:
        args.budget_s = BUDGET_S
    out_dir = Path(os.environ.get("OUT", "runs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = Errors(out_dir / "infer_bench_errors.log")
    budget = Budget(args.budget_s)
    bw = datasheet_bw()
    info = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0], "datasheet_bw": bw}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["copy_bw"] = copy_bw()
    log(f"device {info['device']} torch {info['torch']} transformers {info['transformers']} triton {info['triton']}"
        f" datasheet {bw / 1e12:.2f} TB/s, measured copy {info['copy_bw'] / 1e12:.2f} TB/s")
    from flexmoe.infer.experts import register

    register()
    info["stock_load"] = stock_load_check(errors)
    log(f"stock-load check: {info['stock_load']}")
    rows = []
    V = SHAPE["vocab_size"] - 2
    torch.manual_seed(1)
    xp = torch.randint(0, V, (PB, PS), device=DEV)
    x = torch.randint(0, V, (max(BATCHES), DS), device=DEV)
    for E, k in combos:
        if budget.over(reserve=20):
            rows.append({"impl": "all", "E": E, "k": k, "prefill": "skipped (budget)"})
            continue
        plan = memory_plan(E, k)
        info.setdefault("memory_plan", {})[f"E{E}k{k}"] = plan
        log(f"E{E} k{k} memory plan: {plan}")
        if not plan["fits"]:
            rows.append({"impl": "build", "E": E, "k": k,
                         "prefill": f"error: needs {plan['total_gb']} GB of {plan['device_gb']} GB"})
            continue
        try:
            m = build(E, k)
        except Exception as e:
            rows.append({"impl": "build", "E": E, "k": k, "prefill": errors.add(f"build E{E}k{k}", e)})
            continue
        log(f"E{E} k{k}: {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params")
        for b in BATCHES:  # the bound of this shape, written out (the batch-32 rows use the measured active count)
            parts = step_bytes_parts(E, k, b, min(E, k) if b == 1 else E * (1 - (1 - k / E) ** b))
            log(f"E{E} k{k} b{b} bytes/step: " + ", ".join(f"{n} {v / 1e9:.2f} GB" for n, v in parts.items())
                + f" = {sum(parts.values()) / 1e9:.2f} GB -> {b * bw / sum(parts.values()):.1f} tok/s at "
                  f"{bw / 1e12:.2f} TB/s")
        n_act = {}
        for b in BATCHES:
            try:
                n_act[b] = active_experts(m, x, b)
            except Exception as e:
                errors.add(f"active experts E{E}k{k} b{b}", e)
                n_act[b] = E * (1 - (1 - k / E) ** b)
        variants = [] if args.no_stock else [("eager", "stock"), ("grouped_mm", "stock")]
        variants += [("check", "check"), ("flexmoe", "flexmoe"), ("flexmoe_sdpa", "flexmoe"),
                     ("flexmoe_unfused", "flexmoe"), ("flexmoe_grouped", "flexmoe")]
        if (E, k) == combos[0]:  # what `generate --deterministic` costs (no cuDNN attention, fixed expert tiles)
            variants.insert(variants.index(("flexmoe_sdpa", "flexmoe")) + 1, ("flexmoe_determ", "flexmoe"))
        for impl, kind in variants:
            if kind == "check":  # after the stock rows: enabling the fast path swaps the model's norms
                if (E, k) == combos[0]:
                    info["correctness"] = correctness(m, x, errors)
                    log(f"correctness: {info['correctness']}")
                continue
            row = {"impl": impl, "E": E, "k": k}
            rows.append(row)
            if budget.over():
                row["prefill"] = "skipped (budget)"
                continue
            try:
                if kind == "stock":
                    run_stock(m, impl, xp, x, row, budget, errors)
                else:
                    experts = "flexmoe" if impl in ("flexmoe_unfused", "flexmoe_determ", "flexmoe_sdpa") else impl
                    with deterministic(impl == "flexmoe_determ"), attention(impl):
                        run_flexmoe(m, experts, False, xp, x, row, budget, errors, prefill=impl == "flexmoe",
                                    fused=None if impl in ("flexmoe", "flexmoe_determ", "flexmoe_sdpa") else False)
            except Exception as e:
                row["prefill"] = errors.add(f"{impl} E{E}k{k}", e)
            finish(row, E, k, n_act, bw)
            log(json.dumps(row))
        if (E, k) == combos[0] and DEV == "cuda" and not budget.over():
            info["profile"] = {b: profile_decode(m, x, b, out_dir, errors) for b in BATCHES}
            log(f"profile: {info['profile']}")
        if (E, k) == (4, 2) and not args.no_compile:
            # The batch-1 goal's best shot, so right after the E=4 k=2 rows (and allowed a little overtime).
            # With whichever decode kernel won the batch-1 rows above (the Triton one unless it failed).
            rates = {r["impl"]: r.get("step_b1") for r in rows if r["E"] == 4 and r["k"] == 2}
            experts = max(("flexmoe_unfused", "flexmoe_grouped"),
                          key=lambda name: rates.get(name) if isinstance(rates.get(name), float) else -1.0)
            experts = "flexmoe" if experts == "flexmoe_unfused" else experts
            row = {"impl": "flexmoe+compile", "E": 4, "k": 2, "experts": experts}
            rows.append(row)
            if budget.over(reserve=-15):
                row["prefill"] = "skipped (budget)"
            else:
                try:
                    with TimeLimit(min(90, max(45, budget.left() - 60))):
                        run_flexmoe(m, experts, True, xp, x, row, Budget(args.budget_s + 30), errors, prefill=False,
                                    fused=False)
                except Exception as e:
                    row["gen_b1"] = errors.add("flexmoe+compile", e)
                finish(row, 4, 2, n_act, bw)
                log(json.dumps(row))
        del m
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    result = {"info": info, "rows": rows, "shape_name": args.shape, "shape": SHAPE, "prefill": [PB, PS],
              "decode": [DS, NEW],
              "wall_s": round(time.perf_counter() - T0, 1)}
    (out_dir / "infer_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"device {info['device']} | torch {info['torch']} | transformers {info['transformers']} | "
          f"triton {info['triton']} | bw datasheet {bw / 1e12:.2f} TB/s, copy {info['copy_bw'] / 1e12:.2f} TB/s")
    print(f"correctness: {info.get('correctness')}")
    print(f"stock load: {info['stock_load']}")
    for b, prof in (info.get("profile") or {}).items():
        print(f"profile b{b} (eager steps, E{combos[0][0]}k{combos[0][1]}): {prof}")
    for (E, k), b_rows in _bounds(rows).items():
        print(f"bound E{E}k{k}: " + ", ".join(f"b{b} {v}" for b, v in b_rows.items()))
    print(table(rows, bw))
    print(f"wall {result['wall_s']} s; json {out_dir / 'infer_bench.json'}")
    return 0


def finish(row, E, k, n_act, bw):
    for b in BATCHES:
        nbytes = step_bytes(E, k, b, n_act[b])
        bound = b / (nbytes / bw)
        row[f"bytes_step_b{b}"] = round(nbytes)
        row[f"active_experts_b{b}"] = round(n_act[b], 2)
        row[f"bound_tok_s_b{b}"] = round(bound, 1)
        rate = row.get(f"step_b{b}", row.get(f"gen_b{b}"))
        if isinstance(rate, (int, float)):
            row[f"pct_bw_b{b}"] = round(100 * rate / bound, 1)
        gen = row.get(f"gen_b{b}")
        if isinstance(gen, (int, float)):
            row[f"pct_bw_gen_b{b}"] = round(100 * gen / bound, 1)  # the whole generate call, prefill included


def _bounds(rows):
    out = {}
    for r in rows:
        key = (r["E"], r["k"])
        if f"bound_tok_s_b{BATCHES[0]}" in r and key not in out:
            out[key] = {b: f"{r[f'bound_tok_s_b{b}']} tok/s ({r[f'bytes_step_b{b}'] / 1e9:.2f} GB/step, "
                           f"{r[f'active_experts_b{b}']} experts)" for b in BATCHES}
    return out


if __name__ == "__main__":
    sys.exit(main())
