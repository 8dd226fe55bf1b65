"""The anchor fingerprint: a streaming sha256 over the anchor's tensors, in the anchor's own key names.

Each tensor contributes `name\\0dtype\\0shape\\0` and then its raw bytes, in sorted key order, so the hash is
independent of sharding. A merged checkpoint yields the same hash through `keys.anchor_view_key` (expert 0 is
the public FFN); owner experts and routers do not take part.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import anchor_view_key


def _hash_reader(reader: LazyReader, names: dict[str, str]) -> str:
    h = hashlib.sha256()
    for anchor_name in sorted(names):
        key = names[anchor_name]
        spec = reader.spec(key)
        h.update(f"{anchor_name}\0{spec.dtype}\0{list(spec.shape)}\0".encode())
        for chunk in reader.read_chunks(key):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def anchor_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a dense anchor directory (`Olmo2ForCausalLM`)."""
    with LazyReader.from_dir(model_dir) as reader:
        return _hash_reader(reader, {k: k for k in reader.keys()})


def merged_anchor_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of the anchor a merged `flex_olmo` checkpoint was built from, recomputed from its tensors."""
    with LazyReader.from_dir(model_dir) as reader:
        names = {anchor_view_key(k): k for k in reader.keys() if anchor_view_key(k) is not None}
        return _hash_reader(reader, names)
