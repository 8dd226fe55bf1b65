"""The fused decode step with its kernel switches (flexmoe/infer/triton_decode.py) set each way, side by side.

    PYTHONPATH=. python3 benchmarks/decode_variants_bench.py                  # 1B shape, E4 k2, batches 1 and 32
    PYTHONPATH=. python3 benchmarks/decode_variants_bench.py --shape 7b --combo 8:4 --profile

A variant is a setting of triton_decode's module switches (`FUSED_ATTENTION`, `ATTEND_BLOCK`, ...), read when a
decoder captures its CUDA graphs. Every variant decodes the same model and prompts, interleaved (ABC ABC ...) so
that drift between them shows as spread, and two copies of the first variant measure that spread. Prints the
decode loop's tokens/s per variant and batch (median and range), the whole `generate` call, the share of tokens
equal to the first variant's (bf16 sums in another order may flip a near-tie), whether a variant repeats its own
tokens exactly, and with `--profile` the per-step device time of its top kernels (eager, batch 1).
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

# name -> triton_decode switches
VARIANTS = {
    "sdpa": {"FUSED_ATTENTION": False},  # the q/k kernel, then SDPA (cuDNN on Hopper)
    "fused": {"FUSED_ATTENTION": True},  # attention inside the q/k kernel, blocks and warps by the launch rule
    "sdpa2": {"FUSED_ATTENTION": False},  # the first variant again: the spread between identical decoders
    "fused-block32": {"FUSED_ATTENTION": True, "ATTEND_BLOCK": 32},
}
DEFAULTS = {"FUSED_ATTENTION": True, "ATTEND_BLOCK": None, "SPLITS": None, "ONE_PASS": True}


def configure(switches: dict) -> None:
    from flexmoe.infer import triton_decode

    for name, value in {**DEFAULTS, **switches}.items():
        setattr(triton_decode, name, value)


def main(argv=None) -> dict:
    from flexmoe.infer import enable_fast_path
    from flexmoe.infer.decode import FastDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=("1b", "7b"))
    ap.add_argument("--combo", default="4:2", help="E:k")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: 3 calls per variant, batch)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--profile", action="store_true", help="also an eager kernel profile per variant (batch 1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_variants_bench needs a CUDA GPU")
    ib.use_shape(args.shape)
    E, k = map(int, args.combo.split(":"))
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batches.split(",")]
    m = ib.build(E, k)
    enable_fast_path(m)  # the experts kernel and the norms, as infer_bench's flexmoe row
    torch.manual_seed(1)
    x = torch.randint(0, ib.SHAPE["vocab_size"] - 2, (max(batches), ib.DS), device="cuda")
    decoders, ref, same, repeats = {}, {}, {}, {}
    for name in names:
        configure(VARIANTS[name])
        dec = decoders[name] = FastDecoder(m)
        for b in batches:  # captures the graphs with this variant's kernels
            first = dec.generate(x[:b], max_new_tokens=ib.NEW).sequences
            again = dec.generate(x[:b], max_new_tokens=ib.NEW).sequences
            ref.setdefault(b, first)
            same[name, b] = (first == ref[b]).float().mean().item()
            repeats[name, b] = bool(torch.equal(first, again))
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
        row = {"variant": name, "switches": VARIANTS[name]}
        for b in batches:
            lp = loops[name, b]
            row[f"loop_b{b}"] = round(statistics.median(lp), 1)
            row[f"loop_b{b}_range"] = [round(min(lp), 1), round(max(lp), 1)]
            row[f"gen_b{b}"] = round(statistics.median(walls[name, b]), 1)
            row[f"same_tokens_b{b}"] = round(same[name, b], 4)
            row[f"repeats_b{b}"] = repeats[name, b]
        rows.append(row)
    if args.profile:
        for name, row in zip(names, rows):
            configure(VARIANTS[name])
            row["profile_b1"] = profile(FastDecoder(m, cuda_graphs=False), x[:1])
    configure({})
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape, "E": E, "k": k, "rows": rows}
    base = rows[0]
    print(f"{result['device']} shape {args.shape} E{E} k{k}: decode-loop tok/s (median, [min, max]); whole call")
    for row in rows:
        cells = [f"b{b} {row[f'loop_b{b}']} {row[f'loop_b{b}_range']} ({row[f'loop_b{b}'] / base[f'loop_b{b}']:.3f}x)"
                 f" gen {row[f'gen_b{b}']} same {row[f'same_tokens_b{b}']} repeats {row[f'repeats_b{b}']}"
                 for b in batches]
        print(f"  {row['variant']:>13}: " + " | ".join(cells))
        if "profile_b1" in row:
            print(f"                 profile b1: {row['profile_b1']}")
    out_dir = Path(os.environ.get("OUT", "runs/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode_variants_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def profile(dec, x, steps: int = 8) -> dict:
    """Per-step device time of the decode steps' top kernels, eager (each kernel visible), the prompt's taken out."""
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
