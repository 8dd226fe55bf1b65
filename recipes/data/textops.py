"""Pure, offline helpers of the data recipe: archive readers, cleaning, chunking and held-out splits.

Nothing here touches the network, so `tests/recipes/test_fetch.py` exercises all of it in milliseconds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


class FetchError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


@dataclass
class Doc:
    source: str
    unit: str
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode())


# ----------------------------------------------------------------------------- archive readers


def deb_members(deb: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield (path, bytes) of regular files in a .deb's data.tar whose path passes `want`.

    Reads the ar container directly (same bytes as `dpkg-deb -x`), so no dpkg is needed.
    """
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb.name} is not a Debian package (bad ar magic); delete it and rerun")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            f.read(size % 2)
            if not name.startswith("data.tar"):
                continue
            if name.endswith(".zst"):
                raise FetchError(f"{deb.name}: zstd data.tar is not supported by this script")
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                for m in tar:
                    path = m.name.lstrip("./")
                    if m.isfile() and want(path):
                        yield path, tar.extractfile(m).read()
            return


def zip_members(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        for n in sorted(z.namelist()):
            if want(n):
                yield n, z.read(n)


def tar_members(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and want(m.name):
                yield m.name, tar.extractfile(m).read()


def r_lazyload_strings(rdb: bytes) -> list[list[str]]:
    """Character vectors stored in an R lazy-load DB (`Rdata.rdb`), in file order.

    Each object is a 4-byte big-endian length + a zlib stream of R's XDR serialisation; the streams are
    packed back to back, so walking them needs no `.rdx` index. Only STRSXP objects are decoded, which is
    all janeaustenr holds (one line of a novel per element).
    """
    out, pos = [], 0
    while pos < len(rdb):
        d = zlib.decompressobj()
        obj = d.decompress(rdb[pos + 4:])
        pos = len(rdb) - len(d.unused_data)
        out.append(_r_strsxp(obj))
    return out


def _r_strsxp(b: bytes) -> list[str]:
    if b[:2] != b"X\n":
        raise FetchError("janeaustenr data is not in R's XDR format; the pinned package changed?")

    def i32(p: int) -> int:
        return int.from_bytes(b[p:p + 4], "big", signed=True)

    p = 2 + 12  # format, then serialisation version, R version, minimal R version
    if i32(2) == 3:
        p += 4 + i32(p)  # native encoding name
    if i32(p) & 0xFF != 16:
        raise FetchError("janeaustenr object is not a character vector; the pinned package changed?")
    n, p = i32(p + 4), p + 8
    strings = []
    for _ in range(n):
        ln = i32(p + 4)
        p += 8
        if ln < 0:
            strings.append("")  # NA_character_
            continue
        strings.append(b[p:p + ln].decode("utf-8", errors="replace"))
        p += ln
    return strings


def _b64_int(s: str) -> int:
    # dictd index numbers: base64 digits, most significant first.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    v = 0
    for ch in s:
        v = v * 64 + alphabet.index(ch)
    return v


def dictd_entries(index: bytes, dict_dz: bytes) -> list[tuple[str, str]]:
    """(headword, text) of every entry of a dictd database, in file order, metadata entries dropped."""
    body = gzip.decompress(dict_dz)  # dictzip is gzip with an extra header field
    spans: dict[tuple[int, int], str] = {}
    for line in index.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        key = (_b64_int(parts[1]), _b64_int(parts[2]))
        spans.setdefault(key, parts[0])  # several headwords can point at one definition
    return [(w, body[o:o + n].decode("utf-8", errors="replace")) for (o, n), w in sorted(spans.items())]


# ----------------------------------------------------------------------------- pure text functions


def normalize_ws(text: str) -> str:
    """CRLF → LF, no trailing spaces, no control characters but tab/newline, at most one blank line in a row.

    Leading indentation is kept (code), so only blank lines are stripped from the ends.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def strip_front_matter(text: str) -> str:
    """Drop a leading YAML front matter block (`---` … `---`), as in scancode's *.LICENSE files."""
    m = re.match(r"---[ \t]*\r?\n.*?\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    return text[m.end():] if m else text


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def dedupe(docs: Iterable[Doc]) -> list[Doc]:
    """Drop exact duplicates by text, keeping the first occurrence."""
    seen: set[str] = set()
    out = []
    for d in docs:
        k = text_key(d.text)
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


def chunk_text(text: str, target: int = 8192, max_bytes: int = 16384, min_bytes: int = 4096) -> list[str]:
    """Split text into chunks of about `target` bytes at paragraph boundaries (lines, then characters,
    only for a paragraph longer than `max_bytes`). Text shorter than `max_bytes` stays whole; a short tail
    is merged into the previous chunk when that stays under `max_bytes`.
    """
    if len(text.encode()) <= max_bytes:
        return [text] if text else []
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if len(para.encode()) <= max_bytes:
            pieces.append(para)
            continue
        for line in para.split("\n"):  # an oversized paragraph: fall back to lines, then characters
            while len(line.encode()) > max_bytes:
                cut = max_bytes // 4  # a UTF-8 character is at most 4 bytes
                pieces.append(line[:cut])
                line = line[cut:]
            pieces.append(line)
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for piece in pieces:
        n = len(piece.encode()) + 2
        if cur and size + n > max_bytes:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += n
        if size >= target:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if chunks and len(tail.encode()) < min_bytes and len(chunks[-1].encode()) + len(tail.encode()) + 2 <= max_bytes:
            chunks[-1] = chunks[-1] + "\n\n" + tail
        else:
            chunks.append(tail)
    return [c for c in (c.strip("\n") for c in chunks) if c.strip()]


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def pick_eval_units(unit_bytes: dict[str, int], frac: float, salt: str) -> set[str]:
    """Deterministically choose whole units to hold out, about `frac` of all bytes.

    Units are visited in a salted-hash order and taken while the held-out share is below `frac`; a unit
    that would push it past twice `frac` is passed over, so one huge unit cannot swallow the eval split.
    If every unit is too big, the smallest one is held out.
    """
    if not unit_bytes or frac <= 0:
        return set()
    total = sum(unit_bytes.values())
    chosen: set[str] = set()
    got = 0
    for u in sorted(unit_bytes, key=lambda u: (_stable_hash(f"{salt}:{u}"), u)):
        if got >= frac * total:
            break
        if got + unit_bytes[u] <= 2 * frac * total:
            chosen.add(u)
            got += unit_bytes[u]
    if not chosen and len(unit_bytes) > 1:
        chosen.add(min(unit_bytes, key=lambda u: (unit_bytes[u], u)))
    return chosen


def subsample(docs: list[Doc], max_bytes: int, salt: str) -> list[Doc]:
    """At most `max_bytes` of docs, chosen in a salted-hash order, returned in their original order."""
    if sum(d.nbytes for d in docs) <= max_bytes:
        return docs
    keep: set[int] = set()
    got = 0
    for i in sorted(range(len(docs)), key=lambda i: _stable_hash(f"{salt}:{text_key(docs[i].text)}")):
        if got + docs[i].nbytes > max_bytes:
            continue
        keep.add(i)
        got += docs[i].nbytes
    return [d for i, d in enumerate(docs) if i in keep]




def split_docs(docs: list[Doc], eval_units: set[tuple[str, str]]) -> tuple[list[Doc], list[Doc]]:
    """(train, eval) by (source, unit); eval text is deduped first so no eval chunk also appears in train."""
    ev = dedupe(d for d in docs if (d.source, d.unit) in eval_units)
    seen = {text_key(d.text) for d in ev}
    tr = [d for d in dedupe(d for d in docs if (d.source, d.unit) not in eval_units) if text_key(d.text) not in seen]
    return tr, ev

def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
