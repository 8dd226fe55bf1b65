"""The safetensors container, read and written by hand so tensors can be copied as raw bytes.

Layout: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data block.
Parsing the header ourselves lets the merge copy a tensor with `copy_file_range` (no deserialisation),
and lets us check a file for truncation before any byte of it is used.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.errors import CheckpointError

DTYPE_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_DTYPE = {v: k for k, v in DTYPE_TO_TORCH.items()}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype string and shape of one tensor: all a writer needs to plan a shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_TO_TORCH[self.dtype].itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(name, TORCH_TO_DTYPE[tensor.dtype], tuple(tensor.shape))


@dataclass(frozen=True)
class TensorLocation:
    spec: TensorSpec
    path: Path
    offset: int  # absolute byte offset of the tensor's data in `path`


def read_header(path: Path) -> tuple[dict[str, TensorLocation], dict[str, str]]:
    """Parse and validate a safetensors header. Raises `CheckpointError` on a corrupt or truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from e
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorLocation] = {}
    end_max = 0
    for name, info in header.items():
        try:
            spec = TensorSpec(name, info["dtype"], tuple(int(s) for s in info["shape"]))
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r}") from e
        if (spec.dtype not in DTYPE_TO_TORCH or begin < 0 or any(d < 0 for d in spec.shape)
                or end - begin != spec.nbytes):
            raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r}")
        end_max = max(end_max, end)
        out[name] = TensorLocation(spec, path, base + begin)
    if base + end_max > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header needs {base + end_max}); re-copy or re-create it")
    return out, dict(meta)


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included, padded to 8 bytes) and each tensor's offset in the data block."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offsets, pos = [], 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets.append(pos)
        pos += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy where it is already contiguous on CPU."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
