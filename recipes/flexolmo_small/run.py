"""Small-scale FlexOlmo reproduction on real data (FLEXOLMO.md §5-6; issues 6 and 13).

    # once, on a CPU machine with network (data, broad public corpus, router rows with all-MiniLM-L6-v2):
    python recipes/flexolmo_small/prepare.py                       # -> .carry/flexolmo_small/
    # on one GPU, in two calls of under 5 minutes each on an H200 (or --stage all in one):
    python recipes/flexolmo_small/run.py --stage train --carry .carry/flexolmo_small
    python recipes/flexolmo_small/run.py --stage eval --out runs/flexolmo_small
    # the ablation that chose train-expert's router training (docs/router.md):
    python recipes/flexolmo_small/run.py --variants public-router,paper,default,public-route,clamp --seeds 1
    # the tiny CPU smoke version (fixtures, random embedder; what the test suite runs):
    python recipes/flexolmo_small/run.py --scale tiny --out runs/flexolmo_tiny
    # plus the extraction (privacy) table for one owner (issue 19, docs/privacy.md), in the eval stage:
    python recipes/flexolmo_small/run.py --stage eval --out runs/flexolmo_small --extraction math

Stages, each a call of `flexmoe.api` (or of the `flexmoe` CLI in parallel subprocesses, since data owners
train independently and a small model leaves most of a GPU idle):
1. train: `train-anchor --preset small` on the public split (its BPE is trained there too), r_pub from the
   prepared row file; then for every private domain and every variant (VARIANTS: the train-expert defaults, the
   paper's router training, ablations) and seed, `train-expert` from experts/<domain>.yaml for at least
   `expert_epochs` of the owner's text;
2. eval: merges, each owner's 2-expert model, opt-out (merged minus each expert); held-out BPB per domain and on
   windows that mix 4 domains in 256-token segments; BTM ensembles with a whole-window and a 128-token prefix;
   routing statistics; results.json / results.md with the issue's targets checked;
   with `--extraction OWNER`, also `audit-extraction` of that owner's training text (and, as a control, its
   held-out text) by the anchor, its expert alone, the merged model, the merged model minus it, and the
   no-coordination dense fine-tune (its FFN with the anchor; trained here if `dense` is not among the variants).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flexmoe import api, presets  # noqa: E402
from flexmoe.config import Device, EvalConfig, ExpertSpec, MergeConfig, RemoveConfig, TrainAnchorConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from report import write_results  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the recipe."""

    preset: str
    domains: tuple[str, ...]
    anchor_steps: int
    expert_epochs: float  # passes over each owner's training text (its steps are computed from its token count)
    batch_size: int  # sequences per micro-step (a quarter of them public text under the default router training)
    seq_len: int
    eval_bytes: int  # held-out bytes per domain
    parallel: int  # expert trainings at once
    device: str
    grad_accum: int = 1
    mixed_segment: int = 256  # tokens per domain segment of the mixed-domain windows
    btm_prefix: int = 128  # tokens of the short-prefix BTM posterior
    extract_prefixes: int = 1000  # --extraction: documents sampled, one prefix each
    extract_prefix_len: int = 32  # the paper's prefix length
    extract_gen_len: int = 64


SCALES = {
    # One H200: ~67M-parameter anchor (4+ epochs of the broad public text), each expert >= 1 epoch of its owner's.
    "small": Scale(preset="small", domains=("code", "math", "legal", "speeches"), anchor_steps=1000,
                   expert_epochs=1.0, batch_size=16, grad_accum=2, seq_len=1024, eval_bytes=250_000, parallel=4,
                   device="cuda"),
    # CPU smoke test on the bundled fixtures.
    "tiny": Scale(preset="tiny", domains=("code", "speeches"), anchor_steps=30, expert_epochs=1.0, batch_size=4,
                  seq_len=64, eval_bytes=3_000, parallel=1, device="cpu", mixed_segment=16, btm_prefix=16,
                  extract_prefixes=16, extract_prefix_len=8, extract_gen_len=16),
}

# Expert-spec overrides of each variant on top of the train-expert defaults (docs/router.md says which is which).
VARIANTS: dict[str, dict] = {
    "default": {},  # extension: 1/4 public text per batch, trained like owner text, projected bias; embedding rows
    "random": {"router.source": "random"},  # the default training from a random row (ablation)
    "paper": {"router_training.public_ratio": 0.0, "router_training.bias": "clamp"},  # owner text only
    "public-router": {"router_training.public_loss": "router"},  # public text trains only the router row and bias
    "public-route": {"router_training.public_loss": "router",  # ... plus -log p_public on the public tokens
                     "router_training.public_route_loss": 0.1},
    "clamp": {"router_training.bias": "clamp"},  # the default, but the paper's bias update
    "hidden-mean": {"router.source": "hidden-mean"},
    "dense": {"mode": "dense"},  # "no coordination": a dense fine-tune, its FFN taken as the expert
}
KEY_VARIANTS = ("default", "random")  # trained with every seed; the others with the first seed only


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_inputs(args, scale: Scale, run: Path) -> tuple[Path, dict[str, Path]]:
    """Data folder and router-row files (made here for the tiny scale)."""
    if scale.device == "cpu":
        data, rows_dir, embedder = ROOT / "fixtures", run / "rows", run / "embedder"
        if not (embedder / "modules.json").is_file():
            from flexmoe.testing import build_random_embedder

            build_random_embedder(embedder, dim=32)
        from flexmoe.config import EmbedConfig

        for dom in ("public", *scale.domains):
            if not (rows_dir / f"{dom}.safetensors").is_file():
                api.embed_domain(EmbedConfig(data=[data / dom / "train.jsonl"], embedder=embedder, num_docs=64,
                                             device="cpu"), rows_dir / f"{dom}.safetensors", progress=False)
    else:
        carry = Path(args.carry)
        data = run / "data"
        if not (data / "public" / "train.jsonl").is_file():
            with tarfile.open(carry / "data.tar.gz") as tar:
                tar.extractall(run, filter="data")  # the pack holds data/<domain>/...
        rows_dir = carry / "rows"
    return data, {d: rows_dir / f"{d}.safetensors" for d in ("public", *scale.domains)}


def expert_steps(scale: Scale, tokenizer, train_file: Path) -> int:
    """Optimizer steps for `scale.expert_epochs` passes over the owner's text, at the default's owner share."""
    from flexmoe.config import RouterTraining
    from flexmoe.data import load_documents
    from flexmoe.eval.bpb import tokenize

    tokens = sum(len(ids) + 1 for ids in tokenize(tokenizer, load_documents([train_file]).texts))
    owner_rows = scale.batch_size - RouterTraining().public_rows(scale.batch_size)
    return max(1, math.ceil(scale.expert_epochs * tokens / (owner_rows * scale.grad_accum * scale.seq_len)))


def expert_overrides(scale: Scale, anchor: Path, data: Path, dom: str, variant: str, seed: int, row: Path,
                     steps: int) -> dict:
    """Spec overrides on top of experts/<dom>.yaml for one variant and seed of one owner's training."""
    over = {"name": dom, "anchor": str(anchor), "data": [str(data / dom / "train.jsonl")],
            "router_training.public_data": [str(data / "public" / "train.jsonl")],
            "train.max_steps": steps, "train.batch_size": scale.batch_size, "train.seq_len": scale.seq_len,
            "train.grad_accum": scale.grad_accum, "train.device": scale.device, "train.bf16": scale.device == "cuda",
            "train.checkpoint_every": 0, "train.warmup_steps": max(1, steps // 10), "train.seed": seed,
            "router.seed": seed,
            # ~100-step runs of a small model: ~20 s of compiling would not pay back (and this is what was timed).
            "train.compile": False, "router.source": "row-file", "router.row_file": str(row)}
    return {**over, **VARIANTS[variant]}


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
            api.train_expert(ExpertSpec.load(spec, over), out, overwrite=True, progress=False)
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


def mixed_windows(eval_files: dict[str, Path], tokenizer, out: Path, *, segment: int, count: int, seed: int) -> Path:
    """`count` documents of 4 segments of `segment` tokens, each from another domain's held-out text (a random 4
    of the domains, random order and offsets): text whose domain changes inside one window."""
    from flexmoe.data import load_documents
    from flexmoe.eval.bpb import tokenize

    rng = random.Random(seed)
    ids = {d: [x for x in tokenize(tokenizer, load_documents([p]).texts) if len(x) > segment]
           for d, p in eval_files.items()}
    docs = []
    for _ in range(count):
        parts = []
        for dom in rng.sample(sorted(ids), min(4, len(ids))):
            doc = rng.choice(ids[dom])
            at = rng.randrange(len(doc) - segment)
            parts.append(tokenizer.decode(doc[at: at + segment]))
        docs.append("".join(parts))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return out


def active_params(anchor: Path) -> tuple[int, int]:
    """(parameters outside the FFNs, parameters of one FFN in every layer) of the anchor's OLMo-2 shape."""
    c = json.loads((anchor / "config.json").read_text())
    H, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = H * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    attn = 2 * H * H + 2 * H * kv + H + kv + 2 * H  # q, o, k, v projections; q/k norms; the two block norms
    shared = (1 if c.get("tie_word_embeddings") else 2) * V * H + L * attn + H
    return shared, L * 3 * H * I


def owner_biases(pkg: Path) -> list[float]:
    """The owner's effective expert bias min(b, 0) per layer, from its package."""
    from safetensors import safe_open

    with safe_open(str(pkg / "expert.safetensors"), "pt") as f:
        keys = sorted((k for k in f.keys() if k.endswith("router.bias")), key=lambda k: int(k.split(".")[2]))
        return [min(float(f.get_tensor(k).reshape(-1)[0]), 0.0) for k in keys]


def seeds_of(variant: str, seeds: list[int]) -> list[int]:
    return seeds if variant in KEY_VARIANTS else seeds[:1]


def stage_train(args, scale: Scale, run: Path, variants: list[str], seeds: list[int]) -> dict:
    t0 = time.perf_counter()
    data, rows = prepare_inputs(args, scale, run)
    timings = {"prepare": time.perf_counter() - t0}
    log(f"anchor: preset {scale.preset}, {scale.anchor_steps} steps")
    t0 = time.perf_counter()
    train = presets.training(scale.preset, max_steps=scale.anchor_steps, batch_size=scale.batch_size * scale.grad_accum,
                             seq_len=scale.seq_len, bf16=scale.device == "cuda", device=Device(scale.device),
                             checkpoint_every=0, compile=False)
    anchor = api.train_anchor(TrainAnchorConfig(data=[data / "public" / "train.jsonl"], public_row=rows["public"],
                                                preset=scale.preset, seed=args.seed, train=train),
                              run / "anchor", overwrite=True, progress=False)
    timings["anchor"] = time.perf_counter() - t0
    _release_gpu_memory()  # the expert processes need the memory this one cached while training the anchor
    log(f"  anchor: {anchor.num_params:,} params, {anchor.train.tokens:,} tokens "
        f"({anchor.train.tokens / anchor.num_params:.2f} per parameter), loss {anchor.train.final_loss:.3f}")

    from flexmoe.data import load_tokenizer

    tokenizer = load_tokenizer(anchor.path)
    steps = {d: expert_steps(scale, tokenizer, data / d / "train.jsonl") for d in scale.domains}
    log(f"experts: steps per domain {steps}; variants {variants}, seeds {seeds}, {scale.parallel} at a time")
    t0 = time.perf_counter()
    jobs = {f"{v}-s{s}/{d}": (f"experts/{d}.yaml",
                              expert_overrides(scale, anchor.path, data, d, v, s, rows[d], steps[d]),
                              run / "experts" / f"{v}-s{s}" / d)
            for v in variants for s in seeds_of(v, seeds) for d in scale.domains}
    wall = train_experts(jobs, scale.parallel, run / "logs")
    timings["experts"] = time.perf_counter() - t0
    experts = {}
    for label, (_, _, out) in jobs.items():
        card = json.loads((out / "expert.json").read_text())
        experts[label] = {"steps": card["steps"], "final_loss": card["final_loss"], "data": card["data"],
                          "router_source": card["router_source"], "wall_s": wall[label],
                          "router_training": card["hparams"].get("router_training"),
                          "epochs": card["steps"] * card["hparams"]["grad_accum"] * scale.seq_len
                          * (scale.batch_size - _public_rows(card, scale.batch_size)) / max(1, card["data"]["tokens"])}
        if (out / "expert.safetensors").is_file() and card["hparams"].get("mode") != "dense":
            experts[label]["bias"] = owner_biases(out)
    meta = {"anchor": {"params": anchor.num_params, "steps": anchor.train.steps, "tokens": anchor.train.tokens,
                       "tokens_per_param": anchor.train.tokens / anchor.num_params, "final_loss": anchor.train.final_loss,
                       "tokens_per_s": anchor.train.tokens_per_s},
            "experts": experts, "variants": variants, "seeds": seeds, "timings_s": timings,
            "public_corpus": _public_corpus(args)}
    (run / "train_stage.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _public_rows(card: dict, batch_size: int) -> int:
    from flexmoe.config import RouterTraining

    rt = card["hparams"].get("router_training") or {}
    return RouterTraining(public_ratio=rt.get("public_ratio") or 0.0).public_rows(batch_size)


def _public_corpus(args) -> dict | None:
    f = Path(args.carry) / "public_corpus.json"
    return json.loads(f.read_text()) if f.is_file() else None


def stage_eval(args, scale: Scale, run: Path, meta: dict) -> None:
    variants, seeds = meta["variants"], meta["seeds"]
    data = ROOT / "fixtures" if scale.device == "cpu" else run / "data"
    anchor = run / "anchor"
    domains = ("public", *scale.domains)
    n = len(scale.domains)
    timings = dict(meta["timings_s"])
    log("checkpoints: merges, 2-expert models, opt-outs")
    t0 = time.perf_counter()
    ck = run / "ckpt"
    pkg = {(v, s): [run / "experts" / f"{v}-s{s}" / d for d in scale.domains]
           for v in variants for s in seeds_of(v, seeds)}
    merged = {key: api.merge(MergeConfig(anchor, pkgs, top_k=2), ck / f"merged-{key[0]}-s{key[1]}", overwrite=True, progress=False).out for key, pkgs in pkg.items()}
    ref = variants[0]  # the variant the alone / BTM / opt-out rows are made of (the default)
    alone = {(s, d): api.merge(MergeConfig(anchor, [run / "experts" / f"{ref}-s{s}" / d], top_k=2), ck / f"alone-s{s}-{d}", overwrite=True, progress=False).out
             for s in seeds for d in scale.domains}
    optout = {d: api.remove(RemoveConfig(merged[(ref, seeds[0])], d), ck / f"optout-{d}", overwrite=True, progress=False).out for d in scale.domains}
    timings["checkpoints"] = time.perf_counter() - t0

    log("evaluation")
    t0 = time.perf_counter()
    from flexmoe.data import load_tokenizer

    eval_files = {d: data / d / "eval.jsonl" for d in domains}
    mixed = mixed_windows(eval_files, load_tokenizer(anchor), run / "mixed.jsonl", segment=scale.mixed_segment,
                          count=max(8, scale.eval_bytes // 4096), seed=args.seed)
    all_data = {**{d: str(p) for d, p in eval_files.items()}, "mixed": str(mixed)}
    shared, ffn = active_params(anchor)

    def ev(model: Path, data_sel=None, active: int = 0, plots: Path | None = None, **kw) -> dict:
        cfg = EvalConfig(model=model, data=data_sel or all_data, max_bytes=scale.eval_bytes, device=scale.device,
                         bf16=scale.device == "cuda", seq_len=scale.seq_len, batch_size=16, **kw)
        res = api.evaluate(cfg, plots=plots, overwrite=True, progress=False)
        bpb = {d.domain: d.bpb for d in res.domains}
        return {"bpb": bpb, "mean": sum(bpb[d] for d in domains if d in bpb) / sum(d in bpb for d in domains),
                "active_params": active, "routing": None if res.routing is None else res.routing.to_json()}

    rows: dict[str, dict] = {"anchor": ev(anchor, active=shared + ffn, routing=False)}
    for s in seeds:
        own = {d: ev(alone[(s, d)], {d: str(eval_files[d])}, routing=False)["bpb"][d] for d in scale.domains}
        rows[f"experts alone, own domain (s{s})"] = {"bpb": own, "mean": sum(own.values()) / n,
                                                     "active_params": shared + 2 * ffn, "routing": None}
    out = args.out
    for (v, s), m in merged.items():
        plots = {"plots": out / "plots"} if (v, s) == (ref, seeds[0]) else {}
        rows[f"{v} top-2 (s{s})"] = ev(m, active=shared + 2 * ffn, top_k=2, **plots)
        if v == ref:
            rows[f"{v} top-all (s{s})"] = ev(m, active=shared + (n + 1) * ffn, top_k=n + 1, routing=False)
            rows[f"{v} top-2, no bias (s{s})"] = ev(m, active=shared + 2 * ffn, top_k=2, bias=False, routing=False)
    for s in seeds:
        members = [alone[(s, d)] for d in scale.domains]
        for label, prefix in (("whole-window prefix", None), (f"{scale.btm_prefix}-token prefix", scale.btm_prefix)):
            rows[f"BTM, {label} (s{s})"] = ev(members[0], ensemble=members[1:], ensemble_prefix=prefix,
                                             active=n * (shared + 2 * ffn), routing=False)
    for d in scale.domains:
        rows[f"opt-out: -{d}"] = ev(optout[d], active=shared + 2 * ffn, top_k=2, routing=False)
    timings["eval"] = time.perf_counter() - t0
    extraction = None
    if args.extraction:
        t0 = time.perf_counter()
        owner, s0 = args.extraction, seeds[0]
        models = {"anchor (public model)": anchor, f"{owner} expert alone (2-expert)": alone[(s0, owner)],
                  f"merged ({ref} top-2)": merged[(ref, s0)], f"merged minus {owner} (opt-out)": optout[owner],
                  "no coordination: dense fine-tune's FFN + anchor (2-expert)":
                      dense_alone(args, scale, run, owner, s0)}
        extraction = extraction_rows(args, scale, models, data / owner, out / "extraction")
        timings["extraction"] = time.perf_counter() - t0
    timings["total"] = sum(v for k, v in timings.items() if k != "total")

    import torch
    import transformers

    meta = {**meta, "scale": args.scale, "scale_settings": asdict(scale), "seed": args.seed, "reference": ref,
            **({"extraction": {"owner": args.extraction, **extraction}} if extraction else {}),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "timings_s": timings}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, rows, meta, scale.domains)
    print((out / "results.md").read_text())
    log(f"total {timings['total']:.0f}s; results in {out}")


def dense_alone(args, scale: Scale, run: Path, owner: str, seed: int) -> Path:
    """The no-coordination baseline of `owner` (a dense fine-tune of the anchor, its FFN taken as the expert) merged
    alone with the anchor, as the `dense` variant's experts are merged. Trained here (one library call) when the
    train stage did not train the `dense` variant."""
    from flexmoe.data import load_tokenizer

    anchor, pkg = run / "anchor", run / "experts" / f"dense-s{seed}" / owner
    if not _trained_on(pkg, anchor):
        data, rows = prepare_inputs(args, scale, run)
        steps = expert_steps(scale, load_tokenizer(anchor), data / owner / "train.jsonl")
        log(f"  training the dense (no coordination) {owner} expert: {steps} steps")
        over = expert_overrides(scale, anchor, data, owner, "dense", seed, rows[owner], steps)
        train_experts({f"dense-s{seed}/{owner}": (f"experts/{owner}.yaml", over, pkg)}, 1, run / "logs")
    return api.merge(MergeConfig(anchor, [pkg], top_k=2), run / "ckpt" / f"alone-dense-s{seed}-{owner}", overwrite=True, progress=False).out


def _trained_on(pkg: Path, anchor: Path) -> bool:
    """Whether `pkg` is an expert package of this anchor (not one left by an earlier run's anchor)."""
    card = pkg / "expert.json"
    return card.is_file() and json.loads(card.read_text())["anchor_fingerprint"] == json.loads(
        (anchor / "flexmoe_anchor.json").read_text())["fingerprint"]


def extraction_rows(args, scale: Scale, models: dict[str, Path], owner_data: Path, out: Path) -> dict:
    """`audit-extraction` of each model on the owner's training text and, as a control (text the owner's model never
    saw, so what it reproduces there is predictability, not memorisation), on its held-out text."""
    from flexmoe.config import ExtractionConfig

    rows = {}
    for i, (label, model) in enumerate(models.items()):
        rows[label] = {}
        for split in ("train", "eval"):
            cfg = ExtractionConfig(model=model, data=[owner_data / f"{split}.jsonl"],
                                   prefixes=scale.extract_prefixes, prefix_len=scale.extract_prefix_len,
                                   gen_len=scale.extract_gen_len, seed=args.seed, device=scale.device)
            out.mkdir(parents=True, exist_ok=True)
            r = api.audit_extraction(cfg, out / f"{i}-{split}.json", overwrite=True, progress=False).to_json()
            rows[label][split] = {k: r[k] for k in ("model", "n", "documents", "skipped_short", "exact_match",
                                                    "lcp_half", "lcp_mean", "paper_similarity", "fast", "wall_s")}
        log(f"  extraction {label}: exact {rows[label]['train']['exact_match']['rate']:.4f} on train, "
            f"{rows[label]['eval']['exact_match']['rate']:.4f} on held-out")
    return {"prefix_len": scale.extract_prefix_len, "gen_len": scale.extract_gen_len,
            "prefixes": scale.extract_prefixes, "seed": args.seed, "rows": rows}


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    os.chdir(ROOT)  # experts/*.yaml and the default runs/ paths are relative to the repository
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--stage", choices=("all", "train", "eval"), default="all",
                    help="train: anchor + experts; eval: merges, evaluation, report (reads what train left)")
    ap.add_argument("--variants", default="default,random,paper",
                    help=f"comma-separated, the first is the reference; of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=2, help=f"seeds of the key variants {KEY_VARIANTS}")
    ap.add_argument("--carry", type=Path, default=Path(".carry/flexolmo_small"), help="output of prepare.py")
    ap.add_argument("--out", type=Path, default=Path("runs/flexolmo_small"), help="results folder")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints folder (default: runs/<scale>-work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=None, help="expert trainings at once (default: the scale's)")
    ap.add_argument("--extraction", metavar="OWNER", default=None,
                    help="eval stage: also audit how much of OWNER's training text each model reproduces (issue 19)")
    args = ap.parse_args()
    scale = SCALES[args.scale]
    if args.parallel:
        scale = replace(scale, parallel=args.parallel)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        sys.exit(f"unknown variant {unknown[0] if unknown else '(none)'}: use {', '.join(VARIANTS)}")
    if args.extraction is not None and args.extraction not in scale.domains:
        sys.exit(f"--extraction {args.extraction}: not an owner of scale {args.scale} ({', '.join(scale.domains)})")
    run = args.work or Path(f"runs/flexolmo_{args.scale}-work")
    run.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "train"):
        meta = stage_train(args, scale, run, variants, list(range(args.seed, args.seed + args.seeds)))
    else:
        f = run / "train_stage.json"
        if not f.is_file():
            sys.exit(f"{f} not found: run --stage train first (same --work)")
        meta = json.loads(f.read_text())
    if args.stage in ("all", "eval"):
        stage_eval(args, scale, run, meta)


if __name__ == "__main__":
    main()
