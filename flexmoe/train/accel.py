"""accelerate set-up shared by every training verb: the process state, the `Accelerator` of the training loop, and
the work dir of resume checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from flexmoe.config import Device
from flexmoe.errors import ConfigError, OutputExistsError
from flexmoe.train import fsdp

if TYPE_CHECKING:
    from flexmoe.config import TrainConfig


def _cpu_only(choice: Device) -> bool:
    """accelerate's `cpu=` for `choice`: on a machine without CUDA (or with --device cpu) only `cpu=True` makes
    accelerate see a multi-process CPU launch (torchrun, accelerate launch)."""
    import torch

    if choice == Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return choice == Device.CPU or not torch.cuda.is_available()


def process_state(choice: Device):
    """accelerate's process state, created the way the training loop's `Accelerator` will see it."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only(choice))


def make_accelerator(cfg: TrainConfig):
    """The `Accelerator` of one training run (bf16 autocast when `cfg.bf16`); a later run in the same process may
    use another precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = _cpu_only(cfg.device)
    precision = "bf16" if cfg.bf16 else "no"
    state = AcceleratorState._shared_state
    if "_mixed_precision" in state and state["_mixed_precision"] != precision:
        # accelerate keeps one process-wide precision; a new run (tests, notebooks, recipes) may differ.
        AcceleratorState._reset_state()
    with fsdp.accelerator_env(cpu):  # an HSDP launch's mesh on CPU processes is built by fsdp._mesh itself
        return Accelerator(mixed_precision=precision, cpu=cpu)


def local_device(choice: Device) -> str:
    """The torch device for the single-process parts (embedding, hidden means) of a run."""
    return "cpu" if choice == Device.CPU else str(process_state(choice).device)  # under torchrun: this process's GPU


def is_main(choice: Device) -> bool:
    return process_state(choice).is_main_process


def barrier(choice: Device) -> None:
    process_state(choice).wait_for_everyone()


def prepare_work_dir(out: Path, resume: bool, overwrite: bool, device: Device) -> Path:
    """A fresh run starts from an empty work dir, but never silently drops an interrupted run's checkpoints."""
    from flexmoe.train.state import latest_checkpoint, work_dir

    work = work_dir(out)
    if not resume and work.exists():
        if latest_checkpoint(work) is not None and not overwrite:
            raise OutputExistsError(f"{work} holds checkpoints of an interrupted run: pass --resume to continue "
                                    "it or --overwrite to start over")
        barrier(device)  # every process has looked before the main one deletes
        if is_main(device):
            shutil.rmtree(work, ignore_errors=True)
        barrier(device)
    return work


def finish(out: Path, work: Path, device: Device) -> None:
    """After the main process wrote `out`: drop the resume checkpoints, then let every process return."""
    if is_main(device):
        shutil.rmtree(work, ignore_errors=True)
    barrier(device)


def release_processes() -> None:
    """End this process's part in a multi-process launch once its command has succeeded: destroy the process groups
    and forget accelerate's state while the interpreter is whole.

    Left to interpreter exit, gloo's worker threads can be destroyed still joinable, and a rank whose work is done and
    written aborts (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489), which fails
    the whole launch. Only after success: a rank that raised may leave the others inside a collective, where the
    teardown itself would hang (torchtitan#1342). A no-op in a process without a process group.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
