"""The fused decode step with each of its L2 prefetches on and off (flexmoe/infer/triton_decode.py, `_prefetch_l2`).

    PYTHONPATH=. python3 benchmarks/prefetch_bench.py                      # 1B shape, E4 k2
    PYTHONPATH=. python3 benchmarks/prefetch_bench.py --combo 8:4 --shape 7b

A decode step's latency-bound kernels (q/k norms + RoPE, attention, the router, the post-feed-forward norm) leave
HBM idle for ~18 us a layer at batch 1 (1B shape). The fused kernels can start bulk prefetches into the L2 of the
weights the next matrix product reads: the o projection (during q/k + attention), the first bytes of the chosen
experts' gate/up (during the router, batch 1), the next layer's q/k/v (during the post-feed-forward norm). Each
variant below switches some of them on; all run the same model and prompt in CUDA graphs, interleaved (ABC ABC ...)
so that drift between them shows as spread. Prints decode-loop tokens/s per variant and batch, the whole `generate`
call, and (eager, `--profile`) the per-step time of the kernels that read the prefetched weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import infer_bench as ib  # noqa: E402

# name -> (o projection, next layer's q/k/v, MB of each chosen expert's gate/up, the one-pass router kernel)
VARIANTS = {"none": (False, False, 0, True), "none2": (False, False, 0, True), "o": (True, False, 0, True), "o+next": (True, True, 0, True),
            "experts8": (False, False, 8, True), "all8": (True, True, 8, True), "all16": (True, True, 16, True),
            "none-2pass": (False, False, 0, False), "all8-2pass": (True, True, 8, False)}


def configure(decoder, o: bool, nxt: bool, expert_mb: int, one_pass: bool) -> None:
    """Set the prefetches of every fused layer of `decoder` and the router kernel (before a generate that captures
    or runs eagerly: the launches read them)."""
    from flexmoe.infer import triton_decode

    triton_decode.ONE_PASS = one_pass
    layers = decoder._fused
    for i, layer in enumerate(layers):
        layer.prefetch_o = layer.layer.self_attn.o_proj.weight if o else None
        layer.prefetch_next = layers[i + 1].qkv_weight if nxt and i + 1 < len(layers) else None
        layer.prefetch_expert_elems = (expert_mb << 20) // 2


def main(argv=None) -> dict:
    from flexmoe.infer import enable_fast_path
    from flexmoe.infer.decode import FastDecoder
    from flexmoe.infer.triton_decode import prefetch_l2_supported

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=("1b", "7b"))
    ap.add_argument("--combo", default="4:2", help="E:k")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: 3 calls per variant, batch)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--profile", action="store_true", help="also an eager kernel profile per variant (batch 1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not prefetch_l2_supported(torch.device("cuda")):
        raise SystemExit("prefetch_bench needs a CUDA GPU with bulk L2 prefetch (sm_90: H100/H200)")
    ib.use_shape(args.shape)
    E, k = map(int, args.combo.split(":"))
    names = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    m = ib.build(E, k)
    enable_fast_path(m)  # the experts kernel and the norms, as infer_bench's flexmoe row
    V = ib.SHAPE["vocab_size"] - 2
    torch.manual_seed(1)
    x = torch.randint(0, V, (max(batches), ib.DS), device="cuda")
    decoders, ref, same = {}, {}, {}
    for name in names:
        dec = FastDecoder(m, prefetch=True)
        configure(dec, *VARIANTS[name])
        decoders[name] = dec
        for b in batches:  # capture, and the tokens every variant with the same router kernel must reproduce
            out = dec.generate(x[:b], max_new_tokens=ib.NEW)
            ref.setdefault(b, out.sequences)
            same[name, b] = (out.sequences == ref[b]).float().mean().item()
    loops = {(n, b): [] for n in names for b in batches}
    walls = {(n, b): [] for n in names for b in batches}
    for _ in range(args.rounds):
        for b in batches:
            for name in names:
                for _ in range(3):
                    t = time.perf_counter()
                    out = decoders[name].generate(x[:b], max_new_tokens=ib.NEW)
                    torch.cuda.synchronize()
                    walls[name, b].append(b * ib.NEW / (time.perf_counter() - t))
                    loops[name, b].append(b * (ib.NEW - 1) / out.decode_s)
    rows = []
    for name in names:
        row = {"variant": name, "o": VARIANTS[name][0], "next_qkv": VARIANTS[name][1],
               "expert_mb": VARIANTS[name][2], "router_one_pass": VARIANTS[name][3]}
        for b in batches:
            lp = loops[name, b]
            row[f"loop_b{b}"] = round(statistics.median(lp), 1)
            row[f"loop_b{b}_range"] = [round(min(lp), 1), round(max(lp), 1)]
            row[f"gen_b{b}"] = round(statistics.median(walls[name, b]), 1)
            row[f"same_tokens_b{b}"] = round(same[name, b], 4)  # as the first variant's
        rows.append(row)
    if args.profile:
        for name, row in zip(names, rows):
            dec = decoders[name]
            configure(dec, *VARIANTS[name])
            dec.cuda_graphs = False
            dec._runners.clear()
            row["profile_b1"] = profile(dec, x[:1])
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape, "E": E, "k": k, "rows": rows}
    base = rows[0]
    print(f"{result['device']} shape {args.shape} E{E} k{k}: decode-loop tok/s (median, [min, max]); whole call")
    for row in rows:
        cells = [f"b{b} {row[f'loop_b{b}']} {row[f'loop_b{b}_range']} ({row[f'loop_b{b}'] / base[f'loop_b{b}']:.3f}x)"
                 f" gen {row[f'gen_b{b}']} same {row[f'same_tokens_b{b}']}" for b in batches]
        print(f"  {row['variant']:>9}: " + " | ".join(cells))
        if "profile_b1" in row:
            print(f"             profile b1: {row['profile_b1']}")
    out_dir = Path(os.environ.get("OUT", "runs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prefetch_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def profile(dec, x, steps: int = 8) -> dict:
    """Per-step device time of the kernels around the prefetched weights, eager (each kernel visible)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    def kernels(p):
        return [(e.name, ib._device_us(e)) for e in p.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]

    dec.generate(x, max_new_tokens=2)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prompt:
        dec.generate(x, max_new_tokens=1)
        torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as full:
        dec.generate(x, max_new_tokens=1 + steps)
        torch.cuda.synchronize()
    return ib.decode_kernels(kernels(full), kernels(prompt), steps, top=10)


if __name__ == "__main__":
    main()
