"""accelerate set-up shared by every training verb: the process state, and the work dir of resume checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

from flexmoe.config import Device
from flexmoe.errors import ConfigError, OutputExistsError


def process_state(choice: Device):
    """accelerate's process state, created the way the training loop's `Accelerator` will see it: on a machine
    without CUDA (or with --device cpu) only `cpu=True` detects a multi-process CPU launch."""
    import torch
    from accelerate import PartialState

    if choice == Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return PartialState(cpu=choice == Device.CPU or not torch.cuda.is_available())


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
