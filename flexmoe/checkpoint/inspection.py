"""`flexmoe inspect`: what a merged checkpoint, an anchor or an expert package holds, read from headers and
metadata only (no tensor data except the biases), optionally with the anchor fingerprint recomputed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flexmoe.errors import CheckpointError
from flexmoe.io.anchor import ANCHOR_META, read_anchor
from flexmoe.io.fingerprint import anchor_fingerprint, merged_anchor_fingerprint
from flexmoe.io.merged import MERGED_META, read_merged
from flexmoe.io.package import PACKAGE_CARD, PUBLIC_NAME, read_package
from flexmoe.io.reader import LazyReader, model_files
from flexmoe.io.keys import FFN_PROJS, dense_ffn_key, expert_key


@dataclass
class ExpertInfo:
    index: int
    name: str
    bytes: int  # FFN bytes of this expert
    router_source: str | None
    mean_bias: float | None  # mean over layers of min(b, 0), the bias as applied
    card: dict | None


@dataclass
class ShardInfo:
    name: str
    bytes: int
    tensors: int


@dataclass
class InspectResult:
    kind: str  # "merged" | "anchor" | "package"
    path: Path
    num_layers: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    anchor_fingerprint: str | None
    num_experts: int | None
    top_k: int | None
    experts: list[ExpertInfo]
    shards: list[ShardInfo]
    total_bytes: int
    fingerprint_verified: bool | None = None  # None: not checked (pass verify=True)

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _shard_infos(files: list[Path]) -> list[ShardInfo]:
    out = []
    for f in files:
        with LazyReader.from_file(f) as r:
            out.append(ShardInfo(name=f.name, bytes=f.stat().st_size, tensors=len(r.keys())))
    return out


def inspect(path: str | Path, *, verify: bool = False) -> InspectResult:
    """Describe a merged checkpoint, an anchor or an expert package. `verify` recomputes the anchor fingerprint."""
    path = Path(path)
    if (path / PACKAGE_CARD).is_file():
        pkg = read_package(path)
        try:
            spec = pkg.reader.spec(dense_ffn_key(0, "gate_proj"))
            ffn = sum(pkg.reader.spec(dense_ffn_key(layer, p)).nbytes for layer in range(pkg.num_layers) for p in FFN_PROJS)
            bias = pkg.biases().clamp(max=0).mean()
            info = ExpertInfo(index=1, name=pkg.card.name, bytes=ffn, router_source=pkg.card.router_source,
                              mean_bias=float(bias), card=pkg.raw_card())
            return InspectResult(kind="package", path=path, num_layers=pkg.num_layers, hidden_size=spec.shape[1],
                                 intermediate_size=spec.shape[0], dtype=spec.dtype,
                                 anchor_fingerprint=pkg.card.anchor_fingerprint, num_experts=None, top_k=None,
                                 experts=[info], shards=_shard_infos(pkg.reader.files),
                                 total_bytes=sum(f.stat().st_size for f in pkg.reader.files))
        finally:
            pkg.close()
    if (path / MERGED_META).is_file():
        m = read_merged(path)
        try:
            spec = m.ffn_spec(0, "gate_proj")
            experts = []
            for i, e in enumerate(m.meta["experts"]):
                size = sum(m.reader.spec(expert_key(layer, i, p)).nbytes for layer in range(m.num_layers) for p in FFN_PROJS)
                card = e.get("card")
                experts.append(ExpertInfo(index=i, name=e["name"], bytes=size,
                                          router_source=card.get("router_source") if card else "anchor",
                                          mean_bias=float(m.biases[:, i].clamp(max=0).mean()), card=card))
            files = model_files(path)
            verified = merged_anchor_fingerprint(path) == m.meta["anchor_fingerprint"] if verify else None
            return InspectResult(kind="merged", path=path, num_layers=m.num_layers, hidden_size=m.hidden_size,
                                 intermediate_size=spec.shape[0], dtype=spec.dtype,
                                 anchor_fingerprint=m.meta["anchor_fingerprint"], num_experts=m.num_experts,
                                 top_k=int(m.config["num_experts_per_tok"]), experts=experts,
                                 shards=_shard_infos(files), total_bytes=sum(f.stat().st_size for f in files),
                                 fingerprint_verified=verified)
        finally:
            m.close()
    if (path / ANCHOR_META).is_file():
        anchor = read_anchor(path)
        files = model_files(path)
        verified = anchor_fingerprint(path) == anchor.meta.fingerprint if verify else None
        with LazyReader(files) as r:
            spec = r.spec(dense_ffn_key(0, "gate_proj"))
            ffn = sum(r.spec(dense_ffn_key(layer, p)).nbytes for layer in range(anchor.meta.num_layers) for p in FFN_PROJS)
        return InspectResult(kind="anchor", path=path, num_layers=anchor.meta.num_layers,
                             hidden_size=anchor.meta.hidden_size, intermediate_size=spec.shape[0], dtype=spec.dtype,
                             anchor_fingerprint=anchor.meta.fingerprint, num_experts=1, top_k=None,
                             experts=[ExpertInfo(index=0, name=PUBLIC_NAME, bytes=ffn, router_source="anchor",
                                                 mean_bias=None, card=None)],
                             shards=_shard_infos(files), total_bytes=sum(f.stat().st_size for f in files),
                             fingerprint_verified=verified)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    raise CheckpointError(f"{path}: not a flexmoe merged checkpoint, anchor or expert package "
                          f"(no {MERGED_META}, {ANCHOR_META} or {PACKAGE_CARD})")
