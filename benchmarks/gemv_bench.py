"""Decode kernels at batch 1 (and a few tokens), one at a time: the register GEMVs (flexmoe.infer.triton_gemv)
against what they replace, in a CUDA graph over distinct weight copies (one per layer, so nothing stays in L2).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gemv_bench.py [--shape 1b|7b|tiny] [--json-out F]

Rows, each with device us a call and the read rate (bytes of the weights the call must read / time):
- experts E:k, T tokens: `triton_moe` block kernels (layout + gate/up + down, 16-row tensor-core tiles) vs the
  GEMVs (two launches); bytes = distinct experts chosen x 3 H I x 2.
- q/k/v (3H x H) and o (H x H) at one row: cuBLAS (F.linear) vs `gemv`.
Also the device-to-device copy rate, the practical ceiling of any of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import shapes  # noqa: E402
from benchmarks.infer_bench import copy_bw  # noqa: E402

COMBOS = {"1b": [(4, 2), (8, 4)], "7b": [(7, 7), (8, 4)], "tiny": [(4, 2)]}
TOKENS = (1, 2, 4, 8)
REPLAYS = 20


def graph_us(fn, copies: int) -> float:
    """Device us per call of fn(i) for i over the weight copies, replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):  # autotuning (and its syncs) happen here, outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / REPLAYS / copies


def experts_rows(H: int, I: int, combos, copies: int) -> list[dict]:
    from flexmoe.infer import triton_moe
    from flexmoe.infer.triton_gemv import expert_pairs_gemv

    rows = []
    for E, k in combos:
        wgu = [torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        wd = [torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        g = torch.Generator(device="cuda").manual_seed(0)
        for T in TOKENS:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            w, idx = torch.rand(T, E, device="cuda", generator=g).softmax(-1).topk(k, -1)
            w = w.to(torch.bfloat16)
            hit = idx.unique().numel()
            nbytes = hit * 3 * H * I * 2
            saved = triton_moe.GEMV_MAX_TOKENS
            try:
                triton_moe.GEMV_MAX_TOKENS = 0
                block = graph_us(lambda i: triton_moe.fused_expert_pairs(x, wgu[i], wd[i], idx, w), copies)
                ref = triton_moe.fused_expert_pairs(x, wgu[0], wd[0], idx, w).float()
            finally:
                triton_moe.GEMV_MAX_TOKENS = saved
            gemv_us = graph_us(lambda i: expert_pairs_gemv(x, wgu[i], wd[i], idx, w), copies)
            out = expert_pairs_gemv(x, wgu[0], wd[0], idx, w).float()
            err = ((out - ref).norm() / ref.norm()).item()
            row = dict(op=f"experts E{E}k{k}", T=T, experts_read=hit, mb=round(nbytes / 1e6, 1),
                       block_us=round(block, 1), gemv_us=round(gemv_us, 1),
                       block_tb_s=round(nbytes / block / 1e6, 2), gemv_tb_s=round(nbytes / gemv_us / 1e6, 2),
                       rel_diff=round(err, 5))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def dense_rows(H: int, copies: int) -> list[dict]:
    from flexmoe.infer.triton_gemv import _gemv_kernel, gemv

    rows = []
    for name, N in (("q/k/v", 3 * H), ("o", H)):
        ws = [torch.randn(N, H, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        nbytes = N * H * 2
        cublas = graph_us(lambda i: F.linear(x, ws[i]), copies)
        ours = graph_us(lambda i: gemv(x, ws[i]), copies)
        err = ((gemv(x, ws[0]).float() - F.linear(x, ws[0]).float()).norm() / F.linear(x, ws[0]).float().norm())
        row = dict(op=name, T=1, mb=round(nbytes / 1e6, 1), cublas_us=round(cublas, 1), gemv_us=round(ours, 1),
                   cublas_tb_s=round(nbytes / cublas / 1e6, 2), gemv_tb_s=round(nbytes / ours / 1e6, 2),
                   rel_diff=round(err.item(), 5), config=str(_gemv_kernel.best_config))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=sorted(COMBOS))
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_bench needs a CUDA GPU (the kernels are Triton's, timed from CUDA graphs)")
    shape = shapes.get(args.shape)
    H, I = shape["hidden_size"], shape["intermediate_size"]
    copies = 16 if args.shape != "7b" else 6  # 7b E8: 6 x 2.2 GB of experts
    res = dict(shape=args.shape, device=torch.cuda.get_device_name(), copy_tb_s=round(copy_bw() / 1e12, 2))
    print(f"{res['device']}: copy {res['copy_tb_s']} TB/s", flush=True)
    res["dense"] = dense_rows(H, copies)
    res["experts"] = experts_rows(H, I, COMBOS[args.shape], copies)
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
