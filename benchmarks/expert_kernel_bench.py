"""The decode expert kernels (flexmoe/infer/triton_moe.py) one configuration at a time, at decode token counts.

    PYTHONPATH=. python3 benchmarks/expert_kernel_bench.py                 # 1B shape, E4 k2, 1 token
    PYTHONPATH=. python3 benchmarks/expert_kernel_bench.py --tokens 32 --shape 7b --experts 8 --top-k 4

Each (BN, BK, num_warps, num_stages) of a grid is compiled, then timed in a CUDA graph of one launch per weight
copy (16 copies, so every launch reads its weights from HBM, not from L2, as in a decode step where the layers'
weights follow each other): microseconds a launch and the rate at which it reads the chosen experts' weights. The
autotuner picks its configuration from the kernel's short list the same way but on one weight tensor; this says
which configurations are worth that list. Prints a table sorted by time; --json-out writes the rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from flexmoe.infer import triton_moe as tm  # noqa: E402

SHAPES = {"1b": (2048, 8192), "7b": (4096, 11008)}
GRID = {"BN": (16, 32, 64), "BK": (128, 256, 512), "num_warps": (4, 8), "num_stages": (3, 4, 6)}


def time_graph(launch, copies: int, reps: int = 20) -> float:
    """Microseconds a launch: a CUDA graph of `copies` launches (one per weight copy), replayed `reps` times."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for c in range(copies):
            launch(c)  # compile + warm
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for c in range(copies):
            launch(c)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * copies)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--kernel", default="down", choices=("down", "gate_up"))
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    H, I = SHAPES[args.shape]
    E, k, T = args.experts, args.top_k, args.tokens
    torch.manual_seed(0)
    dt = torch.bfloat16
    w_gate_up = [torch.randn(E, 2 * I, H, device="cuda", dtype=dt) * 0.02 for _ in range(args.copies)]
    w_down = [torch.randn(E, H, I, device="cuda", dtype=dt) * 0.02 for _ in range(args.copies)]
    x = torch.randn(T, H, device="cuda", dtype=dt)
    idx = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
    wts = torch.rand(T, k, device="cuda", dtype=dt)
    S = T * k
    BM, num_blocks, row_pair, block_expert = tm.pair_layout(idx, E)
    n_active = int(idx.unique().numel())
    h = torch.randn(S, I, device="cuda", dtype=dt)
    y = torch.empty(S, H, device="cuda", dtype=dt)
    hh = torch.empty(S, I, device="cuda", dtype=dt)
    bytes_read = n_active * (2 * I * H if args.kernel == "gate_up" else H * I) * 2
    rows = []
    for BN, BK, warps, stages in itertools.product(*GRID.values()):
        if args.kernel == "down":
            fn = tm._down_kernel.fn

            def launch(c, BN=BN, BK=BK, warps=warps, stages=stages):
                wd = w_down[c]
                fn[(num_blocks, triton.cdiv(H, BN))](
                    h, wd, y, row_pair, block_expert, wts.reshape(-1), S, E, h.stride(0), wd.stride(0),
                    wd.stride(1), y.stride(0), H=H, I=I, BM=BM, BN=BN, BK=BK, num_warps=warps,
                    num_stages=stages)
        else:
            fn = tm._gate_up_kernel.fn

            def launch(c, BN=BN, BK=BK, warps=warps, stages=stages):
                wg = w_gate_up[c]
                fn[(num_blocks, triton.cdiv(I, BN))](
                    x, wg, hh, row_pair, block_expert, S, E, k, x.stride(0), wg.stride(0), wg.stride(1),
                    hh.stride(0), H=H, I=I, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
        try:
            us = time_graph(launch, args.copies)
        except Exception as e:  # out of shared memory and the like: not a candidate
            rows.append({"BN": BN, "BK": BK, "num_warps": warps, "num_stages": stages, "error": str(e)[:80]})
            continue
        rows.append({"BN": BN, "BK": BK, "num_warps": warps, "num_stages": stages, "us": round(us, 2),
                     "tb_s": round(bytes_read / us / 1e6, 2)})
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    print(f"{args.kernel} kernel, shape {args.shape} (H {H}, I {I}), E{E} k{k}, {T} token(s): {n_active} experts "
          f"read, {bytes_read / 1e6:.1f} MB a launch; {len(ok)} of {len(rows)} configurations ran")
    for r in ok[:15]:
        print(f"  BN {r['BN']:>3} BK {r['BK']:>4} warps {r['num_warps']} stages {r['num_stages']}: "
              f"{r['us']:7.2f} us  {r['tb_s']:.2f} TB/s")
    shortlist = tm._down_kernel.configs if args.kernel == "down" else tm._gate_up_kernel.configs
    listed = {(c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) for c in shortlist}
    for r in ok:
        r["in_shortlist"] = (r["BN"], r["BK"], r["num_warps"], r["num_stages"]) in listed
    print("  the kernel's short list: " + ", ".join(
        f"{r['BN']}/{r['BK']}/{r['num_warps']}/{r['num_stages']} {r['us']:.2f} us" for r in ok if r["in_shortlist"]))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
