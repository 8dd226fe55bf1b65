"""JSON metadata files (config.json, flexmoe_anchor.json, expert.json, flexmoe.json): read with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.errors import CheckpointError


def read_json(path: Path, what: str, fmt: str | None = None, *, label: str | None = None) -> dict:
    """The JSON object in `path`.

    Args:
        what: the kind of folder `path` belongs to, for the missing-file error ("is it a {what}?").
        fmt: the required value of the "format" field, if any.
        label: what the file is, for the corrupt-file error (default: its name).
    """
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}; is it a {what}?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {label or path.name}, not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupt {label or path.name}, expected a JSON object")
    if fmt is not None and data.get("format") != fmt:
        raise CheckpointError(f"{path}: unknown format {data.get('format')!r} (expected {fmt})")
    return data


def dump_json(path: Path, data: dict, *, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
