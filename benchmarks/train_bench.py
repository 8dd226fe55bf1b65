"""Training throughput and memory at the 1B-class shape: flexmoe train-expert vs full fine-tuning, dense training
and plain transformers, side by side in one run (issue 7).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py            # priority-ordered rows, ~4 min budget
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py --quick    # expert, hf:full-eager, expert+compile
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_bench.py --budget-s 540   # every row (~9 min)
    PYTHONPATH=. python3 benchmarks/train_bench.py --rows expert+compile --batch 1  # one row, one batch size
    TINY=1 PYTHONPATH=. python benchmarks/train_bench.py --quick                 # CPU smoke run (also: --tiny)

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
HF_SCRIPT = Path(__file__).resolve().parent / "hf_baseline_train.py"
PEAK_FLOPS = 989e12  # H100 SXM dense bf16, datasheet

FULL_SHAPE = dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16)
TINY_SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)  # = hf TINY
FULL_RUN = dict(batch=2, seq=4096, warmup=3, steps=8, profile_steps=2)
TINY_RUN = dict(batch=2, seq=64, warmup=1, steps=2, profile_steps=1)

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
}
# Most informative first (the budget cuts from the end); the rows that need no compiler come before those that do.
DEFAULT_ROWS = ["expert", "hf:full-eager", "expert+compile", "hf:mlp-only", "full", "dense", "full+compile",
                "dense+compile", "expert+compile+ckpt", "hf:full-eager@B4x2048", "hf:dense", "expert+compile+cudnn"]
QUICK_ROWS = ["expert", "hf:full-eager", "expert+compile"]
# Rough wall seconds of a row at full size on an H100 (start-up, anchor load, compile, steps): for the budget.
COST_S = {"compile": 75, "eager": 30, "hf:mlp-only": 45, "hf": 30}
# What each row trains, for the FLOP count.
MODES = {"expert": "expert", "full": "full", "dense": "dense", "hf:full-eager": "full",
         "hf:full-eager@B4x2048": "full", "hf:mlp-only": "mlp-only", "hf:dense": "dense"}
PROFILED = ("expert", "expert+compile")


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


def shape_and_run(tiny: bool) -> tuple[dict, dict]:
    return (dict(TINY_SHAPE), dict(TINY_RUN)) if tiny else (dict(FULL_SHAPE), dict(FULL_RUN))


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
        if t and str(getattr(e, "device_type", "")).endswith("CUDA"):
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
    from flexmoe.expert.upcycle import load_dense, upcycle
    from flexmoe.router.rows import random_row
    from flexmoe.train.loop import train

    cuda = torch.cuda.is_available()
    if row.get("sdpa") == "cudnn" and cuda:  # an error, not a silent fallback, if cuDNN cannot take the shape
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
    B, S, W, N = row["batch"], row["seq"], row["warmup"], row["steps"]
    P = row["profile_steps"] if row.get("profile") else 0
    anchor = read_anchor(row["anchor"])
    torch.manual_seed(0)
    t_load = time.perf_counter()
    if row["kind"] == "dense":
        model = load_dense(anchor)
    else:
        model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
        if row["kind"] == "full":
            for p in model.parameters():
                p.requires_grad_(True)
    load_s = time.perf_counter() - t_load
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = PackedData(torch.randint(0, vocab - 2, ((W + N + P) * B * S + 1,), generator=g, dtype=torch.int32), S)
    cfg = TrainConfig(max_steps=W + N + P, batch_size=B, seq_len=S, lr=1e-4, warmup_steps=1, bf16=True,
                      compile=bool(row.get("compile")), grad_checkpointing=bool(row.get("ckpt")),
                      log_every=W + N + P, device=Device.CUDA if cuda else Device.CPU)
    marks: dict[int, object] = {}
    info: dict = {}
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

    result, model = train(model, data, cfg, on_step=on_step, progress=False)
    if cuda:
        torch.cuda.synchronize()
        times = [marks[s].elapsed_time(marks[s + 1]) / 1e3 for s in range(W, W + N)]  # type: ignore[attr-defined]
    else:
        times = [marks[s + 1] - marks[s] for s in range(W, W + N)]  # type: ignore[operator]
    times.sort()
    total = sum(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = dict(tok_s=round(B * S * N / total), step_ms=round(1e3 * total / N, 1),
               step_ms_median=round(1e3 * times[len(times) // 2], 1), step_ms_spread=round(1e3 * (times[-1] - times[0]), 1),
               load_s=round(load_s, 1), loss=result.final_loss, params_b=_sig(sum(p.numel() for p in model.parameters()) / 1e9),
               trainable_b=_sig(trainable / 1e9), **info)
    if "summary" in prof_box:
        out["profile"] = prof_box["summary"]
        out["profile_table"] = prof_box["table"]
    return out


def child(row: dict) -> None:
    """Run one row, print one JSON line; an out-of-memory error is reported as {"error": "oom"}."""
    import torch

    try:
        out = _run_flexmoe_row(row)
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


def row_cost_s(name: str) -> float:
    if "compile" in name:
        return COST_S["compile"]
    if name.startswith("hf:"):
        return COST_S.get(name, COST_S["hf"])
    return COST_S["eager"]


def run_row(name: str, batch: int, seq: int, args, run: dict, anchor: Path, env: dict,
            timeout: float) -> tuple[dict, str]:
    spec = ROWS[name]
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
    return _run_subprocess([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(row)], env, timeout)


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
        mem = r["peak_gib"] / ref["peak_gib"] if ok and ref and r.get("peak_gib") and ref.get("peak_gib") else None
        note = r.get("error", "")
        if ok and r.get("first_step_s") is not None:
            note = f"first step {r['first_step_s']} s"
        lines.append(f"{r['row']:<22} {str(r['batch']) + 'x' + str(r['seq']):>8} {_fmt(r.get('tok_s'), ',d'):>8} "
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"rows {', '.join(QUICK_ROWS)}")
    ap.add_argument("--rows", default=None, help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--tiny", action="store_true", help="toy shape on CPU in seconds (same as TINY=1)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 2; halved on OOM)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no row that would end after this")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled steps of the expert rows")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic anchor goes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic anchor")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return {}
    t_start = time.perf_counter()
    tiny = args.tiny or bool(os.environ.get("TINY"))
    shape, run = shape_and_run(tiny)
    for key in ("batch", "seq", "steps", "warmup"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    names = args.rows.split(",") if args.rows else QUICK_ROWS if args.quick else DEFAULT_ROWS
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
    work = Path(tempfile.mkdtemp(prefix="flexmoe-train-bench-", dir=args.workdir))
    anchor = work / "anchor"
    print(f"[{time.perf_counter() - t_start:6.1f}s] building a random bf16 anchor {shape} in {anchor}", flush=True)
    build_synthetic_anchor(anchor, dtype=torch.bfloat16, **shape)
    config = json.loads((anchor / "config.json").read_text())
    config["max_position_embeddings"] = max(run["seq"], config.get("max_position_embeddings", 0))
    (anchor / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    rows: list[dict] = []
    profiles: list[str] = []
    try:
        for name in names:
            spent = time.perf_counter() - t_start
            batch, seq = ROWS[name].get("batch", run["batch"]), ROWS[name].get("seq", run["seq"])
            if tiny:  # the toy shape keeps its own sizes
                batch, seq = run["batch"], run["seq"]
            fl = flops_per_token(shape, seq, mode_of(name))
            if spent + (2 if tiny else row_cost_s(name)) > args.budget_s:
                print(f"[{spent:6.1f}s] {name}: skipped (budget {args.budget_s:.0f} s)", flush=True)
                rows.append({"row": name, "batch": batch, "seq": seq, "error": "skipped (budget)",
                             "gflop_per_token": round(fl["total"] / 1e9, 3)})
                continue
            while True:
                timeout = max(60.0, args.budget_s + 60 - (time.perf_counter() - t_start))
                print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: batch {batch} x {seq} ...", flush=True)
                res, tail = run_row(name, batch, seq, args, run, anchor, env, timeout)
                if res.get("error") == "oom" and batch > 1:
                    batch //= 2
                    continue
                break
            r = {"row": name, "batch": batch, "seq": seq, **res, "gflop_per_token": round(fl["total"] / 1e9, 3),
                 "flops_per_token": {k: round(v / 1e9, 4) for k, v in fl.items()}}
            if "tok_s" in r:
                r["mfu"] = _sig(fl["total"] * r["tok_s"] / PEAK_FLOPS)
            if "profile_table" in r:
                profiles.append(f"==== {name} (B {batch} x {seq}): {json.dumps(r['profile'])}\n{r.pop('profile_table')}\n")
            if "error" in r:
                with open(errors_path, "a") as f:
                    f.write(f"==== {name} batch {batch}: {r['error']}\n{tail}\n")
            print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: "
                  + (f"{r['tok_s']:,} tok/s, {r.get('peak_gib')} GiB, MFU {100 * r['mfu']:.1f}%" if "tok_s" in r else r["error"]),
                  flush=True)
            rows.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ref = next((r for r in rows if r["row"] == "hf:full-eager" and "tok_s" in r), None)
    report = {"device": device, "shape": shape, "run": run, "peak_flops": PEAK_FLOPS, "rows": rows,
              "goals": goals(rows, ref), "wall_s": round(time.perf_counter() - t_start, 1)}
    (out_dir / "train_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if profiles:
        (out_dir / "train_profile.txt").write_text("\n".join(profiles))
    for p in profiles:
        print(p.splitlines()[0][:400])
    print(f"\ntrain_bench on {device['gpu']} (torch {device['torch']}, transformers {device.get('transformers')}); "
          f"MFU vs {PEAK_FLOPS / 1e12:.0f} TFLOP/s; x hf = vs hf:full-eager of this run; wall {report['wall_s']} s")
    print(table(rows, ref))
    if report["goals"]:
        print("goals:", json.dumps(report["goals"]))
    return report


if __name__ == "__main__":
    main()
