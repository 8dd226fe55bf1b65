"""Greedy decoding with a static KV cache and one CUDA graph per batch bucket, over the stock transformers model.

The decode step is the model's own forward (`FlexOlmoForCausalLM.__call__`) on a transformers `StaticCache`, fed
only device tensors: the position ids, a ready 4D attention mask (transformers returns a 4D mask as-is) and the
cache slot all come from the cache's own on-device length counter, so nothing in the step reads a value on the host.
That makes the step capturable once per (batch bucket, cache length) and replayable for every token: each replay
writes its token into a device buffer and feeds it back as the next input, so a whole generation is prefill +
N-1 graph replays + one copy back to the host.

Batches are padded to a bucket (1, 2, 4, ... 64) with copies of the first row, so a handful of graphs serves every
batch size; prompts of different lengths are left-padded, as `generate` expects of a decoder-only model.
Without CUDA (or with `cuda_graphs=False`) the same step runs eagerly, which is what the CPU tests check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time

import torch
from transformers import StaticCache

from flexmoe.errors import ConfigError
from flexmoe.infer.determinism import mode_attention

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CACHE_ROUND = 64  # cache lengths are rounded up to this, so nearby prompt lengths share a graph
PREFILL_ROUND = 32  # prompts replayed from a CUDA graph are left-padded to a multiple of this
GRAPH_PREFILL_TOKENS = 2048  # prefills of at most this many (padded) tokens replay a CUDA graph: at that size the
# host's launches of the stock forward's ~700 kernels, not the GPU, set the pace (~25 ms at batch 1 for 16 layers)
EOS_CHECK_EVERY = 8  # decode steps between host checks for "every row has finished"
MAX_EOS = 8  # EOS ids per generation (a fixed-size buffer: the captured graph reads it in place)


class FlexStaticCache(StaticCache):
    """Identical to transformers' `StaticCache` except: `update` is never traced by torch.compile.

    A compiled decoder layer then breaks its graph at the cache write instead of specialising on the layer index
    (one compile serves every layer). Eager behaviour is unchanged.
    """

    @torch.compiler.disable
    def update(self, *args, **kwargs):
        return super().update(*args, **kwargs)


@dataclasses.dataclass
class GenerateOutput:
    """Result of `FastDecoder.generate`.

    sequences: (B, T + n) prompt (left-padded) followed by the n <= max_new_tokens new tokens.
    logits: (B, n, V) float32 next-token logits of every step when asked for, else None.
    prefill_s / decode_s: wall time of the prefill and of the decode loop (device-synchronised).
    """

    sequences: torch.Tensor
    logits: torch.Tensor | None
    prefill_s: float
    decode_s: float


def bucket_for(batch: int) -> int:
    for b in BUCKETS:
        if batch <= b:
            return b
    return BUCKETS[-1]


class _Runner:
    """Static buffers, cache and (on CUDA) the captured step for one (batch bucket, cache length)."""

    def __init__(self, model, batch: int, cache_len: int, cache_kwarg: str, fused: bool = False):
        dev = model.device
        self.model, self.batch, self.cache_len, self.cache_kwarg = model, batch, cache_len, cache_kwarg
        # decode steps run the fused layers: they take an additive mask and write K/V without advancing the lengths
        self.fused = fused
        self.cache = FlexStaticCache(config=model.config, max_cache_len=cache_len)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # (B, 1) next input token
        self.pad = torch.zeros(batch, dtype=torch.long, device=dev)  # (B,) left padding of each row
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)  # (B,) row emitted an EOS
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=dev)  # EOS ids, -1 = unused slot
        self.pad_id = torch.zeros((), dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)  # column of `tokens` written next
        self.tokens = torch.zeros(batch, cache_len, dtype=torch.long, device=dev)  # (B, L) generated tokens
        self.logits = torch.zeros(batch, model.config.vocab_size, dtype=torch.float32, device=dev)  # (B, V)
        self.slots = torch.arange(cache_len, device=dev)  # (L,)
        self.graph = None
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # by T
        self._pool = None  # one memory pool for the prefill graphs: they replay one at a time
        self._additive = model.config._attn_implementation == "eager"
        self._argmax = _argmax_fn(dev)

    def _mask(self, allowed: torch.Tensor, additive: bool = False) -> torch.Tensor:
        """(B, 1, Q, L) bool mask -> the form the attention kernel wants (eager adds a float mask; so do the fused
        decode layers, whose SDPA would otherwise convert a bool mask in every layer)."""
        if not (self._additive or additive):
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor, last_only: bool,
                additive: bool = False):
        kwargs = {self.cache_kwarg: self.cache}
        out = self.model(input_ids=ids, position_ids=position_ids, attention_mask=self._mask(allowed, additive),
                         use_cache=True, logits_to_keep=1 if last_only else 0, **kwargs)
        return out.logits[:, -1, :]  # (B, V)

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> None:
        """Reset the cache and run the (left-padded) prompts (B, T); the first new token lands in `tokens[:, 0]`."""
        B, T = ids.shape
        self.cache.reset()
        self.pad.copy_(pad)
        self.done.zero_()
        q = torch.arange(T, device=ids.device)  # (T,) prompt slot = query index (the cache starts empty)
        position_ids = (q[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)
        causal = self.slots[None, :] <= q[:, None]  # (T, L)
        real = self.slots[None, :] >= self.pad[:, None]  # (B, L)
        # A padding query may see only itself: never a fully masked row (NaN) whose K/V would poison later steps.
        allowed = (causal[None] & real[:, None]) | (self.slots[None, :] == q[:, None])[None]  # (B, T, L)
        logits = self.forward(ids, position_ids, allowed[:, None], last_only=True)
        self._emit(logits, first=True)

    def step(self) -> None:
        """One decode step from `tok`; device tensors only (this is what the CUDA graph captures)."""
        length = self.cache.layers[0].cumulative_length  # () slot of this token = tokens already cached
        position_ids = (length - self.pad)[:, None]  # (B, 1)
        allowed = (self.slots[None, :] >= self.pad[:, None]) & (self.slots[None, :] <= length)  # (B, L)
        logits = self.forward(self.tok, position_ids, allowed[:, None, None, :], last_only=False,
                              additive=self.fused)
        if self.fused:
            torch._foreach_add_([layer.cumulative_length for layer in self.cache.layers], 1)
        self._emit(logits, first=False)

    def _emit(self, logits: torch.Tensor, first: bool) -> None:
        self.logits.copy_(logits)
        nxt = self._argmax(self.logits)  # (B,) greedy
        nxt = torch.where(self.done, self.pad_id, nxt)
        self.done |= (nxt[:, None] == self.eos[None, :]).any(dim=-1)
        if first:
            self.step_idx.zero_()
        self.tokens.index_copy_(1, self.step_idx, nxt[:, None])
        self.step_idx += 1
        self.tok.copy_(nxt[:, None])

    def capture(self, step_context) -> None:
        """Warm up (allocates the cache, runs autotuning and compiles) and capture `step` in a CUDA graph.

        `step_context()` is entered around the decode steps only (it swaps in compiled layers, if any).
        """
        dummy = torch.zeros(self.batch, 8, dtype=torch.long, device=self.tok.device)
        self.prefill(dummy, torch.zeros(self.batch, dtype=torch.long, device=dummy.device))
        with step_context():  # a private memory pool per decode graph: buckets never share intermediates
            self.graph = _capture_graph(self.step, warmup=3)

    def run_prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> None:
        """`prefill`, from a CUDA graph captured per prompt length when graphs are on and the prompt is small."""
        T = ids.shape[1]
        if self.graph is None or self.batch * T > GRAPH_PREFILL_TOKENS:
            self.prefill(ids, pad)
            return
        if T not in self.prefill_graphs:
            static_ids, static_pad = ids.clone(), pad.clone()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _capture_graph(lambda: self.prefill(static_ids, static_pad), warmup=1, pool=self._pool)
            self.prefill_graphs[T] = (graph, static_ids, static_pad)
        graph, static_ids, static_pad = self.prefill_graphs[T]
        static_ids.copy_(ids)
        static_pad.copy_(pad)
        graph.replay()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class FastDecoder:
    """Greedy generation for a `FlexOlmoForCausalLM` (or any transformers causal LM with a static-cache forward).

    Args:
        model: the model, in eval mode, on its final device and dtype; its attention must be "sdpa" or "eager".
        cuda_graphs: capture the decode step in CUDA graphs (default: when the model is on CUDA).
        compile: also compile each decoder layer with torch.compile before capture (fuses the small element-wise
            kernels that dominate a batch-1 step); a string names the torch.compile backend (tests use "eager").
            Layers that take the fused decode step are not compiled.
        fused: decode steps call `flexmoe.infer.decode_layer.FusedDecodeLayer` (ten kernels a layer) instead of
            the stock layer. Default: where `why_not_fused` allows it (FlexOlmo, CUDA, bf16/fp16); True insists
            (an error says why it cannot); "interpret" also allows CPU and fp32 (Triton's interpreter, tests).

    Repeatable output: under `torch.use_deterministic_algorithms(True)` (`deterministic()`) decode steps leave cuDNN
    attention out, which torch does not, and the expert kernels take fixed tiles; by default they take SDPA's
    fastest kernel, and cuDNN's can change the logits of identical calls (measured at batch 32 on an H100).
    """

    def __init__(self, model, *, cuda_graphs: bool | None = None, compile: bool | str = False,
                 fused: bool | str | None = None):
        from flexmoe.infer.decode_layer import fused_layers, why_not_fused

        attn = model.config._attn_implementation
        if attn not in ("sdpa", "eager"):
            raise ConfigError(f"fast decoding needs attn_implementation 'sdpa' or 'eager', the model has {attn!r}")
        self.model = model
        on_cuda = model.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.compile = compile
        self._fused = None
        if fused is None or fused:
            reason = why_not_fused(model, any_device=fused == "interpret")
            if reason is not None and fused is not None:
                raise ConfigError(f"cannot fuse the decode step: {reason}; decode with fused=False")
            self._fused = fused_layers(model) if reason is None else None
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        self._runners: dict[tuple[int, int], _Runner] = {}
        self._compiled = None

    # ---- compiled layers (decode step only; the prefill runs the stock forwards) ----

    @property
    def fused(self) -> bool:
        return self._fused is not None

    @contextlib.contextmanager
    def _layer_calls(self, calls):
        """Each decoder layer called through `calls[i]` (the hook `nn.Module.compile` uses) inside the block."""
        layers = self.model.model.layers
        for layer, fn in zip(layers, calls):
            layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer in layers:
                layer._compiled_call_impl = None

    @contextlib.contextmanager
    def _decode_forwards(self):
        with mode_attention(), self._decode_layers():
            yield

    @contextlib.contextmanager
    def _decode_layers(self):
        if self._fused is not None:
            with self._layer_calls(self._fused):
                yield
            return
        if not self.compile:
            yield
            return
        layers = self.model.model.layers
        if self._compiled is None:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            # What `nn.Module.compile` does, kept switchable: only decode steps run the compiled layers.
            self._compiled = [torch.compile(layer._call_impl, backend=backend, dynamic=None) for layer in layers]
        # The attention passes its int `layer_idx` to the (uncompiled) cache write: dynamo specialises on it once,
        # then, with ints on modules allowed to be symbolic, one graph serves every layer. Likewise the first batch
        # bucket compiles static and the second makes the batch dimension dynamic, so later buckets reuse it.
        # The limits are raised only so that an unforeseen recompile costs time instead of falling back to eager.
        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        limits = {limit: max(getattr(cfg, limit), 64)}
        if hasattr(cfg, "allow_unspec_int_on_nn_module"):
            limits["allow_unspec_int_on_nn_module"] = True
        if hasattr(cfg, "accumulated_recompile_limit"):
            limits["accumulated_recompile_limit"] = max(cfg.accumulated_recompile_limit, 1024)
        with self._layer_calls(self._compiled), cfg.patch(**limits):
            yield

    def _runner(self, batch: int, cache_len: int) -> _Runner:
        key = (batch, cache_len, torch.are_deterministic_algorithms_enabled())  # a graph keeps its attention kernel
        if key not in self._runners:
            runner = _Runner(self.model, batch, cache_len, self.cache_kwarg, fused=self.fused)
            if self.cuda_graphs:
                runner.capture(self._decode_forwards)
            self._runners[key] = runner
        return self._runners[key]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 output_logits: bool = False) -> GenerateOutput:
        """Greedy continuation of each row of `input_ids` (B, T); `attention_mask` (B, T) marks real tokens.

        Rows are left-padded first (right-padded input is realigned), so `sequences` holds the left-padded prompt
        followed by the new tokens. Stops once every row has emitted an EOS (checked every few steps, output trimmed
        to where `model.generate` stops); rows that finished are filled with `pad_token_id`, as `generate` does.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if eos_token_id is not None and not isinstance(eos_token_id, int) and len(eos_token_id) > MAX_EOS:
            raise ConfigError(f"at most {MAX_EOS} EOS ids are supported, got {len(eos_token_id)}")
        dev = self.model.device
        ids = input_ids.to(dev)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev)
        ids, mask = _left_align(ids, mask)
        pad = (mask == 0).sum(dim=-1)  # (B,)
        B, T = ids.shape
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        # the prompt is left-padded to a multiple of PREFILL_ROUND, so a handful of prefill graphs serve every prompt
        # length (padding changes no result: padded slots are masked and position ids start after them); eager and
        # graph decoding pad alike, so they run the same kernels on the same shapes
        T_run = -(-T // PREFILL_ROUND) * PREFILL_ROUND
        cache_len = -(-(T_run + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
        outs, logits, prefill_s, decode_s = [], [], 0.0, 0.0
        for start in range(0, B, BUCKETS[-1]):
            chunk = slice(start, min(B, start + BUCKETS[-1]))
            seq, lg, p_s, d_s = self._generate_chunk(ids[chunk], pad[chunk], T_run, cache_len, max_new_tokens, eos,
                                                     pad_id, output_logits)
            outs.append(seq)
            logits.append(lg)
            prefill_s += p_s
            decode_s += d_s
        n = max(o.shape[1] for o in outs)
        new = torch.cat([torch.nn.functional.pad(o, (0, n - o.shape[1]), value=pad_id) for o in outs])
        all_logits = None
        if output_logits:
            all_logits = torch.cat([torch.nn.functional.pad(lg, (0, 0, 0, n - lg.shape[1])) for lg in logits])
        return GenerateOutput(torch.cat([ids, new], dim=1), all_logits, prefill_s, decode_s)

    def _generate_chunk(self, ids, pad, T_run, cache_len, max_new_tokens, eos, pad_id, output_logits):
        if T_run > ids.shape[1]:
            pad = pad + (T_run - ids.shape[1])
            ids = torch.nn.functional.pad(ids, (T_run - ids.shape[1], 0), value=pad_id)
        B, T = ids.shape
        bucket = bucket_for(B)
        if bucket > B:  # dummy rows: copies of row 0, dropped at the end
            ids = torch.cat([ids, ids[:1].expand(bucket - B, T)])
            pad = torch.cat([pad, pad[:1].expand(bucket - B)])
        runner = self._runner(bucket, cache_len)
        runner.eos.fill_(-1)
        runner.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        runner.pad_id.fill_(pad_id)
        sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with mode_attention():
            runner.run_prefill(ids, pad)
        sync()
        t1 = time.perf_counter()
        steps_logits = [runner.logits.clone()] if output_logits else None
        produced = 1
        with self._decode_forwards() if runner.graph is None else contextlib.nullcontext():
            while produced < max_new_tokens:
                runner.replay()
                produced += 1
                if output_logits:
                    steps_logits.append(runner.logits.clone())
                if eos and produced % EOS_CHECK_EVERY == 0 and bool(runner.done[:B].all()):
                    break
        sync()
        t2 = time.perf_counter()
        new = runner.tokens[:B, :produced].clone()  # (B, n)
        if eos:
            new = _trim_finished(new, eos)
        lg = torch.stack(steps_logits, dim=1)[:B, : new.shape[1]] if output_logits else None
        return new, lg, t1 - t0, t2 - t1


def _capture_graph(fn, *, warmup: int, pool=None) -> torch.cuda.CUDAGraph:
    """`fn()` captured in a CUDA graph, after `warmup` runs on a side stream (allocation, autotuning, compiling)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def _argmax_fn(device: torch.device):
    """Row-wise argmax: flexmoe's two-pass Triton kernel on CUDA where Triton is installed, else torch's."""
    if device.type == "cuda":
        try:
            from flexmoe.infer.triton_decode import argmax_rows

            return argmax_rows
        except ImportError:
            pass
    return lambda x: x.argmax(dim=-1)


def _left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the right end (left padding), keeping their order."""
    mask = mask.to(torch.long)
    T = ids.shape[1]
    if bool((mask.cummax(dim=1).values == mask).all()):  # already 0...0 1...1 in every row
        return ids, mask
    order = torch.argsort(mask, dim=1, stable=True)  # padding first, real tokens after, each in order
    return ids.gather(1, order), mask.gather(1, order)[:, :T]


def _trim_finished(new: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Drop trailing columns generated after every row had emitted an EOS (as `generate` stops there)."""
    hit = torch.isin(new, torch.tensor(eos, device=new.device))  # (B, n)
    finished_at = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), new.shape[1] - 1)  # (B,)
    return new[:, : int(finished_at.max()) + 1]
