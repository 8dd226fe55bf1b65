"""What every anchor folder gets besides its weights: r_pub, the projection and the fingerprint (docs/FORMAT.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flexmoe.config import DType
from flexmoe.io.anchor import AnchorMeta, write_anchor_files
from flexmoe.io.fingerprint import anchor_fingerprint
from flexmoe.router.rows import PublicRow

if TYPE_CHECKING:
    from flexmoe.train.loop import TrainStats


@dataclass
class AnchorResult:
    path: Path
    fingerprint: str
    num_params: int
    train: TrainStats | None = None  # None for an adopted model (init-anchor)


def write_meta(tmp: Path, *, config: dict, dtype: DType, public: PublicRow, docs) -> str:
    """Fingerprint the weights already in `tmp` and write flexmoe_anchor.json + r_pub beside them."""
    fingerprint = anchor_fingerprint(tmp)
    meta = AnchorMeta(fingerprint=fingerprint, hidden_size=int(config["hidden_size"]),
                      num_layers=int(config["num_hidden_layers"]), intermediate_size=int(config["intermediate_size"]),
                      dtype=dtype.value, embedder=public.embedder, projection=public.projection_spec,
                      public_data={"documents": len(docs.texts), "bytes": docs.num_bytes})
    write_anchor_files(tmp, meta, public.row, public.projection)
    return fingerprint
