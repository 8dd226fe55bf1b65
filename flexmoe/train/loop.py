"""The one training loop, for the dense anchor (every parameter trainable) and for experts (owner tensors only).

accelerate handles device placement, bf16 autocast and data-parallel runs under `accelerate launch` /
`torchrun`; the optimizer is AdamW over the parameters with `requires_grad` only, so frozen tensors have no
optimizer state. Loss = next-token cross-entropy + LM z-loss + router z-loss (no load-balancing loss).

Speed and memory (issue 7; benchmarks/train_bench.py measures them, benchmarks/NOTES.md has the counts):
- with bf16, frozen matmul weights are held in bf16 for the run (`frozen_matmul_weights`): autocast would cast
  them at every use, so the numbers are the same, without the casts and with half their memory;
- for OLMo-2 / FlexOlmo the LM loss never forms the (tokens, vocab) logits: `ChunkedLMLoss` runs the LM head
  and cross-entropy + z-loss in chunks and makes the gradients in the same pass;
- `TrainConfig.compile` compiles each decoder layer (and the loss kernel) with torch.compile; without it the
  RMSNorms run through torch's fused `F.rms_norm` and the expert FFN through `upcycle.SwiGLUFFN`;
- no host syncs per step except the loss read every `log_every` steps (and transformers' own mask check).
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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexmoe.config import Device, TrainConfig
from flexmoe.data import PackedData
from flexmoe.errors import ConfigError
from flexmoe.model.upcycle import ExpertMoEBlock, compute_dtype, public_route_loss, router_z_loss
from flexmoe.train import fsdp
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
    route_loss: float = 0.0  # coefficient of `upcycle.public_route_loss`


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


LOSS_CHUNK_LOGITS = 2**28  # logits per chunk of `ChunkedLMLoss` (1 GiB in fp32): 4 chunks of 2048 tokens at B2 x 4096
CHUNKED_LOSS_MODELS = ("Olmo2ForCausalLM", "FlexOlmoForCausalLM")  # logits = lm_head(last hidden state), no bias


def loss_chunk(logits: torch.Tensor, targets: torch.Tensor, inv_n: float, z_coef: float, grad: bool):
    """Sums of cross-entropy and of lse^2 over one chunk of logits (n, V) against targets (n,) and, if `grad`,
    the gradient of (ce + z_coef * z) / N w.r.t. these logits, softmax * (1 + 2 z_coef lse) / N - onehot / N,
    in the logits' dtype (what autograd of `lm_losses` would hand the LM head's matmul)."""
    x = logits.float()  # (n, V)
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    target_logit = x.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    ce, z = (lse - target_logit).sum(), lse.square().sum()
    if not grad:
        return None, ce, z
    g = x.sub_(lse[:, None]).exp_().mul_(((1 + 2 * z_coef * lse) * inv_n)[:, None])  # in place: one (n, V) buffer
    g.scatter_add_(-1, targets[:, None], torch.full_like(lse[:, None], -inv_n))
    return g.to(logits.dtype), ce, z


class ChunkedLMLoss(torch.autograd.Function):
    """(ce + z_coef * z, ce, z) of hidden states (N, H) under LM-head weight (V, H) against targets (N,): the same
    numbers as `lm_losses` on `F.linear(hidden, weight)` under autocast, but the (N, V) logits are made a chunk of
    `LOSS_CHUNK_LOGITS` at a time and their gradients w.r.t. hidden and weight (when those need them) are made
    in the same pass, so no logits are kept for backward or recomputed. Matmuls run in `cdt`; the weight's
    gradient is summed in fp32. ce and z are returned detached, for logging."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_coef: float, cdt: torch.dtype, chunk_fn):
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here; out= skips autocast
            h, w = hidden.to(cdt), weight.to(cdt)  # (N, H), (V, H)
            n_tok = h.shape[0]
            size = -(-n_tok // max(1, -(-n_tok * w.shape[0] // LOSS_CHUNK_LOGITS)))  # equal chunks
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            ce = z = None
            for s in range(0, n_tok, size):
                hc = h[s:s + size]  # (n, H)
                g, c, zz = chunk_fn(F.linear(hc, w), targets[s:s + size], 1.0 / n_tok, z_coef, need_h or need_w)
                ce, z = (c, zz) if ce is None else (ce + c, z + zz)
                if need_h:
                    torch.mm(g, w, out=grad_h[s:s + size])
                if need_w:
                    grad_w += g.t().mm(hc)  # (V, H)
            ce, z = ce / n_tok, z / n_tok
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, z)
        return ce + z_coef * z, ce, z

    @staticmethod
    def backward(ctx, d_loss, _d_ce, _d_z):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h.float() * d_loss).to(grad_h.dtype)
        dw = None if grad_w is None else grad_w * d_loss
        return dh, dw, None, None, None, None


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_coef: float,
            chunk_fn=loss_chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce + z_coef * z, ce, z) of hidden (N, H), LM-head weight (V, H), targets (N,) through `ChunkedLMLoss`."""
    return ChunkedLMLoss.apply(hidden, weight, targets, z_coef, compute_dtype(hidden), chunk_fn)


class CausalLMLoss(nn.Module):
    """`model` and its training loss as one module, so accelerate's autocast and DDP wrap both:
    forward(inputs (B, T), targets (B, T)) -> (loss, detached cross-entropy).

    Loss = ce + lm_z * z + router_z * `router_z_loss` (experts only). For `CHUNKED_LOSS_MODELS` the backbone's
    last hidden state goes through `lm_loss` with the LM head's weight; other models form logits as usual.
    """

    def __init__(self, model, lm_z: float, router_z: float, chunk_fn=loss_chunk, router_z_fn=router_z_loss,
                 route: float = 0.0):
        super().__init__()
        self.model = model
        self.lm_z, self.router_z, self.chunk_fn, self.route = lm_z, router_z, chunk_fn, route
        self.router_z_fn = router_z_fn  # model -> router z-loss of its last forward, or None
        head = model.get_output_embeddings()
        self.chunked = type(model).__name__ in CHUNKED_LOSS_MODELS and getattr(head, "bias", None) is None

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chunked:
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
            loss, ce, _ = lm_loss(hidden.flatten(0, 1), self.model.get_output_embeddings().weight,
                                  targets.flatten(), self.lm_z, self.chunk_fn)
        else:
            logits = self.model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            ce, z = lm_losses(logits, targets)
            loss, ce = ce + self.lm_z * z, ce.detach()
        rz = self.router_z_fn(self.model)
        if rz is not None:
            loss = loss + self.router_z * rz
        if self.route:
            loss = loss + self.route * public_route_loss(self.model)
        return loss, ce


def frozen_matmul_weights(model) -> list[nn.Parameter]:
    """Frozen parameters used only as matmul weights: linear layers (not tied to the embedding) and an expert
    block's public FFN. Autocast casts these to its dtype at every use; norm weights and embeddings are used in
    fp32 arithmetic and are not listed."""
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            names = ("weight", "bias")
        elif isinstance(module, ExpertMoEBlock):
            names = ExpertMoEBlock.MATMUL_WEIGHTS
        else:
            continue
        for name in names:
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and not p.requires_grad and p.is_floating_point() and id(p) not in tied:
                found[id(p)] = p
    return list(found.values())


def _hold_frozen_in(model, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Store `frozen_matmul_weights` in `dtype`; returns what to undo. The run's numbers do not change (autocast
    would make the same casts); after the run a weight from an fp32 anchor holds its bf16-rounded value."""
    changed = []
    for p in frozen_matmul_weights(model):
        if p.dtype != dtype:
            changed.append((p, p.dtype))
            p.data = p.data.to(dtype)
    return changed


RMS_NORMS = ("Olmo2RMSNorm", "FlexOlmoRMSNorm")  # forward: (weight * (x32 * rsqrt(mean(x32^2) + eps))).to(x.dtype)


def _fused_rms_forward(norm, hidden_states: torch.Tensor) -> torch.Tensor:
    # The same formula in fp32 as `Olmo2RMSNorm.forward`, as one op: torch's fused RMSNorm kernel on CUDA
    # (a forward and a backward kernel instead of ~6 + ~10 elementwise passes over fp32 copies).
    x = hidden_states.float()  # (..., H)
    return F.rms_norm(x, norm.weight.shape, norm.weight.float(), norm.variance_epsilon).to(hidden_states.dtype)


def _fuse_rms_norms(model) -> Callable[[], None]:
    """Run OLMo-2's RMSNorms through `F.rms_norm` for this run (eager only: compiled, inductor fuses them
    itself). An instance-level `forward`, removed by the returned undo."""
    import functools

    norms = [m for m in model.modules() if type(m).__name__ in RMS_NORMS]
    for norm in norms:
        norm.forward = functools.partial(_fused_rms_forward, norm)

    def undo() -> None:
        for norm in norms:
            del norm.forward

    return undo


def _compile_layers(model) -> Callable[[], None]:
    """torch.compile every decoder layer in place (parameter names, state dict and checkpointing unchanged);
    all layers share one compiled graph (a second one for a first layer that needs no input gradient).
    Returns the undo, so the returned model runs eagerly with any input later."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    layers = list(getattr(model, model.base_model_prefix).layers)
    for layer in layers:
        layer.compile(dynamic=False)
    knobs = [
        # Let the partitioner recompute cheap elementwise results that backward feeds to a matmul (the SwiGLU
        # product, bf16 weight copies) instead of keeping them from forward to backward: same numbers, less memory.
        (functorch_config, "ban_recompute_materialized_backward", False),
        # Under activation checkpointing the only side effect, `ExpertMoEBlock.router_logits`, need not be replayed
        # by the recompute (it stores the same values); without this, dynamo breaks the graph at the checkpoint.
        (dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True),
    ]
    before = [(mod, name, getattr(mod, name)) for mod, name, _ in knobs if hasattr(mod, name)]
    for mod, name, value in knobs:
        if hasattr(mod, name):
            setattr(mod, name, value)

    def undo() -> None:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set
        for mod, name, value in before:
            setattr(mod, name, value)

    return undo


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
          progress: bool = True, router_z_fn: Callable | None = None,
          init: Callable[[torch.nn.Module, Callable], None] | None = None, public: PublicMix | None = None,
          after_step: Callable[[torch.nn.Module], None] | None = None) -> tuple[TrainResult, torch.nn.Module]:
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
        router_z_fn: model -> router z-loss of its last forward, or None (default `router_z_loss`, which knows
            upcycled expert blocks; router tuning passes its own).
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
    held = _hold_frozen_in(model, torch.bfloat16) if cfg.bf16 else []
    restore = _compile_layers(model) if cfg.compile else _fuse_rms_norms(model)
    try:
        result = _train(model, data, cfg, accelerator, sharding=sharding, router_z_fn=router_z_fn or router_z_loss,
                        work_dir=work_dir, resume=resume, identity=identity or {},
                        on_step=on_step, desc=desc, progress=progress, init=init, public=public,
                        after_step=after_step)
        if sharding is not None:  # the main process exports the trained tensors: gather them there
            fsdp.gather_trainable_(model, keep=accelerator.is_main_process)
    finally:  # the caller gets the model back as it gave it: eager, every tensor in its own dtype
        restore()
        for block in blocks:
            block.public_tokens, block.detach_public = 0, False
        for p, dtype in held:
            p.data = p.data.to(dtype)
    return result, model


def _train(inner, data: PackedData, cfg: TrainConfig, accelerator, *, sharding, router_z_fn, work_dir, resume,
           identity, on_step, desc, progress, init=None, public: PublicMix | None = None,
           after_step=None) -> TrainResult:
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    chunk_fn = torch.compile(loss_chunk, dynamic=False) if cfg.compile else loss_chunk
    model = CausalLMLoss(inner, cfg.lm_z_loss, cfg.router_z_loss, chunk_fn, router_z_fn,
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
        state, tensors, opt_state = load_state(ckpt)
        _check_identity(state.identity, identity, ckpt)
        with torch.no_grad():
            for name, p in trainable_tensors(inner).items():
                if name not in tensors or tensors[name].shape != p.shape:
                    raise ConfigError(f"cannot resume from {ckpt}: tensor {name} is missing or has another shape")
                fsdp.copy_full_(p, tensors[name])
        optimizer.load_state_dict(opt_state)
        fsdp.shard_optimizer_state_(optimizer)
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

    def checkpoint(done: int) -> None:
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
                pub_in, pub_tg = public.data.batch(at, public.rows)  # (B_pub, T) each, last: see router_only
                inputs, targets = torch.cat((inputs, pub_in)), torch.cat((targets, pub_tg))
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
    return TrainResult(steps=step, final_loss=last_loss, tokens=step * tokens_per_step, wall_s=wall,
                       tokens_per_s=done / wall if wall > 0 else 0.0, resumed_from=resumed_from, losses=losses)
