"""Small-scale FlexOlmo reproduction on real data, in one command (FLEXOLMO.md §5-6, issue 6).

    # once, on a CPU machine with network (data + router rows with all-MiniLM-L6-v2):
    python recipes/flexolmo_small/prepare.py                       # -> .carry/flexolmo_small/
    # on one GPU (an H200: 8 minutes):
    python recipes/flexolmo_small/run.py --carry .carry/flexolmo_small --out runs/flexolmo_small
    # the tiny CPU smoke version (fixtures, random embedder; what the test suite runs):
    python recipes/flexolmo_small/run.py --scale tiny --out runs/flexolmo_tiny

Stages, each a call of `flexmoe.api` (or of the `flexmoe` CLI in parallel subprocesses, since data owners
train independently and a small model leaves most of a GPU idle):
1. anchor: `train-anchor --preset small` on the public split, r_pub from the prepared row file;
2. experts: for every private domain, `train-expert` from experts/<domain>.yaml with its prepared router row,
   plus the ablation variants (random rows, rows from the anchor's own hidden states) and the
   "no coordination" baseline (a dense fine-tune with nothing frozen, its FFN taken as the expert);
3. checkpoints: merge, the per-expert 2-expert models, model soup, and opt-out (merged minus each expert);
4. router tuning (FLEXOLMO.md §4): only the owners' router rows and biases, on public documents that a classifier
   over sentence embeddings finds closest to each domain (selected by prepare.py), then opt-out again; and, as a
   diagnostic the method itself forbids (owners do not pool data), the same tuning with a sample of each owner's
   training text added to the proxy sets: it tells a tuner that cannot learn routing from a proxy whose public
   documents hold no code, math or legal text;
5. evaluation: held-out BPB per domain for every row of the table, routing plots; results.json/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.chdir(ROOT)

from flexmoe import api  # noqa: E402
from flexmoe.config import (EvalConfig, MergeConfig, ProxyConfig, RouterTuneConfig, TrainAnchorConfig,  # noqa: E402
                            load_expert_spec, router_tuning_train)

sys.path.insert(0, str(Path(__file__).parent))
from report import opt_out_report, write_results  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the recipe."""

    preset: str
    domains: tuple[str, ...]
    anchor_steps: int
    expert_steps: int
    batch_size: int  # sequences per micro-step
    seq_len: int
    eval_bytes: int  # held-out bytes per domain
    parallel: int  # expert trainings at once
    device: str
    grad_accum: int = 1
    rt_steps: int = 0  # router-tuning steps on public proxy data (0: no RT rows)
    rt_owner_bytes: int = 0  # per owner, bytes of its training text added for the oracle RT rows (0: none)


SCALES = {
    # One H100: ~67M-parameter anchor (2 epochs of public text), four experts of ~1 epoch each, all variants.
    # One training already keeps the GPU busy (~250k tok/s); 3 at a time hide start-up and tokenisation,
    # and 3 dense "no coordination" fine-tunes (~18 GB each) still fit in 80 GB.
    "small": Scale(preset="small", domains=("code", "math", "legal", "speeches"), anchor_steps=400,
                   expert_steps=80, batch_size=16, grad_accum=2, seq_len=1024, eval_bytes=400_000, parallel=3,
                   device="cuda", rt_steps=100, rt_owner_bytes=800_000),
    # A 2-minute GPU check of the whole pipeline at the small shape (timings for planning, not results).
    "probe": Scale(preset="small", domains=("code", "math", "legal", "speeches"), anchor_steps=40,
                   expert_steps=10, batch_size=16, grad_accum=2, seq_len=1024, eval_bytes=50_000, parallel=6,
                   device="cuda"),
    # CPU smoke test on the bundled fixtures.
    "tiny": Scale(preset="tiny", domains=("code", "speeches"), anchor_steps=30, expert_steps=8, batch_size=4,
                  seq_len=64, eval_bytes=3_000, parallel=1, device="cpu", rt_steps=5, rt_owner_bytes=4_000),
}
VARIANTS = ("embedding", "random", "hidden-mean", "dense")  # expert trainings per domain


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_inputs(args, scale: Scale, run: Path) -> tuple[Path, dict[str, Path], dict[str, Path], list[Path]]:
    """Data folder, router-row files, eval files and router-tuning proxy files (made here for the tiny scale)."""
    if scale.device == "cpu":
        data = ROOT / "fixtures"
        rows_dir = run / "rows"
        embedder = run / "embedder"
        if not (embedder / "modules.json").is_file():
            from flexmoe.testing import build_random_embedder

            build_random_embedder(embedder, dim=32)
        from flexmoe.config import EmbedConfig

        for dom in ("public", *scale.domains):
            if not (rows_dir / f"{dom}.safetensors").is_file():
                api.embed_domain(EmbedConfig(data=[data / dom / "train.jsonl"], embedder=embedder, num_docs=64,
                                             device="cpu"), rows_dir / f"{dom}.safetensors", progress=False)
        proxy_dir = run / "proxy"
        for dom in scale.domains:
            if not (proxy_dir / f"{dom}.jsonl").is_file():
                api.select_proxy(ProxyConfig(public=[data / "public" / "train.jsonl"], domain=[data / dom / "train.jsonl"],
                                             embedder=embedder, fraction=0.3, device="cpu"),
                                 proxy_dir / f"{dom}.jsonl", progress=False)
    else:
        carry = Path(args.carry)
        data = run / "data"
        if not (data / "public" / "train.jsonl").is_file():
            with tarfile.open(carry / "data.tar.gz") as tar:
                tar.extractall(run, filter="data")  # the pack holds data/<domain>/...
        rows_dir = carry / "rows"
        proxy_dir = carry / "proxy"
    rows = {d: rows_dir / f"{d}.safetensors" for d in ("public", *scale.domains)}
    proxies = [proxy_dir / f"{d}.jsonl" for d in scale.domains if (proxy_dir / f"{d}.jsonl").is_file()]
    return data, rows, {d: data / d / "eval.jsonl" for d in ("public", *scale.domains)}, proxies


def expert_overrides(scale: Scale, anchor: Path, data: Path, dom: str, variant: str, row: Path) -> dict:
    """Spec overrides on top of experts/<dom>.yaml for one variant of one owner's training."""
    over = {"name": dom, "anchor": str(anchor), "data": [str(data / dom / "train.jsonl")],
            "train.max_steps": scale.expert_steps, "train.batch_size": scale.batch_size,
            "train.seq_len": scale.seq_len, "train.grad_accum": scale.grad_accum, "train.device": scale.device, "train.bf16": scale.device == "cuda",
            "train.checkpoint_every": 0, "train.warmup_steps": max(1, scale.expert_steps // 10),
            # 80-step runs of a small model: ~20 s of compiling would not pay back (and this is what was timed).
            "train.compile": False, "mode": "dense" if variant == "dense" else "flexolmo"}
    if variant in ("embedding", "dense"):
        over.update({"router.source": "row-file", "router.row_file": str(row)})
    else:
        over["router.source"] = variant
    return over


def train_experts(jobs: dict[str, tuple[str, dict, Path]], parallel: int, logs: Path) -> dict[str, float]:
    """Train every (spec, overrides, out) job; return wall seconds per label. A failure stops the recipe.

    With `parallel` > 1 each job is the `flexmoe train-expert` command a data owner would type, run as its own
    process (owners are independent, and one small model leaves most of a GPU idle); else in this process.
    """
    logs.mkdir(parents=True, exist_ok=True)

    def one(label: str) -> tuple[str, float]:
        spec, over, out = jobs[label]
        t0 = time.perf_counter()
        if parallel == 1:
            api.train_expert(load_expert_spec(spec, over), out, overwrite=True, progress=False)
        else:
            cmd = [sys.executable, "-m", "flexmoe.cli", "train-expert", "--config", spec, "--out", str(out),
                   "--overwrite", *[a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
            log_file = logs / f"{label.replace('/', '-')}.log"
            with open(log_file, "w") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = log_file.read_text().splitlines()[-15:]
                raise RuntimeError(f"{label} failed (exit {rc}):\n" + "\n".join(tail))
        log(f"  done {label} in {time.perf_counter() - t0:.0f}s")
        return label, time.perf_counter() - t0

    with ThreadPoolExecutor(parallel) as pool:
        return dict(pool.map(one, jobs))


def owner_sample(train: Path, out: Path, max_bytes: int) -> Path:
    """Evenly spaced documents of one owner's training file, about `max_bytes` of JSON lines, into `out`."""
    lines = [line for line in train.read_text(encoding="utf-8").split("\n") if line.strip()]
    step = max(1, sum(map(len, lines)) // max(1, max_bytes))
    picked, size = [], 0
    for line in lines[::step] + [x for i, x in enumerate(lines) if i % step]:  # evenly spaced first
        if size >= max_bytes:
            break
        picked.append(line)
        size += len(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(picked) + "\n", encoding="utf-8")
    return out


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--carry", type=Path, default=Path(".carry/flexolmo_small"), help="output of prepare.py")
    ap.add_argument("--out", type=Path, default=Path("runs/flexolmo_small"), help="results folder")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints folder (default: runs/<scale>-work)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    scale = SCALES[args.scale]
    run = args.work or Path(f"runs/flexolmo_{args.scale}-work")
    run.mkdir(parents=True, exist_ok=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    data, rows, eval_files, proxies = prepare_inputs(args, scale, run)
    timings["prepare"] = time.perf_counter() - t0

    log(f"anchor: preset {scale.preset}, {scale.anchor_steps} steps")
    t0 = time.perf_counter()
    anchor = api.train_anchor(TrainAnchorConfig(
        data=[data / "public" / "train.jsonl"], public_row=rows["public"], preset=scale.preset,
        max_steps=scale.anchor_steps, batch_size=scale.batch_size * scale.grad_accum, seq_len=scale.seq_len,
        seed=args.seed,
        bf16=scale.device == "cuda", device=scale.device, checkpoint_every=0, compile=False), run / "anchor",
        overwrite=True,
        progress=False)
    timings["anchor"] = time.perf_counter() - t0
    _release_gpu_memory()  # the expert processes need the memory this one cached while training the anchor
    log(f"  anchor: {anchor.num_params:,} params, loss {anchor.final_loss:.3f}, {anchor.tokens_per_s:,.0f} tok/s")

    log(f"experts: {len(scale.domains)} domains x {len(VARIANTS)} variants, {scale.parallel} at a time")
    t0 = time.perf_counter()
    jobs = {f"{v}/{d}": (f"experts/{d}.yaml", expert_overrides(scale, anchor.path, data, d, v, rows[d]),
                         run / "experts" / v / d) for v in VARIANTS for d in scale.domains}
    expert_wall = train_experts(jobs, scale.parallel, run / "logs")
    timings["experts"] = time.perf_counter() - t0
    cards = {label: json.loads((jobs[label][2] / "expert.json").read_text()) for label in expert_wall}

    log("checkpoints: merges, 2-expert models, soup, opt-outs")
    t0 = time.perf_counter()
    ck = run / "ckpt"
    quiet = MergeConfig(overwrite=True, progress=False)
    pkgs = {v: [run / "experts" / v / d for d in scale.domains] for v in VARIANTS}
    n = len(scale.domains)
    merged = {v: api.merge(anchor.path, pkgs[v], ck / f"merged-{v}", MergeConfig(top_k=n + 1, overwrite=True,
                                                                                   progress=False)).out
              for v in VARIANTS}
    alone = {d: api.merge(anchor.path, [run / "experts" / "embedding" / d], ck / f"alone-{d}",
                          MergeConfig(top_k=2, overwrite=True, progress=False)).out for d in scale.domains}
    from flexmoe.baselines import soup

    soup_dir = soup(merged["embedding"], ck / "soup", overwrite=True)
    optout = {d: api.remove(merged["embedding"], d, ck / f"optout-{d}", quiet).out for d in scale.domains}
    timings["checkpoints"] = time.perf_counter() - t0

    tuned = tuned_oracle = None
    if scale.rt_steps and proxies:
        log(f"router tuning: {scale.rt_steps} steps on {len(proxies)} public proxy sets")
        t0 = time.perf_counter()
        rt_train = dataclasses.replace(router_tuning_train(), max_steps=scale.rt_steps, batch_size=scale.batch_size,
                                       grad_accum=scale.grad_accum, seq_len=scale.seq_len, device=scale.device,
                                       bf16=scale.device == "cuda", compile=False, checkpoint_every=0)
        tuned = api.tune_router(RouterTuneConfig(merged=merged["embedding"], data=proxies, train=rt_train),
                                ck / "merged-rt", overwrite=True, progress=False).path
        rt_optout = {d: api.remove(tuned, d, ck / f"rt-optout-{d}", quiet).out for d in scale.domains}
        if scale.rt_owner_bytes:
            owners = [owner_sample(data / d / "train.jsonl", run / "rt-owner" / f"{d}.jsonl", scale.rt_owner_bytes)
                      for d in scale.domains]
            log(f"router tuning (oracle): proxy sets + {scale.rt_owner_bytes:,} bytes of each owner's text")
            tuned_oracle = api.tune_router(RouterTuneConfig(merged=merged["embedding"], data=proxies + owners,
                                                            train=rt_train),
                                           ck / "merged-rt-oracle", overwrite=True, progress=False).path
        timings["router_tuning"] = time.perf_counter() - t0

    log("evaluation")
    t0 = time.perf_counter()
    domains = {d: str(eval_files[d]) for d in ("public", *scale.domains)}

    def ev(model: Path, **kw) -> dict:
        cfg = EvalConfig(model=model, data=domains, max_bytes=scale.eval_bytes, device=scale.device,
                         bf16=scale.device == "cuda", progress=False, seq_len=scale.seq_len, batch_size=16, **kw)
        res = api.evaluate(cfg)
        return {"bpb": {d.domain: d.bpb for d in res.domains}, "mean": res.mean_bpb,
                "routing": None if res.routing is None else res.routing.to_json()}

    rows_out: dict[str, dict] = {"anchor": ev(anchor.path)}
    for d in scale.domains:
        rows_out[f"expert alone: {d}"] = ev(alone[d])
    for k in (1, 2, 4, n + 1):
        if k <= n + 1:
            label = "all" if k == n + 1 else str(k)
            extra = {"plots": out / "plots", "overwrite": True} if k == n + 1 else {}
            rows_out[f"FlexOlmo top-{label}"] = ev(merged["embedding"], top_k=k, **extra)
    rows_out["FlexOlmo, no bias"] = ev(merged["embedding"], top_k=n + 1, bias=False)
    rows_out["random router rows"] = ev(merged["random"], top_k=n + 1)
    rows_out["rows from anchor hidden states"] = ev(merged["hidden-mean"], top_k=n + 1)
    rows_out["model soup"] = ev(soup_dir)
    members = [alone[d] for d in scale.domains]
    rows_out["BTM ensemble (all)"] = ev(members[0], ensemble=members[1:], routing=False)
    rows_out["BTM ensemble (top-2)"] = ev(members[0], ensemble=members[1:], ensemble_top_k=min(2, n), routing=False)
    rows_out["no coordination"] = ev(merged["dense"], top_k=n + 1)
    for d in scale.domains:
        rows_out[f"opt-out: -{d}"] = ev(optout[d], top_k=n)
    if tuned is not None:
        rows_out["FlexOlmo + router tuning, top-2"] = ev(tuned, top_k=2)
        rows_out["FlexOlmo + router tuning, top-all"] = ev(tuned, top_k=n + 1)
        for d in scale.domains:
            rows_out[f"RT opt-out: -{d}"] = ev(rt_optout[d], top_k=n)
    if tuned_oracle is not None:
        rows_out["router tuning with owners' text (oracle), top-2"] = ev(tuned_oracle, top_k=2)
        rows_out["router tuning with owners' text (oracle), top-all"] = ev(tuned_oracle, top_k=n + 1)
    timings["eval"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    import torch
    import transformers

    meta = {"scale": args.scale, "scale_settings": scale.__dict__, "seed": args.seed,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "anchor": {"params": anchor.num_params, "steps": anchor.steps, "tokens": anchor.tokens,
                       "final_loss": anchor.final_loss, "tokens_per_s": anchor.tokens_per_s},
            "experts": {label: {"steps": c["steps"], "final_loss": c["final_loss"], "data": c["data"],
                                "router_source": c["router_source"], "wall_s": expert_wall[label]}
                        for label, c in cards.items()},
            "timings_s": timings}
    report = opt_out_report(rows_out, scale.domains)
    if tuned is not None:
        meta["opt_out_after_router_tuning"] = opt_out_report(rows_out, scale.domains,
                                                             reference="FlexOlmo + router tuning, top-all",
                                                             prefix="RT opt-out")
    write_results(out, rows_out, report, meta, ("public", *scale.domains))
    print((out / "results.md").read_text())
    log(f"total {timings['total']:.0f}s; results in {out}")


if __name__ == "__main__":
    main()
