"""Helpers of benchmarks/multi_gpu.sh (multi-GPU `flexmoe train-expert`, issues 9 and 20); run that script, not this.

    python benchmarks/multi_gpu.py setup WORK SHAPE          # random anchor (a preset, or 7b / tiny) + tokenizer + text
    <launcher> benchmarks/multi_gpu.py run STEPS JSON ARGS   # one train-expert through the real CLI; timings -> JSON
    python benchmarks/multi_gpu.py report WORK               # tokens/s, scaling, MFU, memory, package differences

SHAPE is a flexmoe preset (tiny, small, base) or a shape of benchmarks/shapes.py (1b = base, 7b: the FlexOlmo 7B
anchor, 14.6 GB bf16).

`run` times every optimizer step (with a CUDA sync) and reports the steady-state rate over all steps but the
first `MULTI_GPU_WARMUP` (default 5), so start-up (loading, FSDP's lazy init, CUDA context) does not count. Every
process writes its peak GPU memory beside the JSON (JSON.rankR); the main process also records the device mesh
FSDP2 sharded on (1-D: FSDP2 over all processes; 2-D: HSDP, replicas x shards).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WARMUP = int(os.environ.get("MULTI_GPU_WARMUP", "5"))
PEAK_FLOPS = 989e12  # dense bf16 of an H100 / H200 SXM, datasheet (as benchmarks/train_bench.py)


def shape_of(name: str) -> dict:
    """(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, max_position_embeddings, dtype) of a
    flexmoe preset or of a benchmarks/shapes.py shape."""
    from benchmarks import shapes
    from flexmoe import presets

    if name in presets.PRESETS:
        p = presets.get(name)
        return dict(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                    num_layers=p.num_layers, num_heads=p.num_heads, max_position_embeddings=p.max_position_embeddings,
                    dtype=p.dtype)
    return {**shapes.get(name), "max_position_embeddings": 4096, "dtype": "bfloat16"}


def setup(work: Path, name: str) -> None:
    import torch

    from flexmoe.expert.upcycle import DTYPES
    from flexmoe.testing import build_synthetic_anchor, save_tiny_tokenizer

    shape = shape_of(name)
    anchor = work / "anchor"
    if not (anchor / "flexmoe_anchor.json").is_file():
        build_synthetic_anchor(anchor, vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                               intermediate_size=shape["intermediate_size"], num_layers=shape["num_layers"],
                               num_heads=shape["num_heads"], dtype=DTYPES[shape["dtype"]])
        config = json.loads((anchor / "config.json").read_text())
        config["max_position_embeddings"] = shape["max_position_embeddings"]  # config only: not fingerprinted
        (anchor / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tiny_tokenizer(anchor, vocab_size=shape["vocab_size"])
    data = work / "data.jsonl"
    if not data.is_file():  # ~1.6M tokens of the tokenizer's filler words (a toy shape: ~80k)
        rng = random.Random(0)
        words = [f"w{i}" for i in range(min(shape["vocab_size"] - 200, 5000))]
        with open(data, "w") as f:
            for _ in range(800 if shape["hidden_size"] >= 512 else 40):
                f.write(json.dumps({"text": " ".join(rng.choices(words, k=2000))}) + "\n")
    (work / "shape.json").write_text(json.dumps({"name": name, **shape}) + "\n")
    print(f"anchor {anchor} ({name}: {shape['num_layers']} layers, hidden {shape['hidden_size']}), data {data}, "
          f"torch {torch.__version__}")


def run(steps: int, out_json: Path, args: list[str]) -> None:
    """Run `flexmoe train-expert ARGS --max-steps STEPS` in this process (one of N under a launcher)."""
    import torch

    from flexmoe import api
    from flexmoe.cli import main
    from flexmoe.train import fsdp

    real, real_mesh, real_settings = api.train_expert, fsdp._mesh, fsdp.settings
    stamps: list[float] = []
    found: dict = {}

    def timed(*a, **k):
        def on_step(step: int) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        result = real(*a, **k, on_step=on_step)
        found["result"] = result
        return result

    def mesh(*a, **k):  # what FSDP2 shards on: 1-D over all processes, or HSDP's (replicate, shard)
        m = real_mesh(*a, **k)
        found["mesh"] = {"shape": list(m.shape), "dims": list(m.mesh_dim_names or [])}
        return m

    def settings(*a, **k):  # the FSDP options this launch gave flexmoe (None: DDP or one process)
        got = real_settings(*a, **k)
        found["fsdp"] = None if got is None else {"reshard_after_forward": got.reshard_after_forward}
        return got

    api.train_expert, fsdp._mesh, fsdp.settings = timed, mesh, settings
    try:
        main(["train-expert", *args, "--max-steps", str(steps)], standalone_mode=False)
    finally:
        api.train_expert, fsdp._mesh, fsdp.settings = real, real_mesh, real_settings
    rank = int(os.environ.get("RANK", "0"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    Path(f"{out_json}.rank{rank}").write_text(json.dumps({"rank": rank, "peak_gib": peak}) + "\n")
    if rank != 0:
        return
    r = found["result"].train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = r.tokens // r.steps
    steady = (len(stamps) - 1 - WARMUP) * tokens_per_step / (stamps[-1] - stamps[WARMUP])
    out_json.write_text(json.dumps({"world": world, "steps": r.steps, "warmup": WARMUP,
                                    "tokens_per_step": tokens_per_step, "tokens_per_s": steady,
                                    "tokens_per_s_whole_run": r.tokens_per_s, "final_loss": r.final_loss,
                                    "peak_gib_rank0": peak, "mesh": found.get("mesh"), "fsdp": found.get("fsdp"),
                                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))


def _diff(pkg, ref) -> tuple[float, float]:
    diffs = [(pkg.reader.get(k).float() - ref.reader.get(k).float()).abs() for k in ref.reader.keys()]
    return max(float(d.max()) for d in diffs), sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)


def report(work: Path) -> dict:
    """Print the table; returns its rows (name -> fields) for tests."""
    from benchmarks.train_bench import flops_per_token
    from flexmoe.io.package import read_package

    meta = json.loads((work / "shape.json").read_text()) if (work / "shape.json").is_file() else None
    seq = int(os.environ.get("SEQ", "2048"))
    gflop = flops_per_token(meta, seq, "expert")["total"] if meta else None
    names = sorted((p.stem for p in work.glob("*.json") if p.stem != "shape" and (work / p.stem).is_dir()),
                   key=lambda n: (n != "one", json.loads((work / f"{n}.json").read_text())["world"], n))
    rows = {name: json.loads((work / f"{name}.json").read_text()) for name in names}
    if "one" not in rows:
        raise SystemExit(f"no 1-GPU run in {work}: nothing to scale against")
    base = rows["one"]["tokens_per_s"]
    print(f"device: {rows['one']['device']}" + (f"; shape {meta['name']}, {meta['num_layers']} layers, hidden "
                                                f"{meta['hidden_size']}, {gflop / 1e9:.2f} GFLOP/token at S {seq}"
                                                if meta else ""))
    print(f"{'run':12} {'GPUs':>4} {'mesh':>9} {'tok/s':>10} {'scaling':>8} {'MFU/GPU':>8} {'peak GiB/GPU':>13} "
          f"{'final loss':>10} {'max |diff| vs 1 GPU':>20} {'mean |diff|':>12}")
    one = read_package(work / "one")
    for name, row in rows.items():
        pkg = read_package(work / name)
        row["max_diff"], row["mean_diff"] = _diff(pkg, one)
        ranks = [json.loads(p.read_text())["peak_gib"] for p in work.glob(f"{name}.json.rank*")]
        row["peak_gib_max"] = max(ranks) if ranks else row["peak_gib_rank0"]
        row["scaling"] = row["tokens_per_s"] / base
        row["mfu_per_gpu"] = gflop and gflop * row["tokens_per_s"] / (row["world"] * PEAK_FLOPS)
        mesh = "x".join(map(str, (row.get("mesh") or {}).get("shape", []))) or "-"
        print(f"{name:12} {row['world']:>4} {mesh:>9} {row['tokens_per_s']:>10,.0f} {row['scaling']:>7.2f}x "
              f"{100 * row['mfu_per_gpu'] if gflop else float('nan'):>7.1f}% {row['peak_gib_max']:>13.1f} "
              f"{row['final_loss']:>10.4f} {row['max_diff']:>20.3g} {row['mean_diff']:>12.3g}")
    largest = max(float(one.reader.get(k).float().abs().max()) for k in one.reader.keys())
    print(f"(largest |value| in the 1-GPU package: {largest:.3g}; the packages are stored in the anchor's dtype)")
    for name in rows:  # HSDP against the FSDP2 run of the same processes (issue 20: equal up to bf16 noise)
        if name.startswith("hsdp"):
            twin = "fsdp2" + name[len("hsdp"):]
            if twin in rows:
                worst, mean = _diff(read_package(work / name), read_package(work / twin))
                rows[name]["vs_fsdp2"] = [worst, mean]
                print(f"{name} vs {twin}: max |diff| {worst:.3g}, mean {mean:.3g}")
    (work / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "setup":
        setup(Path(sys.argv[2]), sys.argv[3])
    elif command == "run":
        run(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    elif command == "report":
        report(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {command!r}: setup, run or report")
