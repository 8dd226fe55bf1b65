"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on Hopper and later GPUs.

A decode step at batch 1 is ~170 short kernels in a row, each of which waits for the one before it to drain, then
launches, then ramps up. Launched as a programmatic dependent (`launch_pdl=True`), a kernel's programs are scheduled
while the previous kernel is still finishing; each waits (`griddepcontrol.wait`) only where it first reads what that
kernel wrote, and lets the next kernel be scheduled at once (`griddepcontrol.launch_dependents`). The wait covers
every earlier kernel, so results are those of plain launches; nothing is written before the wait, because a buffer
the allocator hands out may still be read by the kernel before.

`FLEXMOE_PDL=0` turns it off (for A/B runs, benchmarks/infer_bench.py's `flexmoe_nopdl` row); off on CPU, in
Triton's interpreter and below compute capability 9.0, where `griddepcontrol` does not exist.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("FLEXMOE_PDL", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch as programmatic dependents (also the kernels' `PDL` constexpr)."""
    return ENABLED and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """First statement of a kernel launched with `launch_pdl=PDL`: wait for the kernels before it, then let the
    next one be scheduled. Before this, a kernel may compute addresses, never load what another kernel wrote."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
