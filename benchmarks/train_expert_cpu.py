"""Train-expert throughput on CPU for the tiny preset (a benchmark, not a timed test).

    .venv/bin/python benchmarks/train_expert_cpu.py [--steps 60] [--repeat 3] [--threads N]

Builds a tiny random sentence embedder and a tiny anchor in a temporary folder, then trains the `code` fixture
expert through `flexmoe.api.train_expert` (top-2 and top-1) and, for comparison, the dense anchor through
`flexmoe.api.train_anchor`; prints tokens/s of each (training loop only, best and median of `--repeat`
interleaved runs, all in one process so the figures are comparable; a shared machine makes single runs noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from flexmoe import api, presets
    from flexmoe.config import Device, ExpertSpec, RouterTraining, TrainAnchorConfig, TrainConfig
    from flexmoe.testing import build_random_embedder

    public = ROOT / "fixtures/public/train.jsonl"
    code = ROOT / "fixtures/code/train.jsonl"
    tiny = presets.tiny().train
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emb = build_random_embedder(tmp / "embedder", dim=32)
        for i in range(args.repeat):
            train = presets.training("tiny", max_steps=args.steps, device=Device.CPU)
            anchor = api.train_anchor(TrainAnchorConfig(data=[public], embedder=emb, train=train), tmp / "anchor",
                                      overwrite=True, progress=False)
            rows.setdefault("dense anchor (all params)", []).append(anchor.train.tokens_per_s)
            for k in (2, 1):
                spec = ExpertSpec(name="code", data=[code], anchor=tmp / "anchor", embedder=emb, train_top_k=k,
                                  router_training=RouterTraining(public_data=[public]),
                                  train=TrainConfig(max_steps=args.steps, batch_size=tiny.batch_size,
                                                    seq_len=tiny.seq_len, lr=1e-3, device=Device.CPU))
                res = api.train_expert(spec, tmp / f"code{k}", overwrite=True, progress=False)
                rows.setdefault(f"train-expert top-{k}", []).append(res.train.tokens_per_s)
    print(json.dumps({"preset": "tiny", "batch": tiny.batch_size, "seq_len": tiny.seq_len, "steps": args.steps,
                      "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "torch": torch.__version__}))
    for name, runs in rows.items():
        print(f"{name:28s} best {max(runs):10,.0f} tok/s   median {statistics.median(runs):10,.0f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
