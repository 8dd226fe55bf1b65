"""A model folder's transformers `config.json`, and the one check of which architecture a folder holds.

Architectures come in anchor families (`flexmoe.io.families`): a folder is either a dense anchor model (`DENSE`:
OLMo-2, Qwen3, Llama, Mistral) or the MoE model that merges of its family are (`MOE`: FlexOlmo, Qwen3-MoE, Mixtral)."""

from __future__ import annotations

from pathlib import Path

from flexmoe.errors import CheckpointError
from flexmoe.io import families
from flexmoe.io.families import Family
from flexmoe.io.jsonfile import read_json

DENSE = "dense"  # kinds of folder: a dense anchor model (Olmo2ForCausalLM, Qwen3ForCausalLM)
MOE = "moe"  # a merged / expert model (FlexOlmoForCausalLM, Qwen3MoeForCausalLM)
_LOOKUP = {DENSE: families.of_dense, MOE: families.of_moe}


def names(kind: str) -> str:
    """'an OLMo-2 model or a Qwen3 model or ... ('olmo2' or 'qwen3' or ...)' for `DENSE`; the MoE ones for `MOE`."""
    fams = families.FAMILIES.values()
    labels = [f.label if kind == DENSE else f.moe_label for f in fams]
    types = [f.dense_type if kind == DENSE else f.moe_type for f in fams]
    return f"{' or '.join(labels)} ({' or '.join(map(repr, types))})"


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


def is_dense(model_type: str | None) -> bool:
    return families.of_dense(model_type) is not None


def is_moe(model_type: str | None) -> bool:
    return families.of_moe(model_type) is not None


def family(config: dict) -> Family:
    """The anchor family of a dense or MoE config.json (a `CheckpointError` for any other model_type)."""
    fam = families.of_any(config.get("model_type"))
    if fam is None:
        raise CheckpointError(f"model_type {config.get('model_type')!r} is not {names(DENSE)} nor {names(MOE)}")
    return fam


def require(path: str | Path, expected: str, why: str) -> dict:
    """config.json of `path` when it is a folder of kind `expected` (`DENSE` or `MOE`) of some family; else a
    `CheckpointError` ending with `why` (what the folder should have been)."""
    config = read_config(path)
    if _LOOKUP[expected](config.get("model_type")) is None:
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not {names(expected)}; {why}")
    return config
