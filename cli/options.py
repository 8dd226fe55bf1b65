"""Options every command spells the same way, and the one way a command reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from flexmoe.config import Device, DType
from flexmoe.errors import ConfigError

PATH = click.Path(path_type=Path)  # existence is checked by the library, which names what is wrong

device = click.option("--device", type=click.Choice([d.value for d in Device]), default=Device.AUTO.value,
                      show_default=True, callback=lambda _c, _p, v: Device(v),
                      help="auto: CUDA if available. Pick GPUs with CUDA_VISIBLE_DEVICES; under accelerate launch / "
                           "torchrun each process takes its own.")
dtype = click.option("--dtype", type=click.Choice([d.value for d in DType]),
                     help="Weights and compute dtype [default: bfloat16 on CUDA, float32 on CPU].")
no_bias = click.option("--no-bias", is_flag=True,
                       help="Load a merged checkpoint as stock transformers does (no expert bias).")
no_fast = click.option("--no-fast", is_flag=True,
                       help="Stock transformers generate instead of flexmoe's fast path (CUDA graphs on GPU).")


def _top_k(_ctx, _param, value: str | None) -> int | None:
    """'K' -> K, 'all' -> 0 (every expert), None -> None (the checkpoint's k)."""
    if value is None:
        return None
    if value.strip().lower() == "all":
        return 0
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"bad --top-k {value!r}: use a number or 'all'") from None


top_k = click.option("--top-k", metavar="K|all", callback=_top_k,
                     help="Route each token to K experts (MoE models only; all: every expert) [default: the "
                          "checkpoint's k].")
deterministic = click.option("--deterministic", is_flag=True,
                             help="Same tokens in every run (torch's deterministic algorithms: no cuDNN attention, "
                                  "fixed expert-kernel tiles); up to ~5% slower on GPU. CPU runs repeat anyway.")
overwrite = click.option("--overwrite", is_flag=True, help="Replace --out if it exists (atomically).")
quiet = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
resume = click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
as_json = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
json_out = click.option("--json-out", type=PATH, metavar="FILE", help="Also write the result as JSON to FILE.")


def say(text: str) -> None:
    """One report, also under torchrun / accelerate launch (rank 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(text)


def emit(result, as_json_flag: bool, text: str) -> None:
    """`--json`: the result's JSON on stdout; else the human summary `text`."""
    say(json.dumps(_json(result), indent=2) if as_json_flag else text)


def _json(result) -> dict:
    from flexmoe.config import jsonable

    return result.to_json() if hasattr(result, "to_json") else jsonable(result)


def loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
