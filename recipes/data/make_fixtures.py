#!/usr/bin/env python3
"""Rebuild the tiny committed fixtures `fixtures/{public,code,speeches}/{train,eval}.jsonl`.

    python recipes/data/make_fixtures.py                 # uses the download cache of data/.cache
    python recipes/data/make_fixtures.py --cache /tmp/c --out /tmp/fixtures

Only public-domain text (KJV, Austen, Shakespeare, State of the Union) and a few whole functions of the
CPython standard library; eval pieces come from other units (book, novel, play, module, speech) than the
train pieces. See fixtures/README.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sources import load_austen, load_kjv, load_shakespeare, load_sotu  # noqa: E402
from textops import write_atomic  # noqa: E402


def paragraphs(text: str) -> list[str]:
    return [re.sub(r"[ \t]+", " ", p.strip()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def pieces(text: str, n: int, lo: int = 300, hi: int = 800, unwrap: bool = False) -> list[str]:
    """Up to `n` runs of whole paragraphs of `lo`..`hi` characters; `unwrap` joins wrapped prose lines."""
    out: list[str] = []
    cur = ""
    for p in paragraphs(text):
        if unwrap:
            p = re.sub(r"\s*\n\s*", " ", p)
        if len(p) > hi:
            p = p[:hi].rsplit(" ", 1)[0]
        if cur and len(cur) + 2 + len(p) > hi:
            if len(cur) >= lo:
                out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
        if len(out) >= n:
            break
    if cur and len(cur) >= lo and len(out) < n:
        out.append(cur)
    return out[:n]


def chapter_verses(book_text: str, chapter: int) -> list[str]:
    m = re.search(rf"^\S[^\n]* {chapter}\n(.*?)(?=^\S[^\n]* \d+\n|\Z)", book_text, re.S | re.M)
    verses = re.split(r"\n\s+(?=\d+ )", "\n" + m.group(1).strip("\n"))
    return [re.sub(r"\s+", " ", v).strip() for v in verses if v.strip()]


def verse_groups(verses: list[str], head: str, lo: int = 300, hi: int = 800) -> list[str]:
    out: list[str] = []
    cur = head
    for v in verses:
        if len(cur) + 1 + len(v) > hi and len(cur) >= lo:
            out.append(cur)
            cur = head
        cur = f"{cur}\n{v}"
    if len(cur) >= lo:
        out.append(cur)
    return out


def functions(module: str, n: int) -> list[str]:
    """The first `n` whole top-level or nested functions of 250..800 characters of a stdlib module."""
    src = (Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py").read_text()
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef):
            s = ast.get_source_segment(src, node)
            if 250 <= len(s) <= 800:
                out.append(s)
    return out[:n]


def write(out: Path, domain: str, split: str, docs: list[str], cap: int) -> None:
    lines: list[str] = []
    size = 0
    for d in docs:
        line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
        if size + len(line.encode()) <= cap:
            lines.append(line)
            size += len(line.encode())
    write_atomic(out / domain / f"{split}.jsonl", "".join(lines).encode())
    print(f"{domain}/{split}: {len(lines)} docs, {size} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="data/.cache", help="download cache shared with fetch.py")
    ap.add_argument("--out", default="fixtures")
    args = ap.parse_args()
    cache, out = Path(args.cache), Path(args.out)

    def by_unit(docs):
        return {d.unit: d.text for d in docs}

    austen, kjv, shk = by_unit(load_austen(cache)), by_unit(load_kjv(cache)), by_unit(load_shakespeare(cache))

    def austen_ch1(title: str, n: int) -> list[str]:
        t = austen[title]
        return pieces(t[t.index("Chapter 1"):], n, 300, 600, unwrap=True)

    def play(name: str, start: str, n: int) -> list[str]:
        t = shk[name]
        return pieces(t[t.index(start):], n)

    write(out, "public", "train", verse_groups(chapter_verses(kjv["Genesis"], 1), "Genesis 1")[:2]
          + austen_ch1("pride_and_prejudice", 4) + play("hamlet", "To be, or not to be", 3), 8000)
    write(out, "public", "eval", verse_groups(chapter_verses(kjv["Psalms"], 23), "Psalms 23")[:1]
          + austen_ch1("persuasion", 2)[:1] + play("macbeth", "To-morrow, and to-morrow", 1), 3000)

    write(out, "code", "train", functions("colorsys", 4) + functions("bisect", 3) + functions("textwrap", 3)
          + functions("fnmatch", 2), 8000)
    write(out, "code", "eval", functions("heapq", 4), 3000)

    sotu = by_unit(load_sotu(cache))
    write(out, "speeches", "train", pieces(sotu["1790-Washington-1"], 4) + pieces(sotu["1863-Lincoln-1"], 4)
          + pieces(sotu["1934-Roosevelt-1"], 3) + pieces(sotu["1962-Kennedy-1"], 3), 8000)
    write(out, "speeches", "eval", pieces(sotu["1800-Adams-1"], 2) + pieces(sotu["1960-Eisenhower-1"], 2), 3000)


if __name__ == "__main__":
    main()
