"""Decode attention (one query per row and head over the static cache): SDPA against the split-KV kernels of
flexmoe/infer/triton_attention.py, every (slots a block, warps, gated loads) configuration.

    PYTHONPATH=. python3 benchmarks/decode_attention_bench.py                 # 1B shape (16 heads of 128)
    PYTHONPATH=. python3 benchmarks/decode_attention_bench.py --shape 7b      # 32 heads of 128

Each case is a decode step of infer_bench: a cache of 192 slots (prompt 128 + 64 new, rounded) written up to slot
160 (the mean attended length), at batch 1 and 32, and one long cache (2,048 slots, written up to 2,000) at
batch 1. Timed in a CUDA graph of one launch per cache copy (enough copies that the caches do not fit in L2, as in
a decode step whose layers read their own caches): microseconds a launch and the rate at which it reads the
written K/V. `default` is the configuration `decode_attention` picks. Prints a table per case; --json-out writes
the rows.
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
import torch.nn.functional as F  # noqa: E402

from benchmarks.expert_kernel_bench import time_graph  # noqa: E402
from flexmoe.infer.triton_attention import decode_attention  # noqa: E402

HEADS = {"1b": 16, "7b": 32}
CASES = ((1, 192, 160), (32, 192, 160), (1, 2048, 2000))  # (batch, cache slots, slot written this step)
GRID = {"block": (16, 32, 64), "warps": (2, 4, 8), "gated": (True, False)}
L2_BYTES = 256e6  # caches of all copies together: several times any GPU's L2


def case_inputs(B: int, HQ: int, L: int, last: int, copies: int):
    dt = torch.bfloat16
    q = torch.randn(B, HQ, 1, 128, device="cuda", dtype=dt)
    caches = [(torch.randn(B, HQ, L, 128, device="cuda", dtype=dt), torch.randn(B, HQ, L, 128, device="cuda",
                                                                             dtype=dt)) for _ in range(copies)]
    seen = torch.arange(L, device="cuda") <= last
    mask = torch.zeros(B, 1, 1, L, device="cuda", dtype=dt).masked_fill_(~seen, torch.finfo(dt).min)
    return q, caches, mask, torch.tensor(last, device="cuda")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(HEADS))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    HQ = HEADS[args.shape]
    torch.manual_seed(0)
    rows = []
    for B, L, last in CASES:
        copies = max(4, min(64, int(L2_BYTES // (2 * B * HQ * L * 128 * 2))))
        q, caches, mask, length = case_inputs(B, HQ, L, last, copies)
        written = 2 * B * HQ * (last + 1) * 128 * 2  # bytes of K/V a step must read
        scale = 128 ** -0.5
        variants = {"sdpa": lambda c: F.scaled_dot_product_attention(q, *caches[c], attn_mask=mask, scale=scale),
                    "default": lambda c: decode_attention(q, *caches[c], mask, length, scale)}
        for block, warps, gated in itertools.product(*GRID.values()):
            variants[f"{block}/{warps}/{'gated' if gated else 'early'}"] = (
                lambda c, block=block, warps=warps, gated=gated: decode_attention(
                    q, *caches[c], mask, length, scale, block=block, warps=warps, gated=gated))
        want = F.scaled_dot_product_attention(q.float(), *(t.float() for t in caches[0]), attn_mask=mask.float(),
                                              scale=scale).reshape(B, -1)
        case = []
        for name, fn in variants.items():
            row = {"batch": B, "slots": L, "last": last, "variant": name}
            try:
                err = ((fn(0).reshape(B, -1).float() - want).norm() / want.norm()).item()
                us = time_graph(fn, copies)
                row.update(us=round(us, 2), tb_s=round(written / us / 1e6, 2), rel_err=round(err, 5))
            except Exception as e:  # out of registers and the like: not a candidate
                row["error"] = str(e)[:80]
            case.append(row)
        rows += case
        ok = sorted((r for r in case if "us" in r), key=lambda r: r["us"])
        print(f"batch {B}, {HQ} heads, cache {L} slots written to {last}: {written / 1e6:.2f} MB of K/V, "
              f"{copies} copies")
        for r in ok[:8] + [r for r in ok[8:] if r["variant"] in ("sdpa", "default")]:
            print(f"  {r['variant']:<14} {r['us']:7.2f} us  {r['tb_s']:.2f} TB/s  rel err {r['rel_err']}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
