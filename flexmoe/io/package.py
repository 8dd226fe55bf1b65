"""Expert packages: what one data owner trained, and nothing else (docs/FORMAT.md).

`expert.safetensors` holds per layer the owner FFN (anchor names and shapes), the router row r_i (hidden,)
and the raw expert bias b_i (); `expert.json` is the card.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io import manifest
from flexmoe.io.jsonfile import read_json
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import TensorSpec
from flexmoe.io.writer import NO_SHARD_LIMIT, ShardWriter
from flexmoe.io.keys import FFN_PROJS, dense_ffn_key, package_bias_key, package_row_key

PACKAGE_TENSORS = "expert.safetensors"
PACKAGE_CARD = "expert.json"
FORMAT = "flexmoe-expert/1"
PACKAGE_REMAKE = "`flexmoe train-expert` (or `extract`)"  # for damaged-file errors
PUBLIC_NAME = "public"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_expert_name(name: str) -> str:
    """Expert names become file and key labels: letters, digits, `_ . -`, no path characters, not 'public'."""
    if not _NAME.match(name or "") or ".." in name:
        raise ConfigError(f"bad expert name {name!r}: use 1-64 letters, digits, '_', '.', '-' (no '/' or spaces)")
    if name == PUBLIC_NAME:
        raise ConfigError(f"expert name {PUBLIC_NAME!r} is reserved for the anchor's own FFN")
    return name


@dataclass
class ExpertCard:
    name: str
    anchor_fingerprint: str
    embedder: dict | None = None
    router_source: str = "embedding"
    data: dict = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)
    steps: int = 0
    final_loss: float | None = None
    flexmoe_version: str = ""
    router_tuning: list | None = None  # set by `extract` after `tune-router`: its records; the row is the tuned one

    def to_json(self) -> dict:
        card = asdict(self)
        if card["router_tuning"] is None:  # absent, not null: untuned cards keep their bytes
            del card["router_tuning"]
        return {"format": FORMAT, **card}

    @classmethod
    def from_json(cls, d: dict) -> "ExpertCard":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def package_keys(num_layers: int) -> list[str]:
    """Every tensor name a package of `num_layers` layers holds, in canonical order."""
    out = []
    for layer in range(num_layers):
        out += [dense_ffn_key(layer, p) for p in FFN_PROJS]
        out += [package_row_key(layer), package_bias_key(layer)]
    return out


@dataclass
class ExpertPackage:
    path: Path
    card: ExpertCard
    reader: LazyReader
    num_layers: int

    def biases(self) -> torch.Tensor:
        """(num_layers,) raw float32 b_i of every layer."""
        return torch.stack([self.reader.get(package_bias_key(layer)).float().reshape(())
                            for layer in range(self.num_layers)])

    def raw_card(self) -> dict:
        """expert.json verbatim, unknown keys included, so `extract` can write back the owner's exact card."""
        return json.loads((self.path / PACKAGE_CARD).read_text())

    def close(self) -> None:
        self.reader.close()


def write_package(out_dir: Path, tensors: Mapping[str, torch.Tensor], card: ExpertCard) -> None:
    """Write a package into `out_dir` (an atomic temporary directory). `tensors` must be exactly the package keys."""
    validate_expert_name(card.name)
    num_layers = len([k for k in tensors if k.endswith(".mlp.router.bias")])
    expected = package_keys(num_layers)
    if sorted(tensors) != sorted(expected):
        extra = sorted(set(tensors) ^ set(expected))
        raise CheckpointError(f"expert package tensors do not match the package layout (first difference: {extra[0]!r})")
    specs = [TensorSpec.of(k, tensors[k].detach().contiguous()) for k in expected]
    with ShardWriter(out_dir, specs, prefix="expert", max_shard_bytes=NO_SHARD_LIMIT) as w:
        for k in expected:
            w.write(k, tensors[k].detach().contiguous())
        w.finalize()
    (out_dir / PACKAGE_CARD).write_text(json.dumps(card.to_json(), indent=2) + "\n")


def read_package(path: str | Path) -> ExpertPackage:
    """Open a package lazily and check its layout. Raises `CheckpointError` naming what is wrong."""
    path = Path(path)
    card_file = path / PACKAGE_CARD
    if not card_file.is_file():
        raise CheckpointError(f"{path}: not an expert package (no {PACKAGE_CARD})")
    data = read_json(card_file, "expert package", FORMAT, label="expert card")
    listed = manifest.check(path, data, PACKAGE_CARD, remake=PACKAGE_REMAKE, hashed=manifest.small_files(data))
    try:
        card = ExpertCard.from_json(data)
    except (TypeError, AttributeError) as e:
        raise CheckpointError(f"{card_file}: corrupt expert card ({e})") from e
    reader = LazyReader.from_file(path / PACKAGE_TENSORS, listed=listed)
    num_layers = len([k for k in reader.keys() if k.endswith(".mlp.router.bias")])
    if num_layers == 0 or reader.keys() != sorted(package_keys(num_layers)):
        reader.close()
        raise CheckpointError(f"{path}: {PACKAGE_TENSORS} does not hold a complete expert (per-layer FFN, router row, bias)")
    return ExpertPackage(path=path, card=card, reader=reader, num_layers=num_layers)
