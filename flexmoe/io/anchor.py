"""Anchor metadata: `flexmoe_anchor.json` + `flexmoe_router.safetensors` beside a stock Olmo2 directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io import hf_config, manifest
from flexmoe.io.jsonfile import read_json
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import TensorSpec
from flexmoe.io.writer import NO_SHARD_LIMIT, ShardWriter, ensure_index

ANCHOR_META = "flexmoe_anchor.json"
ANCHOR_ROUTER = "flexmoe_router.safetensors"
FORMAT = "flexmoe-anchor/1"
ANCHOR_REMAKE = "`flexmoe train-anchor` / `init-anchor`"  # for damaged-file errors


@dataclass(frozen=True)
class EmbedderIdentity:
    """Which sentence embedder made router rows: two owners must use the same one."""

    name: str
    dim: int
    sha256: str

    @classmethod
    def from_json(cls, d: dict | None) -> "EmbedderIdentity | None":
        return None if d is None else cls(name=str(d["name"]), dim=int(d["dim"]), sha256=str(d["sha256"]))


@dataclass(frozen=True)
class ProjectionSpec:
    """The fixed map from embedder space (in_dim) to model space (out_dim), drawn once at anchor creation."""

    kind: str
    seed: int
    in_dim: int
    out_dim: int


@dataclass
class AnchorMeta:
    fingerprint: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    dtype: str
    embedder: EmbedderIdentity | None
    projection: ProjectionSpec | None = None
    public_data: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "AnchorMeta":
        proj = d.get("projection")
        return cls(fingerprint=d["fingerprint"], hidden_size=int(d["hidden_size"]), num_layers=int(d["num_layers"]),
                   intermediate_size=int(d["intermediate_size"]), dtype=str(d["dtype"]),
                   embedder=EmbedderIdentity.from_json(d.get("embedder")),
                   projection=ProjectionSpec(**proj) if proj else None, public_data=dict(d.get("public_data", {})))


@dataclass
class Anchor:
    """A loaded anchor's flexmoe side: metadata, r_pub in model space, and the embedder projection."""

    path: Path
    meta: AnchorMeta
    public_row: torch.Tensor  # (hidden,) float32
    projection: torch.Tensor | None  # (hidden, embed_dim) float32, or None when embed_dim == hidden
    files: manifest.Listed | None = None  # the anchor folder's manifest as read_anchor checked it (None: none)

    def to_model_space(self, embedding_row: torch.Tensor) -> torch.Tensor:
        """Map a raw embedder row (embed_dim,) to a router row (hidden,), the same way for every owner."""
        row = embedding_row.float().reshape(-1)
        if self.projection is None:
            if row.numel() != self.meta.hidden_size:
                raise ConfigError(f"router row has dimension {row.numel()}, anchor hidden size is {self.meta.hidden_size}; "
                                  "use an embedder of the anchor's dimension or re-create the anchor with this embedder")
            return row
        if row.numel() != self.projection.shape[1]:
            raise ConfigError(f"router row has dimension {row.numel()}, the anchor's embedder projection expects "
                              f"{self.projection.shape[1]}; use the anchor's embedder ({self.meta.embedder.name if self.meta.embedder else '?'})")
        return self.projection @ row


def write_anchor_files(out_dir: Path, meta: AnchorMeta, public_row: torch.Tensor, projection: torch.Tensor | None) -> None:
    """Write the two flexmoe files into an (atomic, temporary) anchor directory whose weights are already there;
    a one-file model gets its index (serving layout, docs/FORMAT.md)."""
    ensure_index(out_dir)
    tensors = {"public_row": public_row.detach().float().reshape(-1).contiguous()}
    if projection is not None:
        tensors["projection"] = projection.detach().float().contiguous()
    with ShardWriter(out_dir, [TensorSpec.of(k, v) for k, v in tensors.items()], prefix="flexmoe_router",
                     max_shard_bytes=NO_SHARD_LIMIT) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.finalize()
    (out_dir / ANCHOR_META).write_text(json.dumps(meta.to_json(), indent=2) + "\n")


def read_anchor(path: str | Path) -> Anchor:
    """Load an anchor's flexmoe metadata. Raises `CheckpointError` if `path` is not a flexmoe anchor."""
    path = Path(path)
    model_type = read_json(path / "config.json", "model directory").get("model_type")
    if not (hf_config.is_dense(model_type) or hf_config.is_moe(model_type)):
        raise CheckpointError(f"{path}: model_type {model_type!r} is not {hf_config.names(hf_config.DENSE)}, "
                              "the anchors flexmoe knows")
    meta_file = path / ANCHOR_META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: no {ANCHOR_META}; adopt the model first with `flexmoe init-anchor`")
    data = read_json(meta_file, "flexmoe anchor", FORMAT, label="anchor metadata")
    listed = None
    if hf_config.is_dense(model_type):  # a merged folder carries the anchor's metadata file, not the anchor's files
        listed = manifest.check(path, data, ANCHOR_META, remake=ANCHOR_REMAKE, hashed=manifest.small_files(data))
    try:
        meta = AnchorMeta.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: corrupt anchor metadata ({e})") from e
    with LazyReader.from_file(path / ANCHOR_ROUTER) as r:
        public_row = r.get("public_row").float()
        projection = r.get("projection").float() if "projection" in r else None
    return Anchor(path=path, meta=meta, public_row=public_row, projection=projection, files=listed)
