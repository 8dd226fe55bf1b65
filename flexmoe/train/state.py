"""Resume checkpoints: one directory per saved step, written atomically.

| file | content |
|---|---|
| `trainable.safetensors` | the trainable parameters, by their names in the unwrapped model |
| `optimizer.pt` | the optimizer's `state_dict()`: tensors and plain containers only, loaded with `weights_only=True` |
| `state.json` | step, data position, seed, last logged loss, the open logging window, and the run identity a resume must match |

Frozen tensors are never saved: they are the anchor's, and a resume rebuilds them from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexmoe.errors import CheckpointError
from flexmoe.io.atomic import atomic_dir

TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
META = "state.json"
FORMAT = "flexmoe-train-state/1"
_PREFIX = "step_"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    position: int  # blocks of the data order consumed, over all processes
    seed: int
    loss: float | None = None
    identity: dict = field(default_factory=dict)
    # The logging window still open at `step`: each process's running sum of its step losses, and how many steps
    # it holds, so a resumed run logs (and reports as final) the same loss as an uninterrupted one.
    window: list[float] = field(default_factory=list)
    window_steps: int = 0


def _check_plain(obj, where: str = "optimizer state") -> None:
    """Only what `torch.load(weights_only=True)` reads back: tensors, numbers, strings, None and containers."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where}: cannot save a {type(obj).__name__} in a weights-only checkpoint")


def work_dir(out: str | Path) -> Path:
    """Where the run that writes `out` keeps its checkpoints (and an anchor's tokenizer): `<out>.work` beside it,
    so `out` itself is still written in one atomic rename at the end."""
    out = Path(out)
    return out.parent / f"{out.name}.work"


def checkpoint_dir(work_dir: Path, step: int) -> Path:
    return Path(work_dir) / f"{_PREFIX}{step:08d}"


def save_state(work_dir: str | Path, state: TrainState, tensors: dict[str, torch.Tensor], optimizer: dict,
               *, keep: int = 1) -> Path:
    """Write the checkpoint of `state.step` atomically, then drop all but the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    _check_plain(optimizer)
    out = checkpoint_dir(Path(work_dir), state.step)
    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        torch.save(optimizer, tmp / OPTIMIZER)
        (tmp / META).write_text(json.dumps({"format": FORMAT, **asdict(state)}, indent=2) + "\n")
    for old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never carry the final name)."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    return sorted(p for p in work_dir.glob(f"{_PREFIX}*") if p.is_dir() and (p / META).is_file())


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    found = list_checkpoints(work_dir)
    return found[-1] if found else None


def load_state(ckpt: str | Path) -> tuple[TrainState, dict[str, torch.Tensor], dict]:
    """(state, trainable tensors on CPU, optimizer state dict) of one checkpoint directory."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / META).read_text())
        if meta.pop("format", None) != FORMAT:
            raise CheckpointError(f"{ckpt}: not a flexmoe training checkpoint")
        state = TrainState(**meta)
        tensors = load_file(str(ckpt / TENSORS))
        optimizer = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors, pickle-safety and JSON errors alike: the checkpoint is unusable
        raise CheckpointError(f"{ckpt}: unreadable training checkpoint ({e}); start over with --overwrite") from None
    return state, tensors, optimizer
