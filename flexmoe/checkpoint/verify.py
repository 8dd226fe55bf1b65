"""`flexmoe verify`: every byte of a flexmoe folder against its manifest, then what the folder kind promises.

- every file: size and sha256 against the manifest in the folder's flexmoe JSON (flexmoe/io/manifest.py);
- the folder opens as its kind (headers, shapes, config agree), through the readers every verb uses;
- anchor: its tensors still hash to its recorded fingerprint;
- merged (or tuned) checkpoint: its shared tensors still hash to the recorded anchor fingerprint, and every
  expert's card names that same anchor;
- expert package: its card names an anchor fingerprint.
Like inspection, it imports neither training code nor transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexmoe.errors import CheckpointError
from flexmoe.io import manifest
from flexmoe.io.anchor import ANCHOR_META, ANCHOR_REMAKE
from flexmoe.io.jsonfile import read_json
from flexmoe.io.merged import MERGED_META, MERGED_REMAKE
from flexmoe.io.package import PACKAGE_CARD, PACKAGE_REMAKE


@dataclass
class Check:
    what: str
    ok: bool
    detail: str


@dataclass
class VerifyResult:
    path: Path
    kind: str  # "anchor" | "expert package" | "merged checkpoint"
    checks: list[Check] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)  # what a folder written before manifests cannot say

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def report(self) -> str:
        """The human report: one line per check, then what could not be checked."""
        lines = [f"{self.kind} {self.path}: {'OK' if self.ok else 'DAMAGED'}"]
        lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.what}: {c.detail}" for c in self.checks]
        lines += [f"  not checked: {n}" for n in self.not_checked]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "not_checked": self.not_checked}


def check_files(path: str | Path) -> None:
    """What every loader does first: the manifest of the folder's own flexmoe JSON (merged, package or anchor),
    sizes of all files and sha256 of the small ones. `IntegrityError` names a damaged file; no manifest: no-op."""
    path = Path(path)
    for name, remake in ((MERGED_META, MERGED_REMAKE), (PACKAGE_CARD, PACKAGE_REMAKE), (ANCHOR_META, ANCHOR_REMAKE)):
        if (path / name).is_file():
            meta = read_json(path / name, "flexmoe folder")
            manifest.check(path, meta, name, remake=remake, hashed=manifest.small_files(meta))
            return


def _kind(path: Path) -> tuple[str, str]:
    if (path / PACKAGE_CARD).is_file():
        return "expert package", PACKAGE_CARD
    if (path / MERGED_META).is_file():
        return "merged checkpoint", MERGED_META
    if (path / ANCHOR_META).is_file():
        return "anchor", ANCHOR_META
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    raise CheckpointError(f"{path}: not a flexmoe folder (no {PACKAGE_CARD}, {MERGED_META} or {ANCHOR_META})")


def _run(res: VerifyResult, what: str, fn) -> object:
    """Record `fn()` as a check: its return value (a detail string, or (detail, ok)) or the error it raises."""
    try:
        out = fn()
    except CheckpointError as e:
        res.checks.append(Check(what, False, str(e)))
        return None
    detail, ok = out if isinstance(out, tuple) else (out, True)
    res.checks.append(Check(what, ok, detail))
    return ok


def verify(path: str | Path) -> VerifyResult:
    """Check a flexmoe folder completely (see the module docstring). Never raises for damage it finds: each
    problem is a failed `Check`; `CheckpointError` only when `path` is no flexmoe folder at all."""
    from flexmoe.io.fingerprint import anchor_fingerprint, merged_anchor_fingerprint

    path = Path(path)
    kind, meta_name = _kind(path)
    res = VerifyResult(path=path, kind=kind)
    try:
        meta = read_json(path / meta_name, kind)
    except CheckpointError as e:
        res.checks.append(Check(f"{meta_name} readable", False, str(e)))
        return res

    def files():
        listed = manifest.entries(meta, path / meta_name)
        if listed is None:
            res.not_checked.append(f"file sizes and sha256: {meta_name} has no manifest (written before flexmoe "
                                   "recorded one); only structure and fingerprints were checked")
            return "no manifest"
        manifest.check(path, meta, meta_name, remake="the command that wrote it", hashed=("*",))
        return f"{len(listed)} files, sizes and sha256 as recorded"

    _run(res, "files", files)
    if kind == "anchor":
        from flexmoe.io.anchor import read_anchor

        def fingerprint():
            read_anchor(path)  # opens as an anchor: metadata, router file
            want, got = meta.get("fingerprint"), anchor_fingerprint(path)
            return (want, True) if got == want else (f"tensors hash to {got}, {ANCHOR_META} records {want}", False)

        _run(res, "opens as an anchor, tensors match its fingerprint", fingerprint)
    elif kind == "merged checkpoint":
        from flexmoe.io.merged import read_merged

        def opens():
            read_merged(path).close()
            return "ok"

        if _run(res, "opens as a merged checkpoint", opens):
            want = meta["anchor_fingerprint"]
            got = merged_anchor_fingerprint(path)
            res.checks.append(Check("shared tensors match the anchor fingerprint", got == want,
                                    want if got == want else f"tensors hash to {got}, {MERGED_META} records {want}"))
            for e in meta["experts"][1:]:
                card = e.get("card") or {}
                same = card.get("anchor_fingerprint") == want
                res.checks.append(Check(f"expert {e['name']}: card names this anchor", same,
                                        "ok" if same else f"card says {card.get('anchor_fingerprint')}"))
    else:
        from flexmoe.io.package import read_package

        def opens():
            pkg = read_package(path)
            pkg.reader.close()
            return f"{pkg.num_layers} layers, anchor {pkg.card.anchor_fingerprint}"

        _run(res, "opens as an expert package", opens)
    return res

