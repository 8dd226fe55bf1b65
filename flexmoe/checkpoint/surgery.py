"""Checkpoint surgery: merge, add, remove and extract, as key-level streaming ops on safetensors.

Every verb first plans its output: a list of tensors (name, dtype, shape, source). The plan is sorted in one
canonical order that depends only on the output names, then streamed through a `ShardWriter`. Shared and FFN
tensors are copied as raw bytes in the kernel; only the router (E, hidden) and the biases (E,) of one layer are
ever built in memory. Because the order and the shard plan depend only on the output tensors, remove(merge(A,B,C),
C) and merge(A,B) write byte-identical files, not just equal tensors. All validation happens before the
temporary output folder is created, so bad input leaves nothing behind. The one check that cannot come first is
the sha256 of the large input shards, hashed while they are read (`LazyReader.hash_reads`): a mismatch fails the
verb before its output is renamed into place, so damaged input still leaves nothing behind.

No torch.nn, no transformers, no training code: this module runs where only the I/O layer is installed.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from flexmoe.config import AddConfig, ExtractConfig, MergeConfig, RemoveConfig, parse_size
from flexmoe.errors import CheckpointError, ConfigError, FingerprintMismatch
from flexmoe.io import hf_config
from flexmoe.io.anchor import ANCHOR_META, ANCHOR_ROUTER, AnchorMeta, EmbedderIdentity, read_anchor
from flexmoe.io.families import Family
from flexmoe.io.atomic import atomic_dir, check_output
from flexmoe.io.fingerprint import anchor_fingerprint, merged_anchor_fingerprint
from flexmoe.io.merged import BIAS_FILE  # noqa: F401  (re-exported: the sidecar's name)
from flexmoe.io.merged import (DEFAULT_TOP_K, MERGED_META, NO_SHARD_LIMIT, ROUTER_TUNING, Merged, dump_json,
                               moe_config, merged_meta, read_json, read_merged, write_merged_files)
from flexmoe.io.package import (PACKAGE_CARD, PACKAGE_TENSORS, PUBLIC_NAME, ExpertPackage, package_keys,
                                read_package, validate_expert_name)
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import DTYPE_TO_TORCH, TensorSpec
from flexmoe.io.writer import ShardWriter
from flexmoe.io.keys import (FFN_PROJS, dense_ffn_key, expert_key, natural_order, package_bias_key,
                                package_row_key, parse_dense_ffn, parse_expert_key, parse_router_key, router_key)


# ---------------------------------------------------------------- results

@dataclass
class CheckpointResult:
    """What merge / add / remove wrote."""

    out: Path
    experts: list[str]  # router order; "public" first
    top_k: int
    top_k_before: int | None  # add/remove: the input's top-k
    shards: list[str]
    total_bytes: int
    anchor_fingerprint: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


@dataclass
class PackageResult:
    """What extract / import-expert wrote: one expert package."""

    out: Path
    name: str
    num_layers: int
    total_bytes: int
    anchor_fingerprint: str
    seconds: float

    def to_json(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


# ---------------------------------------------------------------- streaming core

@dataclass
class PlannedTensor:
    """One output tensor and how to produce it."""

    spec: TensorSpec
    emit: Callable[[ShardWriter], None]


def copy_item(name: str, reader: LazyReader, key: str) -> PlannedTensor:
    spec = reader.spec(key)
    return PlannedTensor(TensorSpec(name, spec.dtype, spec.shape), lambda w: w.copy_from(name, reader, key))


def built_item(name: str, dtype: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> PlannedTensor:
    return PlannedTensor(TensorSpec(name, dtype, shape), lambda w: w.write(name, make()))


class _OnDisk:
    """A shard sink taking canonical tensor names and writing them under `to_disk`'s (the family's on-disk names)."""

    def __init__(self, writer, to_disk: Callable[[str], str]):
        self.w, self.to_disk = writer, to_disk

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.w.write(self.to_disk(name), tensor)

    def copy_from(self, name: str, reader: LazyReader, key: str) -> None:
        self.w.copy_from(self.to_disk(name), reader, key)


MAX_SHARD_THREADS = 8  # shards written at once; each holds at most one built tensor in memory


def stream_items(out_dir: Path, items: list[PlannedTensor], *, sources: list[LazyReader], max_shard_bytes: int,
                 prefix: str, progress: bool, desc: str, to_disk: Callable[[str], str] | None = None) -> list[str]:
    """Write `items` in canonical order through one ShardWriter; returns the shard file names. The large shards
    of `sources` (every reader the items read) are hashed while they are read and checked at the end.
    `to_disk`: the family's canonical → on-disk tensor names (`Family.to_disk`), applied to every item."""
    if to_disk is not None:
        items = [PlannedTensor(TensorSpec(to_disk(it.spec.name), it.spec.dtype, it.spec.shape), it.emit) for it in items]
    items = sorted(items, key=lambda it: natural_order(it.spec.name))
    total = sum(it.spec.nbytes for it in items)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if progress else True)
    for r in sources:
        r.hash_reads()
    by_name = {it.spec.name: it for it in items}
    bar_lock = threading.Lock()

    def emit(name: str, shard) -> None:
        it = by_name[name]
        it.emit(shard if to_disk is None else _OnDisk(shard, to_disk))
        with bar_lock:
            bar.update(it.spec.nbytes)

    try:
        with ShardWriter(out_dir, [it.spec for it in items], max_shard_bytes=max_shard_bytes, prefix=prefix) as w:
            # every shard on a thread of its own: a shard's sha256 is sequential (~1.7 GB/s a core), so one
            # shard at a time would leave the copy waiting on one hashing core
            w.write_parallel(emit, workers=min(w.num_shards, os.cpu_count() or 1, MAX_SHARD_THREADS))
            names = w.finalize()
    finally:
        bar.close()
    for r in sources:
        r.check_reads()
    return names


@contextmanager
def sealed_output(out: Path, overwrite: bool, seal: str = MERGED_META) -> Iterator[Path]:
    """`atomic_dir` sealed with its manifest, with OS failures (disk full, permissions) as one-line
    `CheckpointError`s."""
    try:
        with atomic_dir(out, overwrite, seal=seal) as tmp:
            yield tmp
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from e


def _same_path(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def refuse_input_as_output(out: Path, inputs: list[Path]) -> None:
    for p in inputs:
        if _same_path(out, p):
            raise ConfigError(f"--out {out} is one of the inputs; choose another folder")


def _resolve_top_k(requested: int | None, num_experts: int, family: Family | None = None) -> int:
    """Effective top-k: `requested` (or DEFAULT_TOP_K) clamped to the number of experts present. A family whose
    router renormalises the top-k weights (Mixtral) is FlexOlmo's routing only at k = E: E, and k < E refused."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--top-k must be at least 1, got {requested}")
    if family is not None and family.renormalises:
        if requested is not None and requested < num_experts:
            raise ConfigError(f"--top-k {requested}: {family.moe_label} renormalises the top-k routing weights, so "
                              f"only k = E is FlexOlmo's routing; use --top-k {num_experts} (or leave it out)")
        return num_experts
    return min(requested or DEFAULT_TOP_K, num_experts)


# ---------------------------------------------------------------- package checks

def _check_package(pkg: ExpertPackage, *, fingerprint: str, embedder: EmbedderIdentity | None, num_layers: int,
                   hidden: int, ffn_spec: Callable[[int, str], TensorSpec]) -> None:
    """Refuse a package of another anchor, router space or shape, naming the expert and the tensor."""
    name = pkg.card.name
    if pkg.card.anchor_fingerprint != fingerprint:
        raise FingerprintMismatch(f"expert {name!r} ({pkg.path}) was trained on anchor {pkg.card.anchor_fingerprint[:23]}..., "
                                  f"not this one ({fingerprint[:23]}...); retrain it against this anchor")
    theirs = pkg.card.embedder if isinstance(pkg.card.embedder, dict) else None
    if embedder is not None and theirs and theirs.get("sha256") not in (None, embedder.sha256):
        # Router rows made by another embedder live in another space: the merged router would be meaningless.
        raise CheckpointError(f"expert {name!r}: router row made with embedder {theirs.get('name')!r} "
                              f"({str(theirs.get('sha256'))[:12]}), the anchor uses {embedder.name!r} "
                              f"({embedder.sha256[:12]}); re-embed its domain with the anchor's embedder")
    if pkg.num_layers != num_layers:
        raise CheckpointError(f"expert {name!r}: has {pkg.num_layers} layers, the anchor has {num_layers}")
    for layer in range(num_layers):
        for proj in FFN_PROJS:
            key = dense_ffn_key(layer, proj)
            got, want = pkg.reader.spec(key), ffn_spec(layer, proj)
            if (got.dtype, got.shape) != (want.dtype, want.shape):
                raise CheckpointError(f"expert {name!r}: tensor {key} is {got.dtype}{list(got.shape)}, the anchor's is "
                                      f"{want.dtype}{list(want.shape)} (hidden size, FFN size or dtype differ)")
        row = pkg.reader.spec(package_row_key(layer))
        if row.shape != (hidden,):
            raise CheckpointError(f"expert {name!r}: tensor {package_row_key(layer)} has shape {list(row.shape)}, "
                                  f"expected [{hidden}] (hidden size differs)")
        if pkg.reader.spec(package_bias_key(layer)).shape not in ((), (1,)):
            raise CheckpointError(f"expert {name!r}: tensor {package_bias_key(layer)} must be a scalar")


def _merged_embedder(merged_dir: Path) -> EmbedderIdentity | None:
    """The anchor's embedder, from the copy of flexmoe_anchor.json a merged folder carries (None if absent)."""
    try:
        return AnchorMeta.from_json(read_json(merged_dir / ANCHOR_META, "flexmoe merged checkpoint")).embedder
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _open_packages(stack: ExitStack, dirs: list[Path], taken: list[str]) -> list[ExpertPackage]:
    pkgs, names = [], list(taken)
    for d in dirs:
        pkg = read_package(d)
        stack.callback(pkg.close)
        validate_expert_name(pkg.card.name)
        if pkg.card.name in names:
            raise ConfigError(f"duplicate expert name {pkg.card.name!r} ({d}); every expert needs its own name")
        names.append(pkg.card.name)
        pkgs.append(pkg)
    return pkgs


# ---------------------------------------------------------------- verbs

def merge(cfg: MergeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Anchor + expert packages -> one transformers `flex_olmo` checkpoint (docs/FORMAT.md)."""
    t0 = time.perf_counter()
    anchor_dir, expert_dirs = Path(cfg.anchor), [Path(d) for d in cfg.experts]
    refuse_input_as_output(Path(out), [anchor_dir, *expert_dirs])
    out = check_output(out, overwrite)
    if not expert_dirs:
        raise ConfigError("merge needs at least one --expert package")
    max_shard = parse_size(cfg.shard_size)
    anchor = read_anchor(anchor_dir)
    acfg = hf_config.require(anchor_dir, hf_config.DENSE, "the anchor of a merge is the dense model")
    num_layers, hidden = int(acfg["num_hidden_layers"]), int(acfg["hidden_size"])
    fingerprint = anchor.meta.fingerprint
    with ExitStack() as stack:
        areader = stack.enter_context(LazyReader.from_dir(anchor_dir, listed=anchor.files))
        ffn = {(layer, p): areader.spec(dense_ffn_key(layer, p)) for layer in range(num_layers) for p in FFN_PROJS}
        dtype = ffn[(0, "gate_proj")].dtype
        if anchor.public_row.shape != (hidden,):
            raise CheckpointError(f"{anchor_dir / ANCHOR_ROUTER}: public_row has shape {list(anchor.public_row.shape)}, "
                                  f"expected [{hidden}]")
        if cfg.verify_fingerprint and anchor_fingerprint(anchor_dir) != fingerprint:
            raise FingerprintMismatch(f"{anchor_dir}: tensors do not match the fingerprint in {ANCHOR_META}; "
                                      "the anchor was modified after it was created")
        pkgs = _open_packages(stack, expert_dirs, [PUBLIC_NAME])
        for pkg in pkgs:
            _check_package(pkg, fingerprint=fingerprint, embedder=anchor.meta.embedder, num_layers=num_layers,
                           hidden=hidden, ffn_spec=lambda layer, p: ffn[(layer, p)])
        num_experts = len(pkgs) + 1
        if cfg.top_k is not None and cfg.top_k > num_experts:
            raise ConfigError(f"--top-k {cfg.top_k} is more than the {num_experts} experts of this merge")
        family = hf_config.family(acfg)
        top_k = _resolve_top_k(cfg.top_k, num_experts, family)

        items = []
        for key in areader.keys():
            parsed = parse_dense_ffn(key)
            items.append(copy_item(expert_key(parsed[0], 0, parsed[1]) if parsed else key, areader, key))
        for e, pkg in enumerate(pkgs, start=1):
            for layer in range(num_layers):
                for p in FFN_PROJS:
                    items.append(copy_item(expert_key(layer, e, p), pkg.reader, dense_ffn_key(layer, p)))

        def router(layer: int) -> torch.Tensor:  # (E, hidden) in the anchor dtype
            rows = [anchor.public_row] + [pkg.reader.get(package_row_key(layer)).reshape(-1) for pkg in pkgs]
            return torch.stack([r.to(DTYPE_TO_TORCH[dtype]) for r in rows])

        items += [built_item(router_key(layer), dtype, (num_experts, hidden), lambda layer=layer: router(layer))
                  for layer in range(num_layers)]
        biases = torch.stack([torch.zeros(num_layers)] + [p.biases() for p in pkgs], dim=1)
        meta = merged_meta(fingerprint, top_k, cfg.top_k,
                            [{"name": PUBLIC_NAME}] + [{"name": p.card.name, "card": p.raw_card()} for p in pkgs])
        fcfg = moe_config(acfg, num_experts, top_k)
        with sealed_output(out, overwrite) as tmp:
            shards = stream_items(tmp, items, sources=[areader, *(p.reader for p in pkgs)], max_shard_bytes=max_shard,
                                  prefix="model", progress=progress, desc="merge", to_disk=family.to_disk)
            write_merged_files(tmp, side_src=anchor_dir, config=fcfg, meta=meta, biases=biases,
                               side_listed=anchor.files)
    return CheckpointResult(out=out, experts=[e["name"] for e in meta["experts"]], top_k=top_k, top_k_before=None,
                            shards=shards, total_bytes=sum(it.spec.nbytes for it in items),
                            anchor_fingerprint=fingerprint, seconds=time.perf_counter() - t0)


def _edit(m: Merged, out: Path, cfg: AddConfig | RemoveConfig, *, overwrite: bool, progress: bool, items: list[PlannedTensor],
          sources: list[LazyReader],
          experts: list[dict], biases: torch.Tensor, top_k: int, desc: str, notes: list[str],
          t0: float) -> CheckpointResult:
    """Shared tail of add/remove: write the planned tensors and the re-derived metadata files."""
    requested = cfg.top_k if cfg.top_k is not None else m.meta.get("top_k_requested")
    meta = merged_meta(m.meta["anchor_fingerprint"], top_k, requested, experts)
    fcfg = moe_config(m.config, len(experts), top_k)
    with sealed_output(out, overwrite) as tmp:
        shards = stream_items(tmp, items, sources=sources, max_shard_bytes=parse_size(cfg.shard_size), prefix="model",
                              progress=progress, desc=desc, to_disk=hf_config.family(m.config).to_disk)
        write_merged_files(tmp, side_src=m.path, config=fcfg, meta=meta, biases=biases, side_listed=m.reader.listed)
        m.close()  # before the swap of an in-place edit
    return CheckpointResult(out=out, experts=[e["name"] for e in experts], top_k=top_k,
                            top_k_before=int(m.meta["top_k"]), shards=shards,
                            total_bytes=sum(it.spec.nbytes for it in items),
                            anchor_fingerprint=m.meta["anchor_fingerprint"], seconds=time.perf_counter() - t0,
                            notes=notes)


def _check_edit_output(merged_dir: Path, out: Path, overwrite: bool, others: list[Path]) -> Path:
    out = Path(out)
    refuse_input_as_output(out, others)
    if _same_path(out, merged_dir) and not overwrite:
        raise ConfigError(f"--out {out} is the input checkpoint; use --in-place to replace it atomically")
    return check_output(out, overwrite)


def add(cfg: AddConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Append one expert package to a merged checkpoint (no anchor needed: its fingerprint is in flexmoe.json).
    `out` == `cfg.merged` with `overwrite` edits it in place, atomically."""
    t0 = time.perf_counter()
    merged_dir, expert_dir = Path(cfg.merged), Path(cfg.expert)
    out = _check_edit_output(merged_dir, Path(out), overwrite, [expert_dir])
    parse_size(cfg.shard_size)
    with ExitStack() as stack:
        m = read_merged(merged_dir)
        stack.callback(m.close)
        (pkg,) = _open_packages(stack, [expert_dir], m.names)
        _check_package(pkg, fingerprint=m.meta["anchor_fingerprint"], embedder=_merged_embedder(merged_dir),
                       num_layers=m.num_layers, hidden=m.hidden_size, ffn_spec=m.ffn_spec)
        if cfg.verify_fingerprint and merged_anchor_fingerprint(merged_dir) != m.meta["anchor_fingerprint"]:
            raise FingerprintMismatch(f"{merged_dir}: shared tensors do not match the anchor fingerprint in {MERGED_META}")
        e_new = m.num_experts
        if cfg.top_k is not None and cfg.top_k > e_new + 1:
            raise ConfigError(f"--top-k {cfg.top_k} is more than the {e_new + 1} experts after adding")
        before = int(m.meta["top_k"])
        family = hf_config.family(m.config)
        requested = cfg.top_k if cfg.top_k is not None or family.renormalises else m.meta.get("top_k_requested")
        top_k = _resolve_top_k(requested, e_new + 1, family)
        items = [copy_item(k, m.reader, k) for k in m.reader.keys() if parse_router_key(k) is None]
        items += [copy_item(expert_key(layer, e_new, p), pkg.reader, dense_ffn_key(layer, p))
                  for layer in range(m.num_layers) for p in FFN_PROJS]

        def router(layer: int) -> torch.Tensor:  # (E+1, hidden)
            row = pkg.reader.get(package_row_key(layer)).reshape(1, -1).to(DTYPE_TO_TORCH[m.dtype])
            return torch.cat([m.reader.get(router_key(layer)), row])

        items += [built_item(router_key(layer), m.dtype, (e_new + 1, m.hidden_size), lambda layer=layer: router(layer))
                  for layer in range(m.num_layers)]
        biases = torch.cat([m.biases, pkg.biases()[:, None]], dim=1)
        experts = m.meta["experts"] + [{"name": pkg.card.name, "card": pkg.raw_card()}]
        notes = [] if top_k == before else [f"top-k {before} -> {top_k}"]
        return _edit(m, out, cfg, overwrite=overwrite, progress=progress, items=items, sources=[m.reader, pkg.reader],
                     experts=experts, biases=biases,
                     top_k=top_k, desc="add", notes=notes, t0=t0)


def remove(cfg: RemoveConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Drop one owner's expert (FFN, router row, bias): the opt-out. top-k becomes min(k, E-1).
    `out` == `cfg.merged` with `overwrite` edits it in place, atomically."""
    t0 = time.perf_counter()
    merged_dir, name = Path(cfg.merged), cfg.expert
    out = _check_edit_output(merged_dir, Path(out), overwrite, [])
    parse_size(cfg.shard_size)
    with ExitStack() as stack:
        m = read_merged(merged_dir)
        stack.callback(m.close)
        j = m.index_of(name)
        e_new = m.num_experts - 1
        if cfg.top_k is not None and cfg.top_k > e_new:
            raise ConfigError(f"--top-k {cfg.top_k} is more than the {e_new} experts left after removing {name!r}")
        before = int(m.meta["top_k"])
        family = hf_config.family(m.config)
        top_k = (_resolve_top_k(cfg.top_k, e_new, family) if cfg.top_k is not None or family.renormalises
                 else min(before, e_new))
        items = []
        for key in m.reader.keys():
            parsed = parse_expert_key(key)
            if parsed is None:
                if parse_router_key(key) is None:
                    items.append(copy_item(key, m.reader, key))
            elif parsed[1] != j:
                layer, e, p = parsed
                items.append(copy_item(expert_key(layer, e - (e > j), p), m.reader, key))
        keep = [e for e in range(m.num_experts) if e != j]
        items += [built_item(router_key(layer), m.dtype, (e_new, m.hidden_size),
                             lambda layer=layer: m.reader.get(router_key(layer))[keep].contiguous())
                  for layer in range(m.num_layers)]
        experts = [e for i, e in enumerate(m.meta["experts"]) if i != j]
        notes = [f"top-k {before} -> {top_k} (min(k, E-1) with E-1 = {e_new})" if top_k != before
                 else f"top-k stays {top_k}"]
        return _edit(m, out, cfg, overwrite=overwrite, progress=progress, items=items, sources=[m.reader],
                     experts=experts,
                     biases=m.biases[:, keep].contiguous(), top_k=top_k, desc="remove", notes=notes, t0=t0)


def extract(cfg: ExtractConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> PackageResult:
    """Give back one expert as a package: FFN, router row and bias exactly as merged, and the owner's card."""
    t0 = time.perf_counter()
    merged_dir, name = Path(cfg.merged), cfg.expert
    refuse_input_as_output(Path(out), [merged_dir])
    out = check_output(out, overwrite)
    m = read_merged(merged_dir)
    try:
        j = m.index_of(name)
        items = []
        for layer in range(m.num_layers):
            items += [copy_item(dense_ffn_key(layer, p), m.reader, expert_key(layer, j, p)) for p in FFN_PROJS]
            items.append(built_item(package_row_key(layer), m.dtype, (m.hidden_size,),
                                    lambda layer=layer: m.reader.get(router_key(layer))[j].clone()))
            items.append(built_item(package_bias_key(layer), "F32", (), lambda layer=layer: m.biases[layer, j].clone()))
        order = {k: i for i, k in enumerate(package_keys(m.num_layers))}
        items.sort(key=lambda it: order[it.spec.name])
        with sealed_output(out, overwrite, seal=PACKAGE_CARD) as tmp:
            specs = [it.spec for it in items]
            # Every shard extract reads from is hashed whole, the other experts' bytes too: no copied byte unchecked.
            m.reader.hash_reads()
            with ShardWriter(tmp, specs, max_shard_bytes=NO_SHARD_LIMIT, prefix=PACKAGE_TENSORS.removesuffix(".safetensors")) as w:
                for it in tqdm(items, desc="extract", disable=None if progress else True):
                    it.emit(w)
                w.finalize()
            m.reader.check_reads()
            entry = m.meta["experts"][j]
            tuned = {ROUTER_TUNING: entry[ROUTER_TUNING]} if entry.get(ROUTER_TUNING) else {}
            dump_json(tmp / PACKAGE_CARD, {**entry["card"], **tuned})  # the row and bias say which they are
    finally:
        m.close()
    return PackageResult(out=out, name=name, num_layers=m.num_layers, total_bytes=sum(s.nbytes for s in specs),
                         anchor_fingerprint=m.meta["anchor_fingerprint"], seconds=time.perf_counter() - t0)
