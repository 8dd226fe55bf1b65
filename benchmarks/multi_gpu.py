"""Helpers of benchmarks/multi_gpu.sh (multi-GPU `flexmoe train-expert`, issue 9); run that script, not this one.

    python benchmarks/multi_gpu.py setup WORK PRESET        # random anchor of a preset's shape + tokenizer + text
    <launcher> benchmarks/multi_gpu.py run STEPS JSON ARGS   # one train-expert through the real CLI; timings -> JSON
    python benchmarks/multi_gpu.py report WORK               # tokens/s, scaling, package differences

`run` times every optimizer step (with a CUDA sync) and reports the steady-state rate over all steps but the
first `WARMUP`, so start-up (loading, FSDP's lazy init, CUDA context) does not count.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

WARMUP = 5


def setup(work: Path, preset: str) -> None:
    import torch

    from flexmoe import presets
    from flexmoe.expert.upcycle import DTYPES
    from flexmoe.testing import build_synthetic_anchor, save_tiny_tokenizer

    shape = presets.get(preset)
    anchor = work / "anchor"
    if not (anchor / "flexmoe_anchor.json").is_file():
        build_synthetic_anchor(anchor, vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                               intermediate_size=shape.intermediate_size, num_layers=shape.num_layers,
                               num_heads=shape.num_heads, dtype=DTYPES[shape.dtype])
        config = json.loads((anchor / "config.json").read_text())
        config["max_position_embeddings"] = shape.max_position_embeddings  # config only: not fingerprinted
        (anchor / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tiny_tokenizer(anchor, vocab_size=shape.vocab_size)
    data = work / "data.jsonl"
    if not data.is_file():  # ~1.6M tokens of the tokenizer's filler words
        rng = random.Random(0)
        words = [f"w{i}" for i in range(min(shape.vocab_size - 200, 5000))]
        with open(data, "w") as f:
            for _ in range(800):
                f.write(json.dumps({"text": " ".join(rng.choices(words, k=2000))}) + "\n")
    print(f"anchor {anchor} ({preset}: {shape.num_layers} layers, hidden {shape.hidden_size}), data {data}, "
          f"torch {torch.__version__}")


def run(steps: int, out_json: Path, args: list[str]) -> None:
    """Run `flexmoe train-expert ARGS --max-steps STEPS` in this process (one of N under a launcher)."""
    import torch

    from flexmoe import api
    from flexmoe.cli import main

    real = api.train_expert
    stamps: list[float] = []
    found = {}

    def timed(*a, **k):
        def on_step(step: int) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        result = real(*a, **k, on_step=on_step)
        found["result"] = result
        return result

    api.train_expert = timed
    main(["train-expert", *args, "--max-steps", str(steps)], standalone_mode=False)
    if os.environ.get("RANK", "0") != "0":
        return
    r = found["result"].train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = r.tokens // r.steps
    steady = (len(stamps) - 1 - WARMUP) * tokens_per_step / (stamps[-1] - stamps[WARMUP])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    out_json.write_text(json.dumps({"world": world, "steps": r.steps, "tokens_per_step": tokens_per_step,
                                    "tokens_per_s": steady, "tokens_per_s_whole_run": r.tokens_per_s,
                                    "final_loss": r.final_loss, "peak_gib_rank0": peak,
                                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))


def report(work: Path) -> None:
    from flexmoe.io.package import read_package

    rows = {name: json.loads((work / f"{name}.json").read_text()) for name in ("one", "fsdp2", "ddp")
            if (work / f"{name}.json").is_file()}
    base = rows["one"]["tokens_per_s"]
    print(f"device: {rows['one']['device']}")
    print(f"{'run':8} {'GPUs':>4} {'tok/s':>10} {'scaling':>8} {'peak GiB (rank 0)':>18} {'final loss':>10} "
          f"{'max |diff| vs 1 GPU':>20} {'mean |diff|':>12}")
    one = read_package(work / "one")
    for name, row in rows.items():
        pkg = read_package(work / name)
        diffs = [(pkg.reader.get(k).float() - one.reader.get(k).float()).abs() for k in one.reader.keys()]
        worst = max(float(d.max()) for d in diffs)
        mean = sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)
        print(f"{name:8} {row['world']:>4} {row['tokens_per_s']:>10,.0f} {row['tokens_per_s'] / base:>7.2f}x "
              f"{row['peak_gib_rank0']:>18.1f} {row['final_loss']:>10.4f} {worst:>20.3g} {mean:>12.3g}")
    largest = max(float(one.reader.get(k).float().abs().max()) for k in one.reader.keys())
    print(f"(largest |value| in the 1-GPU package: {largest:.3g}; the packages are stored in the anchor's dtype)")


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
