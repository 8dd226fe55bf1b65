"""FSDP2 for the training loop: the model's tensors sharded over the processes with torch's `fully_shard`.

Switched on by `accelerate launch` with a `fsdp_version: 2` config (recipes/accelerate/fsdp2.yaml, read from the
environment that `accelerate launch` sets, also on machines without GPUs); plain `torchrun` gives DDP. flexmoe
shards the model itself instead of through `accelerator.prepare`: accelerate applies FSDP only on GPUs, and this
way the CPU (gloo) test runs the same code as an 8-GPU job.

- One FSDP unit per decoder layer; embeddings, final norm and LM head in the root unit. Frozen tensors (shared
  layers, public FFN, r_pub) are sharded like the trainable ones, but get no gradients and no optimizer state.
- The numbers are DDP's: the same bf16 autocast (no FSDP mixed-precision policy), gradients averaged over the
  processes, the same data order.
- Resume checkpoints and the model handed back hold **full** trainable tensors and optimizer state, in the
  layout of a one-process run (nothing in them depends on the sharding). Gathering them is a collective: every
  process calls `full_tensors` / `full_optimizer_state` / `gather_trainable_`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn

from flexmoe.errors import ConfigError


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True  # free each layer's gathered tensors after its forward (less memory)


def settings(accelerator) -> FSDPSettings | None:
    """The FSDP settings of this launch, or None when it is not a multi-process FSDP launch. Refuses what flexmoe
    cannot honour."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.state.distributed_type != DistributedType.FSDP:
        # accelerate applies FSDP only to GPU launches: read the launch config where it did not (CPU machines).
        plugin = FullyShardedDataParallelPlugin() if parse_flag_from_env("ACCELERATE_USE_FSDP") else None
    if plugin is None:
        return None
    from torch.distributed.fsdp import CPUOffloadPolicy

    if plugin.fsdp_version != 2:
        raise ConfigError(f"flexmoe shards with FSDP2 only: set fsdp_version: 2 in the accelerate config "
                          f"(got {plugin.fsdp_version}); recipes/accelerate/fsdp2.yaml is a ready one")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ConfigError("fsdp_offload_params is not supported by flexmoe: set it to false")
    if plugin.cpu_ram_efficient_loading:
        # transformers would leave the weights of every process but the first empty; flexmoe loads them all.
        raise ConfigError("set fsdp_cpu_ram_efficient_loading: false in the accelerate config (flexmoe loads the "
                          "anchor in every process itself)")
    if plugin.activation_checkpointing:
        raise ConfigError("fsdp_activation_checkpointing is not used by flexmoe: set it to false and pass "
                          "--set train.grad_checkpointing=true instead")
    if accelerator.num_processes < 2:
        return None  # nothing to shard over (and no process group to shard with)
    return FSDPSettings(reshard_after_forward=bool(plugin.reshard_after_forward))


PARALLELISM_ENV = "ACCELERATE_USE_PARALLELISM_CONFIG"  # set by `accelerate launch` for a parallelism_config


@contextmanager
def accelerator_env(cpu: bool):
    """Around the making of a CPU run's `Accelerator`: hide an HSDP launch's parallelism config, which accelerate
    accepts only for GPU launches (it raises for MULTI_CPU); `_mesh` reads it itself, as `settings` reads FSDP's."""
    hidden = os.environ.pop(PARALLELISM_ENV, None) if cpu else None
    try:
        yield
    finally:
        if hidden is not None:
            os.environ[PARALLELISM_ENV] = hidden


def _mesh(accelerator, device: torch.device):
    """accelerate's mesh when its parallelism config asks for HSDP (replicate x shard), else all processes in one.
    On CPU processes, where accelerate leaves the config out (`accelerator_env`), the same mesh is built here from
    the launch's PARALLELISM_CONFIG_* variables with accelerate's own `ParallelismConfig`."""
    from torch.distributed.device_mesh import init_device_mesh

    config = getattr(accelerator, "parallelism_config", None)
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if config is None and device.type == "cpu" and os.environ.get(PARALLELISM_ENV, "").lower() == "true":
        from accelerate.parallelism_config import ParallelismConfig

        config = ParallelismConfig()  # sizes from the environment, as accelerate reads them on GPUs
        if config.total_size != accelerator.num_processes:
            raise ConfigError(f"the parallelism config spans {config.total_size} processes, the launch has "
                              f"{accelerator.num_processes}: make dp_replicate_size x dp_shard_size match")
        mesh = config.get_device_mesh(device.type)
    if config is not None and mesh is not None:
        return mesh[tuple(config.fsdp_dim_names)]
    return init_device_mesh(device.type, (accelerator.num_processes,))


def shard(loss_module: nn.Module, inner: nn.Module, accelerator, fsdp: FSDPSettings, bf16: bool) -> nn.Module:
    """`fully_shard` the decoder layers of `inner` (an HF causal LM inside `loss_module`) and `loss_module` as the
    root, on this process's device; returns `loss_module`, which runs under bf16 autocast if `bf16`.

    The model may still be on CPU: each unit is moved to the device as it is sharded, so one process never holds
    more than its shards plus one unit on the device.
    """
    from torch.distributed.fsdp import fully_shard

    device = accelerator.device
    mesh = _mesh(accelerator, device)
    for layer in getattr(inner, inner.base_model_prefix).layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward)
    # The root's tensors (embeddings, LM head) are needed again at once by backward: keep them gathered.
    fully_shard(loss_module, mesh=mesh, reshard_after_forward=False)
    if bf16:  # what `accelerator.prepare` does for bf16: torch.autocast around forward
        forward = torch.autocast(device_type=device.type, dtype=torch.bfloat16)(type(loss_module).forward)
        loss_module.forward = MethodType(forward, loss_module)
    return loss_module


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t, keep: bool):
    """A sharded tensor gathered (a collective) and moved to CPU where `keep`, else dropped at once (None), so a
    device holds one gathered tensor at a time; an unsharded tensor as it is."""
    if not _is_dtensor(t):
        return t
    full = t.full_tensor()
    return full.cpu() if keep else None


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor | None]:
    """`tensors` with every sharded one gathered to its full value (every process calls this; only where `keep`
    are the values kept)."""
    return {k: _full(v, keep) for k, v in tensors.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """`optimizer.state_dict()` with sharded state gathered: the state of a one-process run (every process calls
    this; only where `keep` are the values kept)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {i: {k: _full(v, keep) for k, v in per_param.items()} for i, per_param in state["state"].items()}
    return state


@torch.no_grad()
def copy_full_(param: nn.Parameter, value: torch.Tensor) -> None:
    """Copy a full tensor into `param`, sharded or not (each process keeps its own shard; no communication)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


def shard_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of full state: cut each sharded parameter's state to its shard, as FSDP keeps it."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and not _is_dtensor(v) and v.shape == p.shape:
                    optimizer.state[p][k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)


@torch.no_grad()
def gather_trainable_(model: nn.Module, keep: bool = True) -> None:
    """Where `keep`, replace every sharded trainable parameter of `model` by its full value on CPU, so the caller
    can export them (every process calls this; elsewhere they stay sharded). Frozen tensors stay sharded: the
    model is meant for export only afterwards, not for more steps."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and _is_dtensor(p):
                full = _full(p, keep)
                if keep:
                    module._parameters[name] = nn.Parameter(full, requires_grad=True)


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` (it changes the class of every module it shards)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def unsharded_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain module from `build()` (called on the meta device) holding `model`'s parameters, after
    `gather_trainable_` made every one of them full: FSDP's modules cannot be cast or saved as a whole."""
    with torch.device("meta"):
        plain = build()
    params = dict(model.named_parameters())
    sharded = sorted(name for name, p in params.items() if _is_dtensor(p))
    if sharded:
        raise ValueError(f"{len(sharded)} tensors are still sharded (e.g. {sharded[0]}): gather them first")
    plain.load_state_dict(params, strict=True, assign=True)
    return plain
