"""Bits per byte (BPB) of a causal LM on held-out text: tokenizer-independent, so models with different
tokenizers (or an ensemble) are compared on the same scale.

Per domain:
1. Documents are read in file order and capped at `max_bytes` UTF-8 bytes (the document that crosses the cap is
   cut at a character boundary), so the same inputs always give the same text.
2. Each document is tokenized without special tokens; the stream is `[EOS] d_1 [EOS] d_2 ... [EOS] d_n`.
3. The stream is cut into non-overlapping windows of `seq_len` predictions (window i reads tokens
   `[i*L, i*L+L)` and predicts `[i*L+1, i*L+L+1)`; the last, partial window is kept), so every token after the
   first is predicted exactly once, with the context of its own window only.
4. BPB = sum over predicted tokens y_t that are not EOS of -ln p(y_t | x_<t)
         / (ln 2 * sum over scored documents of len(utf8(document)))
   EOS predictions are left out because they are not part of any document's bytes.

A *scorer* is anything callable as `scorer(input_ids (B,T), attention_mask (B,T) | None, targets (B,T))` that
returns log p(target) per position, (B, T) float32, and has a `.device`. `CausalLMScorer` wraps any transformers
causal LM; `flexmoe.eval.ensemble.Ensemble` mixes several with the same interface.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from flexmoe.errors import CheckpointError, DataError
from flexmoe.io import hf_config


@dataclass
class DomainBPB:
    """BPB of one domain; `tokens` counts the scored (non-EOS) predictions, `bytes` the scored text."""

    domain: str
    bpb: float
    tokens: int
    bytes: int
    docs: int
    nll_nats: float

    def to_json(self) -> dict:
        return asdict(self)


class Scorer(Protocol):
    device: torch.device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor: ...


class CausalLMScorer:
    """Log-probabilities of the targets under a transformers causal LM (dense, 2-expert or merged).

    Args:
        model: any module whose forward takes `input_ids`, `attention_mask` and returns `.logits` (B, T, V).
        bf16: run the forward under bfloat16 autocast (log-softmax is still computed in float32).
    """

    def __init__(self, model: torch.nn.Module, *, bf16: bool = False):
        self.model = model.eval()
        self.bf16 = bf16
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        # One row at a time: a float32 copy of the full (B, T, V) logits would double peak memory at large vocab.
        for b in range(logits.shape[0]):
            out[b] = -torch.nn.functional.cross_entropy(logits[b].float(), targets[b], reduction="none")  # (T,)
        return out


# ---- data ----

def read_documents(path: str | Path) -> list[str]:
    """The non-blank documents of one data path, in order (formats: `flexmoe.data.load_documents`)."""
    from flexmoe.data import load_documents

    return load_documents([Path(path)]).texts


def cap_documents(docs: list[str], max_bytes: int | None) -> list[str]:
    """The first documents whose UTF-8 size totals at most `max_bytes`; empty documents are dropped."""
    out, total = [], 0
    for d in docs:
        if not d:
            continue
        raw = d.encode("utf-8")
        if max_bytes is not None and total + len(raw) > max_bytes:
            rest = raw[: max_bytes - total].decode("utf-8", errors="ignore")
            if rest:
                out.append(rest)
            break
        out.append(d)
        total += len(raw)
    return out


def tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: batched, and no max-length warnings
        return [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]
    return tokenizer(docs, add_special_tokens=False)["input_ids"]


def pack_windows(token_lists: list[list[int]], eos_id: int, seq_len: int) -> list[torch.Tensor]:
    """Cut `[EOS] d_1 [EOS] d_2 ...` into windows of up to seq_len+1 tokens that overlap by one token."""
    stream: list[int] = []
    for ids in token_lists:
        stream.append(eos_id)
        stream.extend(ids)
    ids = torch.tensor(stream, dtype=torch.long)
    return [ids[s: s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]


# ---- scoring ----

def score_documents(scorer: Scorer, tokenizer, docs: list[str], *, domain: str, seq_len: int, batch_size: int,
                    before_forward: Callable[[torch.Tensor], None] | None = None,
                    progress: bool = True) -> DomainBPB:
    """BPB of `docs` (already capped) under `scorer`; `before_forward(valid_mask (B, T))` is called per batch."""
    from tqdm.auto import tqdm

    docs = [d for d in docs if d]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    if nbytes == 0:
        raise DataError(f"domain {domain!r}: no text to score (empty documents or --max-bytes 0)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CheckpointError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    windows = pack_windows(tokenize(tokenizer, docs), eos, seq_len)
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc=f"bpb {domain}", unit="batch",
                          disable=not progress, leave=False):
            batch = windows[start: start + batch_size]
            width = max(len(w) for w in batch) - 1
            inputs = torch.full((len(batch), width), eos, dtype=torch.long)
            targets = torch.full((len(batch), width), eos, dtype=torch.long)
            valid = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, w in enumerate(batch):
                n = len(w) - 1
                inputs[i, :n], targets[i, :n], valid[i, :n] = w[:-1], w[1:], True
            scored = valid & (targets != eos)  # (B, T)
            # Padding is on the right, so a causal model needs no mask unless some row is short.
            mask = None if bool(valid.all()) else valid.long().to(scorer.device)
            if before_forward is not None:
                before_forward(valid)
            logp = scorer(inputs.to(scorer.device), mask, targets.to(scorer.device)).float().cpu()  # (B, T)
            nll -= float(logp[scored].double().sum())
            tokens += int(scored.sum())
    return DomainBPB(domain=domain, bpb=nll / (math.log(2) * nbytes), tokens=tokens, bytes=nbytes,
                     docs=len(docs), nll_nats=nll)


# ---- loading ----

def load_causal_lm(path: str | Path, *, bias: bool = True, device: str | torch.device = "cpu",
                   experts_implementation: str | None = None) -> torch.nn.Module:
    """A model directory as an eval-mode float32 module: flex_olmo through `flexmoe.checkpoint.load.load_model`
    (expert bias applied) unless `bias=False` (stock transformers, no bias); any other causal LM through
    AutoModelForCausalLM. `experts_implementation` (eager, batched_mm, grouped_mm) applies to flex_olmo only."""
    from safetensors import SafetensorError

    from flexmoe.checkpoint.verify import check_files

    kind = hf_config.model_type(path)
    device = torch.device(device) if isinstance(device, str) else device
    impl = {"experts_implementation": experts_implementation} if hf_config.is_moe(kind) and experts_implementation else {}
    try:
        if hf_config.is_moe(kind) and bias:
            from flexmoe.checkpoint.load import load_model

            model = load_model(path, dtype=torch.float32, device=device, **impl)  # checks the files itself
        else:
            from transformers import AutoModelForCausalLM

            check_files(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **impl).to(device)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from e
    return model.eval()
