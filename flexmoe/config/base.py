"""The config machinery every verb's config is built on, and the choices shared by every verb.

`Config` subclasses are dataclasses: YAML files and `key.sub=value` overrides map onto them (`Config.load`), strings
become enum members, unknown keys are errors (`from_dict`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from flexmoe.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise `ConfigError` naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def with_overrides(data: dict, dotted: Sequence[str] = (), values: dict[str, Any] | None = None) -> dict:
    """Copy of the nested mapping `data` with `["a.b=value", ...]` (values parsed as YAML), then with the already
    typed `{"a.b": value}` (None values skipped: an unset CLI flag) applied."""
    pairs: list[tuple[str, Any]] = []
    for item in dotted:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: use key.sub=value")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw else ""))
    pairs += [(k, v) for k, v in (values or {}).items() if v is not None]
    out = dict(data)
    for key, value in pairs:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def jsonable(value: Any) -> Any:
    """Configs and results as plain JSON values (enums by value, paths as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


class Config:
    """Base of every typed config (dataclass subclasses): one way to build them from YAML, a mapping and dotted
    overrides, with every check in `__post_init__` (an object that exists is valid). Choices given as plain
    strings (`device="cpu"`) become their enum members here, so library callers and YAML spell them alike."""

    def __post_init__(self) -> None:
        for name, tp in _enum_fields(type(self)).items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, enum.Enum):
                setattr(self, name, _coerce(value, tp, name))

    @classmethod
    def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
        return from_dict(cls, data, where)

    @classmethod
    def load(cls: type[T], path: str | Path | None = None, values: dict[str, Any] | None = None,
             dotted: Sequence[str] = ()) -> T:
        """`cls` from an optional YAML file, then `dotted` overrides (`["train.lr=1e-3"]`), then typed `values`
        (`{"train.lr": 1e-3}`, None skipped): the order CLI flags take over a spec file."""
        data = with_overrides(load_yaml(path) if path is not None else {}, dotted, values)
        return from_dict(cls, data, where=str(path) if path else cls.__name__)

    def to_json(self) -> dict:
        return jsonable(self)


@functools.cache
def _enum_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            out[f.name] = tp
    return out


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            s, m = s[: -len(u)], mult
            break
    else:
        m = 1
    try:
        value = int(float(s) * m)
    except ValueError:
        raise ConfigError(f"bad size {text!r}: use e.g. 5GB, 500MB or a number of bytes") from None
    if value <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    return value


# ---- choices shared by every verb ----


class Device(str, enum.Enum):
    """Where a verb runs; under `accelerate launch` / torchrun each process takes its own GPU
    (pick GPUs with CUDA_VISIBLE_DEVICES)."""

    AUTO = "auto"  # CUDA if available, else CPU
    CPU = "cpu"
    CUDA = "cuda"

    def torch(self):
        import torch

        if self == Device.CUDA and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        cuda = self == Device.CUDA or (self == Device.AUTO and torch.cuda.is_available())
        return torch.device("cuda" if cuda else "cpu")


class DType(str, enum.Enum):
    """Floating-point weight dtypes; the one table between config names, safetensors codes and torch."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self):
        import torch

        return getattr(torch, self.value)

    @property
    def safetensors(self) -> str:
        return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[self.value]

    @classmethod
    def of_safetensors(cls, code: str) -> "DType":
        for d in cls:
            if d.safetensors == code:
                return d
        raise ConfigError(f"weights of dtype {code} are not supported (float32, bfloat16 or float16)")


class ExpertsKernel(str, enum.Enum):
    """transformers' experts implementations for MoE models (flexmoe's own kernel is the fast path, `flexmoe.infer`)."""

    EAGER = "eager"
    BATCHED_MM = "batched_mm"
    GROUPED_MM = "grouped_mm"
