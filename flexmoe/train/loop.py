"""The one training loop, for the dense anchor (every parameter trainable) and for experts (owner tensors only).

accelerate handles device placement, bf16 autocast and data-parallel runs under `accelerate launch` /
`torchrun`; the optimizer is AdamW over the parameters with `requires_grad` only, so frozen tensors have no
optimizer state. Loss = next-token cross-entropy + LM z-loss + router z-loss (no load-balancing loss).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from flexmoe.config import Device, TrainConfig
from flexmoe.data import PackedData
from flexmoe.errors import ConfigError
from flexmoe.model.upcycle import router_z_loss
from flexmoe.train.state import TrainState, latest_checkpoint, load_state, save_state


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (a resumed run counts the earlier ones)
    final_loss: float | None  # mean LM cross-entropy over the last logging window
    tokens: int  # tokens trained on in total
    wall_s: float  # this invocation
    tokens_per_s: float  # this invocation, all processes together
    resumed_from: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, windowed loss) at each log point


def make_accelerator(cfg: TrainConfig):
    """An `Accelerator` for this run; a later run in the same process may use another precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if cfg.device == Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    precision = "bf16" if cfg.bf16 else "no"
    state = AcceleratorState._shared_state
    if "_mixed_precision" in state and state["_mixed_precision"] != precision:
        # accelerate keeps one process-wide precision; a new run (tests, notebooks, recipes) may differ.
        AcceleratorState._reset_state()
    # Without CUDA only cpu=True makes accelerate see a multi-process CPU launch (torchrun, accelerate launch).
    return Accelerator(mixed_precision=precision, cpu=cfg.device == Device.CPU or not torch.cuda.is_available())


def warmup_steps(cfg: TrainConfig) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(2000, cfg.max_steps // 20)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    warm = warmup_steps(cfg)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on matrices, never on norms, embeddings, router rows or biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lm_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, z-loss) of logits (B, T, V) against targets (B, T); one logsumexp serves both."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (lse - target_logit).mean(), lse.square().mean()


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def mean_loss(model, data: PackedData, *, num_seqs: int, batch_size: int = 8, position: int = 0) -> float:
    """Mean next-token cross-entropy of `model` on `num_seqs` blocks of `data` (evaluation, no training)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(position, position + num_seqs, batch_size):
        count = min(batch_size, position + num_seqs - start)
        inputs, targets = data.batch(start, count)
        logits = model(input_ids=inputs.to(device), use_cache=False).logits
        total += float(lm_losses(logits, targets.to(device))[0]) * count
        n += count
    model.train(was_training)
    return total / n


def _check_identity(saved: dict, current: dict, ckpt: Path) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ConfigError(f"cannot resume from {ckpt}: {key} differs from the interrupted run "
                              f"({saved.get(key)!r} then, {current.get(key)!r} now); start over with --overwrite")


def train(model, data: PackedData, cfg: TrainConfig, *, work_dir: Path | None = None, resume: bool = False,
          identity: dict | None = None, on_step: Callable[[int], None] | None = None, desc: str = "train",
          progress: bool = True) -> tuple[TrainResult, torch.nn.Module]:
    """Train `model` (its `requires_grad` flags say what) on `data`; returns the result and the unwrapped model.

    Args:
        model: an HF causal LM on CPU; `upcycle`d expert models also get the router z-loss.
        data: packed blocks of `cfg.seq_len` tokens.
        cfg: optimisation settings; `cfg.max_steps` optimizer steps are run in total.
        work_dir: where resume checkpoints go (every `cfg.checkpoint_every` steps and at the end).
        resume: continue from the newest checkpoint in `work_dir` (from scratch if there is none).
        identity: what a resumed run must share with the interrupted one (anchor, data, settings).
        on_step: called with the number of steps done after each optimizer step (and its checkpoint).
    """
    accelerator = make_accelerator(cfg)
    identity = identity or {}
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    params = list(trainable_tensors(inner).values())

    step, position, resumed_from, last_loss = 0, 0, 0, None
    ckpt = latest_checkpoint(work_dir) if (resume and work_dir is not None) else None
    if ckpt is not None:
        state, tensors, opt_state = load_state(ckpt)
        _check_identity(state.identity, identity, ckpt)
        with torch.no_grad():
            for name, p in trainable_tensors(inner).items():
                if name not in tensors or tensors[name].shape != p.shape:
                    raise ConfigError(f"cannot resume from {ckpt}: tensor {name} is missing or has another shape")
                p.copy_(tensors[name])
        optimizer.load_state_dict(opt_state)
        step, position, resumed_from, last_loss = state.step, state.position, state.step, state.loss

    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * data.seq_len
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", disable=not (main and progress),
               dynamic_ncols=True)
    losses: list[tuple[int, float]] = []
    window = torch.zeros((), device=accelerator.device)
    window_n = 0
    start_step, t0 = step, time.perf_counter()

    def checkpoint(done: int) -> None:
        accelerator.wait_for_everyone()
        if main and work_dir is not None:
            state = TrainState(step=done, position=position, seed=cfg.seed, loss=last_loss, identity=identity)
            save_state(work_dir, state, trainable_tensors(inner), optimizer.state_dict())
        accelerator.wait_for_everyone()

    while step < cfg.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        for micro in range(cfg.grad_accum):
            inputs, targets = data.batch(position + rank * cfg.batch_size, cfg.batch_size)  # (B, T) each
            position += cfg.batch_size * world
            sync = micro == cfg.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                logits = model(input_ids=inputs.to(accelerator.device), use_cache=False).logits  # (B, T, V)
                ce, z = lm_losses(logits, targets.to(accelerator.device))
                loss = ce + cfg.lm_z_loss * z
                rz = router_z_loss(inner)
                if rz is not None:
                    loss = loss + cfg.router_z_loss * rz
                accelerator.backward(loss / cfg.grad_accum)
            window += ce.detach() / cfg.grad_accum
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_n += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last_loss = float(accelerator.reduce(window / window_n, reduction="mean"))  # the only host sync
            losses.append((step, last_loss))
            window.zero_()
            window_n = 0
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{(step - start_step) * tokens_per_step / elapsed:,.0f}")
        if work_dir is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            checkpoint(step)
        if on_step is not None:
            on_step(step)
    bar.close()
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - t0
    done = (step - start_step) * tokens_per_step
    result = TrainResult(steps=step, final_loss=last_loss, tokens=step * tokens_per_step, wall_s=wall,
                         tokens_per_s=done / wall if wall > 0 else 0.0, resumed_from=resumed_from, losses=losses)
    return result, inner
