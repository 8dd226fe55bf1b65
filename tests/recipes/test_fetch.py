"""Offline tests of the data recipe (recipes/data/): cleaning, chunking, held-out splits, archive readers."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "data"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"flexmoe_recipe_{name}", RECIPE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


T = _load("textops")
Doc = T.Doc


# ----------------------------------------------------------------------------- cleaning


def test_normalize_ws_keeps_indentation_and_collapses_blank_lines():
    raw = "\n\n  def f():\r\n      return 1   \r\n\n\n\n\x0cx = 2\t \n\n"
    assert T.normalize_ws(raw) == "  def f():\n      return 1\n\nx = 2"


def test_strip_front_matter_drops_only_the_leading_yaml_block():
    lic = "---\nkey: mit\nnotes: |\n    x\n---\n\nPermission is hereby granted.\n---\nnot yaml\n"
    assert T.strip_front_matter(lic) == "\nPermission is hereby granted.\n---\nnot yaml\n"
    assert T.strip_front_matter("Plain text\n---\nx\n---\n") == "Plain text\n---\nx\n---\n"


def test_dedupe_keeps_first_occurrence_in_order():
    docs = [Doc("s", "a", "one"), Doc("s", "b", "two"), Doc("s", "c", "one"), Doc("s", "d", "three")]
    assert [d.unit for d in T.dedupe(docs)] == ["a", "b", "d"]


# ----------------------------------------------------------------------------- chunking


def test_chunk_text_keeps_small_text_whole():
    assert T.chunk_text("a\n\nb", max_bytes=100) == ["a\n\nb"]
    assert T.chunk_text("") == []


def test_chunk_text_splits_at_paragraphs_and_loses_nothing():
    paras = [f"paragraph {i} " + "x" * (50 + 37 * (i % 7)) for i in range(200)]
    text = "\n\n".join(paras)
    chunks = T.chunk_text(text, target=1000, max_bytes=2000, min_bytes=500)
    assert len(chunks) > 5
    assert all(len(c.encode()) <= 2000 for c in chunks)
    assert all(len(c.encode()) >= 500 for c in chunks)
    assert "\n\n".join(chunks) == text  # boundaries fall between paragraphs only
    assert T.chunk_text(text, target=1000, max_bytes=2000, min_bytes=500) == chunks
    # Target close to the cap: a paragraph that would overflow starts the next chunk instead.
    text = "\n\n".join("w" * 700 for _ in range(10))
    assert [len(c) for c in T.chunk_text(text, target=1900, max_bytes=2000, min_bytes=100)] == [1402] * 5


def test_chunk_text_splits_an_oversized_paragraph():
    text = "\n".join("y" * 300 for _ in range(20)) + "\n\n" + "z" * 5000  # one 6 KB paragraph, one 5 KB line
    chunks = T.chunk_text(text, target=1000, max_bytes=2000, min_bytes=100)
    assert all(len(c.encode()) <= 2000 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


# ----------------------------------------------------------------------------- held-out splits


def test_pick_eval_units_is_deterministic_and_near_the_fraction():
    sizes = {f"unit{i}": 1000 + 10 * i for i in range(100)}
    a = T.pick_eval_units(sizes, 0.1, salt="code/cpython")
    assert a == T.pick_eval_units(dict(reversed(sizes.items())), 0.1, salt="code/cpython")
    assert a <= sizes.keys()
    share = sum(sizes[u] for u in a) / sum(sizes.values())
    assert 0.1 <= share <= 0.2
    assert a != T.pick_eval_units(sizes, 0.1, salt="other")


def test_pick_eval_units_passes_over_a_huge_unit():
    sizes = {"huge": 10_000, **{f"u{i}": 100 for i in range(20)}}
    assert "huge" not in T.pick_eval_units(sizes, 0.05, salt="s")
    assert T.pick_eval_units({"a": 50, "b": 60}, 0.01, salt="s") == {"a"}  # all too big: smallest
    assert T.pick_eval_units(sizes, 0.0, salt="s") == set()


def test_split_docs_is_disjoint_by_unit_and_drops_eval_text_from_train():
    docs = [Doc("kjv", "Genesis", "g1"), Doc("kjv", "Psalms", "p1"), Doc("kjv", "Genesis", "shared"),
            Doc("kjv", "Psalms", "shared"), Doc("kjv", "Psalms", "p1"), Doc("austen", "Psalms", "other")]
    train, ev = T.split_docs(docs, {("kjv", "Psalms")})
    assert [d.text for d in ev] == ["p1", "shared"]
    assert [d.text for d in train] == ["g1", "other"]  # same unit name, other source: still train
    assert not {(d.source, d.unit) for d in train} & {(d.source, d.unit) for d in ev}


def test_subsample_caps_bytes_keeps_order_and_is_deterministic():
    docs = [Doc("s", f"u{i}", f"doc {i} " + "x" * i) for i in range(50)]
    out = T.subsample(docs, 600, salt="s")
    assert sum(d.nbytes for d in out) <= 600
    assert out == T.subsample(docs, 600, salt="s")
    idx = [docs.index(d) for d in out]
    assert idx == sorted(idx)
    assert T.subsample(docs, 10**9, salt="s") == docs


# ----------------------------------------------------------------------------- archive readers


def _r_strsxp(strings: list[str | None]) -> bytes:
    # R XDR serialisation v3 of a character vector, as R's saveRDS writes it.
    i = lambda v: struct.pack(">i", v)  # noqa: E731
    out = b"X\n" + i(3) + i(0x040200) + i(0x030500) + i(5) + b"UTF-8" + i(16) + i(len(strings))
    for s in strings:
        out += i(0x40009) + i(-1) if s is None else i(0x40009) + i(len(s.encode())) + s.encode()
    return out


def test_r_lazyload_strings_walks_packed_objects():
    objs = [["EMMA", "", "By Jane Austen"], ["Persuasion", None, "Sir Walter Elliot, of Kellynch Hall"]]
    rdb = b"".join(struct.pack(">I", len(b)) + zlib.compress(b) for b in map(_r_strsxp, objs))
    assert T.r_lazyload_strings(rdb) == [objs[0], ["Persuasion", "", objs[1][2]]]


def test_dictd_entries_decodes_base64_offsets_and_skips_metadata():
    body = b"00-database-short\n  Test dict\n\nApple\n  A fruit.\n\nBanana\n  Yellow.\n"

    def b64(n: int) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        s = ""
        while True:
            s = alphabet[n % 64] + s
            n //= 64
            if not n:
                return s

    spans = {w: (body.index(w.encode()), len(t)) for w, t in
             [("00-database-short", "00-database-short\n  Test dict\n"), ("Apple", "Apple\n  A fruit.\n"),
              ("Banana", "Banana\n  Yellow.\n")]}
    index = "".join(f"{w}\t{b64(o)}\t{b64(n)}\n" for w, (o, n) in spans.items())
    index += f"apple\t{b64(spans['Apple'][0])}\t{b64(spans['Apple'][1])}\n"  # second headword, same text
    got = T.dictd_entries(index.encode(), gzip.compress(body))
    assert got == [("Apple", "Apple\n  A fruit.\n"), ("Banana", "Banana\n  Yellow.\n")]


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(f"./{name}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_deb_members_reads_the_data_tarball(tmp_path):
    deb = tmp_path / "x_1_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"control": b"Package: x\n"}),
                         "data.tar.xz": _tar_xz({"usr/share/doc/a.tex": b"\\section{A}", "usr/bin/b": b"bin"})}))
    assert list(T.deb_members(deb, lambda p: p.endswith(".tex"))) == [("usr/share/doc/a.tex", b"\\section{A}")]
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not a deb")
    with pytest.raises(T.FetchError, match="not a Debian package"):
        list(T.deb_members(bad, lambda p: True))


# ----------------------------------------------------------------------------- script entry points


def test_main_unknown_domain_is_a_one_line_error(tmp_path, capsys):
    fetch = _load("fetch")
    assert fetch.main(["--domains", "poetry", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fetch.py: error: unknown domain") and "\n" not in err
    assert not (tmp_path / "d" / "poetry").exists()


def test_pack_excludes_cache_and_refuses_oversize(tmp_path):
    fetch = _load("fetch")
    out = tmp_path / "data"
    (out / "code").mkdir(parents=True)
    (out / ".cache").mkdir()
    (out / ".cache" / "big.deb").write_bytes(b"x" * 1000)
    (out / "code" / "train.jsonl").write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    (out / "summary.json").write_text("{}")
    size = fetch.pack(out, tmp_path / "p.tar.gz", limit_mib=1)
    with tarfile.open(tmp_path / "p.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["data/code", "data/code/train.jsonl", "data/summary.json"]
    assert size == (tmp_path / "p.tar.gz").stat().st_size
    with pytest.raises(fetch.FetchError, match="over the"):
        fetch.pack(out, tmp_path / "q.tar.gz", limit_mib=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "p.tar.gz"]  # no partial pack left


# ----------------------------------------------------------------------------- committed fixtures


@pytest.mark.parametrize("domain", ["public", "code", "speeches"])
def test_fixtures_are_small_jsonl_with_text(domain):
    for split, cap in (("train", 8192), ("eval", 4096)):
        path = ROOT / "fixtures" / domain / f"{split}.jsonl"
        assert path.stat().st_size <= cap
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) >= (5 if split == "train" else 2)
        assert all(isinstance(r["text"], str) and 100 <= len(r["text"]) <= 1000 for r in rows)
    train = {json.loads(x)["text"] for x in (ROOT / "fixtures" / domain / "train.jsonl").read_text().splitlines()}
    ev = {json.loads(x)["text"] for x in (ROOT / "fixtures" / domain / "eval.jsonl").read_text().splitlines()}
    assert not train & ev
