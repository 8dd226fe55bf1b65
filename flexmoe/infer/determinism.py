"""Repeatable decoding: `deterministic()` runs a block under `torch.use_deterministic_algorithms(True)`, and
`mode_attention()` is the attention dispatch the decoder takes in that mode.

By default flexmoe decodes with the fastest kernels, and two of them need not repeat their results: SDPA's cuDNN
attention (different logits on identical batch-32 decode steps, H100), which prompts run (decode steps of the fused
layer attend with flexmoe's split-KV kernels, repeatable by construction), and the expert kernels' autotuned tiles
(picked afresh in every process; another tile size sums in another order). In deterministic mode the decoder leaves
cuDNN out (`mode_attention`) and the expert kernels take fixed tiles (`flexmoe.infer.triton_moe`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.utils.deterministic

from flexmoe.errors import ConfigError

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the values torch accepts in deterministic mode


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """`torch.use_deterministic_algorithms(True)` inside the block, restored after: the same prompts then decode to
    the same tokens in every run on the same hardware and software, batch 32 included (by default a prompt's cuDNN
    attention need not repeat its sums, and the expert kernels' autotuned tiles can differ between processes).
    Inside, flexmoe's prompts (and decode steps that run SDPA) leave cuDNN attention out and its expert kernels take
    fixed tiles; up to ~5% slower a call at batch 32, ~1% at batch 1 (H100, benchmarks/NOTES.md §6). An operation
    torch has no deterministic kernel for raises `ConfigError`."""
    if not enabled:
        yield
        return
    # in this mode torch refuses cuBLAS calls unless this variable asks cuBLAS for a fixed workspace
    given = os.environ.get(CUBLAS_WORKSPACE)
    if given is not None and given not in CUBLAS_DETERMINISTIC:
        raise ConfigError(f"deterministic decoding needs {CUBLAS_WORKSPACE} {' or '.join(CUBLAS_DETERMINISTIC)}, "
                          f"this environment sets {given!r}: unset it or set one of those")
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    if given is None:
        os.environ[CUBLAS_WORKSPACE] = CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(True)
    # By default that mode also fills every new tensor with NaN, a kernel per allocation (several a layer in a
    # decode step, captured into its graph): torch's safety net for operations that read memory nobody wrote.
    # The decoder writes every buffer it reads (the cache and its buffers start as zeros, each kernel writes its
    # whole output), which torch documents as the case where the fill can be turned off and results still repeat.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        what = str(e).splitlines()[0].split(", but you set")[0]  # "put_ does not have a deterministic implementation"
        raise ConfigError(f"{what}: run without deterministic decoding (--deterministic)") from e
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        if given is None:
            del os.environ[CUBLAS_WORKSPACE]


def mode_attention():
    """Under `torch.use_deterministic_algorithms(True)`, which torch does not apply to it, SDPA without its cuDNN
    backend: cuDNN's kernels gave different logits on identical batch-32 decode steps (H100, torch 2.11, the 1B
    shape with a 128-token prompt), the memory-efficient ones (chosen instead; flash takes no additive mask) the
    same logits every time, ~5% slower a step (benchmarks/NOTES.md §6). Prefills too: their cuDNN logits repeated
    in that probe, but nothing promises it at other shapes. Otherwise SDPA's default dispatch."""
    if not torch.are_deterministic_algorithms_enabled():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
