"""A model folder's transformers `config.json`, and the one check of which architecture a folder holds."""

from __future__ import annotations

from pathlib import Path

from flexmoe.errors import CheckpointError
from flexmoe.io.jsonfile import read_json

DENSE = "olmo2"  # the anchor's model_type (Olmo2ForCausalLM)
MOE = "flex_olmo"  # the merged / expert model's model_type (FlexOlmoForCausalLM)
_NAMES = {DENSE: "an OLMo-2 model", MOE: "a FlexOlmo model"}


def read_config(path: str | Path) -> dict:
    """config.json of the model folder `path`, or a `CheckpointError` saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    return read_json(path / "config.json", "model directory")


def model_type(path: str | Path) -> str:
    return str(read_config(path).get("model_type"))


def require(path: str | Path, expected: str, why: str) -> dict:
    """config.json of `path` when its model_type is `expected`; else a `CheckpointError` ending with `why`
    (what the folder should have been)."""
    config = read_config(path)
    if config.get("model_type") != expected:
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not {_NAMES[expected]} "
                              f"({expected!r}); {why}")
    return config
