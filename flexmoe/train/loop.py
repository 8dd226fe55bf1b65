"""The one training loop, for the dense anchor (every parameter trainable) and for experts (owner tensors only).

accelerate handles device placement, bf16 autocast and data-parallel runs under `accelerate launch` /
`torchrun` (`accel.make_accelerator`; FSDP2 in `fsdp.py`); the optimizer is AdamW over the parameters with
`requires_grad` only, so frozen tensors have no optimizer state. The loss is `losses.CausalLMLoss`: next-token
cross-entropy + LM z-loss + router z-loss (no load-balancing loss). `speed.py` holds the speed options (bf16
frozen weights, compiled layers, fused norms); no host syncs per step except the loss read every `log_every`
steps (and transformers' own mask check). Resume checkpoints (`state.py`) hold the trainable tensors, the
optimizer state and the data position, every `cfg.checkpoint_every` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from flexmoe.config import TrainConfig
from flexmoe.data import PackedData
from flexmoe.errors import ConfigError
from flexmoe.expert.upcycle import ExpertMoEBlock
from flexmoe.train import fsdp, speed
from flexmoe.train.accel import make_accelerator
from flexmoe.train.losses import CausalLMLoss, lm_losses, router_z_loss
from flexmoe.train.state import TrainState, latest_checkpoint, load_state, save_state


@dataclass(frozen=True)
class PublicMix:
    """Public sequences in every micro-batch of an expert's training (`config.RouterTraining`).

    Each micro-batch is `cfg.batch_size` sequences: `rows` from `data` (public text) after the owner's
    `cfg.batch_size - rows`; with `router_only` only the router row and bias learn from the public ones, and
    `route_loss` > 0 adds that coefficient times `public_route_loss` (mean -log p_public on them).
    """

    data: PackedData
    rows: int
    router_only: bool
    route_loss: float = 0.0  # coefficient of `losses.public_route_loss`

    def appended(self, inputs: torch.Tensor, targets: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The owner's (B_own, T) inputs and targets with `rows` public blocks from block `at` after them (last:
        the expert blocks take the last `public_tokens` tokens as the public ones)."""
        pub_in, pub_tg = self.data.batch(at, self.rows)  # (B_pub, T) each
        return torch.cat((inputs, pub_in)), torch.cat((targets, pub_tg))


@dataclass
class TrainStats:
    steps: int  # optimizer steps done in total (a resumed run counts the earlier ones)
    final_loss: float | None  # mean LM cross-entropy over the last logging window
    tokens: int  # tokens trained on in total
    wall_s: float  # this invocation
    tokens_per_s: float  # this invocation, all processes together
    resumed_from: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, windowed loss) at each log point


def train(model, data: PackedData, cfg: TrainConfig, *, work_dir: Path | None = None, resume: bool = False,
          identity: dict | None = None, on_step: Callable[[int], None] | None = None, desc: str = "train",
          progress: bool = True,
          init: Callable[[torch.nn.Module, Callable], None] | None = None, public: PublicMix | None = None,
          after_step: Callable[[torch.nn.Module], None] | None = None) -> tuple[TrainStats, torch.nn.Module]:
    """Train `model` (its `requires_grad` flags say what) on `data`; returns the result and the unwrapped model.

    Args:
        model: an HF causal LM on CPU, or on the meta device with `init`; `upcycle`d expert models also get the
            router z-loss.
        data: packed blocks of `cfg.seq_len` tokens.
        cfg: optimisation settings; `cfg.max_steps` optimizer steps are run in total.
        work_dir: where resume checkpoints go (every `cfg.checkpoint_every` steps and at the end).
        resume: continue from the newest checkpoint in `work_dir` (from scratch if there is none).
        identity: what a resumed run must share with the interrupted one (anchor, data, settings).
        on_step: called with the number of steps done after each optimizer step (and its checkpoint).
        init: for a `model` on the meta device: called as `init(model, put)` once its tensors are allocated where
            they train (on the device, or sharded over the processes), to give them their values; `put(param,
            full_value)` stores one full tensor, sharded or not (`fsdp.copy_full_`).
        public: public sequences mixed into every micro-batch (expert models only), see `PublicMix`.
        after_step: called with the unwrapped model after every optimizer step (e.g. `project_biases_`).

    Under an FSDP2 launch (flexmoe/train/fsdp.py) the returned model of the main process holds full trainable
    tensors (on CPU), for export; frozen tensors stay sharded.
    """
    accelerator = make_accelerator(cfg)
    sharding = fsdp.settings(accelerator)  # an FSDP2 launch (accelerate launch --config_file ...fsdp2.yaml)
    if sharding is not None and cfg.compile:
        raise ConfigError("train.compile is not supported under FSDP yet: leave it off")
    if cfg.compile is None:  # auto: compiled decoder layers measured 1.5x faster on an H100 (benchmarks/NOTES.md)
        cfg = dataclasses.replace(cfg, compile=accelerator.device.type == "cuda" and sharding is None)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Under FSDP each unit moves to the device as it is sharded: the whole model need never fit on one device.
    if sharding is None and init is None:
        model.to(accelerator.device)
    elif sharding is None:  # a meta model: allocated on the device and filled there, tensor by tensor
        model.to_empty(device=accelerator.device)
        init(model, fsdp.copy_full_)
    model.train()
    if public is not None and not 1 <= public.rows < cfg.batch_size:
        raise ConfigError(f"{public.rows} public sequences do not fit a micro-batch of {cfg.batch_size}: "
                          "raise train.batch_size or lower router_training.public_ratio")
    blocks = [m for m in model.modules() if isinstance(m, ExpertMoEBlock)]
    for block in blocks:  # before compiling: the compiled layers take these constants
        block.public_tokens = public.rows * data.seq_len if public is not None else 0
        block.detach_public = public is not None and public.router_only
    restore = speed.speed_up(model, bf16=cfg.bf16, compile=cfg.compile)
    try:
        result = _train(model, data, cfg, accelerator, sharding=sharding,
                        work_dir=work_dir, resume=resume, identity=identity or {},
                        on_step=on_step, desc=desc, progress=progress, init=init, public=public,
                        after_step=after_step)
        if sharding is not None:  # the main process exports the trained tensors: gather them there
            fsdp.gather_trainable_(model, keep=accelerator.is_main_process)
    finally:  # the caller gets the model back as it gave it: eager, every tensor in its own dtype
        restore()
        for block in blocks:
            block.public_tokens, block.detach_public = 0, False
    return result, model


def _train(inner, data: PackedData, cfg: TrainConfig, accelerator, *, sharding, work_dir, resume,
           identity, on_step, desc, progress, init=None, public: PublicMix | None = None,
           after_step=None) -> TrainStats:
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    model = CausalLMLoss(inner, cfg.lm_z_loss, cfg.router_z_loss, speed.loss_kernel(cfg.compile), router_z_loss,
                         route=public.route_loss if public is not None else 0.0)
    if sharding is not None:  # FSDP2: shard first, so the optimizer is built over the shards
        model = fsdp.shard(model, inner, accelerator, sharding, cfg.bf16)
        if init is not None:  # a meta model: each process allocates its shards only, then fills them
            model.to_empty(device=device)
            init(inner, fsdp.copy_full_)
    optimizer = torch.optim.AdamW(param_groups(inner, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  fused=device.type == "cuda")
    if sharding is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    params = list(trainable_tensors(inner).values())

    step, position, resumed_from, last_loss, resumed = 0, 0, 0, None, None
    ckpt = latest_checkpoint(work_dir) if (resume and work_dir is not None) else None
    if ckpt is not None:
        state = _resume(ckpt, inner, optimizer, identity)
        step, position, resumed_from, last_loss = state.step, state.position, state.step, state.loss
        resumed = state

    own_rows = cfg.batch_size - (public.rows if public is not None else 0)  # owner sequences per micro-batch
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * data.seq_len
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", disable=not (main and progress),
               dynamic_ncols=True)
    losses: list[tuple[int, float]] = []
    window = torch.zeros((), device=device)  # this process's sum of step losses since the last log point
    window_n = 0
    if resumed is not None and resumed.window_steps:
        # The open window of the interrupted run (per process; its mean if the number of processes changed).
        sums = resumed.window
        window.fill_(sums[rank] if len(sums) == world else sum(sums) / len(sums))
        window_n = resumed.window_steps
    start_step, t0 = step, time.perf_counter()

    def checkpoint(done: int) -> None:  # every process calls it
        accelerator.wait_for_everyone()
        # Full tensors and optimizer state, whatever the sharding; gathering them is a collective under FSDP.
        tensors = fsdp.full_tensors(trainable_tensors(inner), keep=main)
        opt_state = fsdp.full_optimizer_state(optimizer, keep=main)
        sums = accelerator.gather(window.reshape(1)).tolist() if window_n else []  # a collective, like the above
        if main and work_dir is not None:
            state = TrainState(step=done, position=position, seed=cfg.seed, loss=last_loss, identity=identity,
                               window=sums, window_steps=window_n)
            save_state(work_dir, state, tensors, opt_state)
        accelerator.wait_for_everyone()

    while step < cfg.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        for micro in range(cfg.grad_accum):
            inputs, targets = data.batch(position + rank * own_rows, own_rows)  # (B_own, T) each
            position += own_rows * world
            if public is not None:  # a fixed share of every micro-batch, so its place follows from the step
                at = ((step * cfg.grad_accum + micro) * world + rank) * public.rows
                inputs, targets = public.appended(inputs, targets, at)
            sync = micro == cfg.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                # Pageable host memory is staged at once, so a non-blocking copy is safe and does not wait for the GPU.
                loss, ce = model(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
                accelerator.backward(loss / cfg.grad_accum)
            window += ce / cfg.grad_accum
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(inner)
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
    return TrainStats(steps=step, final_loss=last_loss, tokens=step * tokens_per_step, wall_s=wall,
                       tokens_per_s=done / wall if wall > 0 else 0.0, resumed_from=resumed_from, losses=losses)


def _resume(ckpt: Path, inner, optimizer, identity: dict) -> TrainState:
    """Load resume checkpoint `ckpt` into the trainable tensors of `inner` and into `optimizer` (sharded or not);
    returns its state (step, data position, last loss)."""
    state, tensors, opt_state = load_state(ckpt)
    _check_identity(state.identity, identity, ckpt)
    with torch.no_grad():
        for name, p in trainable_tensors(inner).items():
            if name not in tensors or tensors[name].shape != p.shape:
                raise ConfigError(f"cannot resume from {ckpt}: tensor {name} is missing or has another shape")
            fsdp.copy_full_(p, tensors[name])
    optimizer.load_state_dict(opt_state)
    fsdp.shard_optimizer_state_(optimizer)
    return state


def _check_identity(saved: dict, current: dict, ckpt: Path) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ConfigError(f"cannot resume from {ckpt}: {key} differs from the interrupted run "
                              f"({saved.get(key)!r} then, {current.get(key)!r} now); start over with --overwrite")


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
