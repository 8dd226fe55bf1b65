"""The public front of flexmoe: one typed function per verb, in pipeline order. The CLI and the recipes call only these.

Every verb that writes takes `(cfg, out, *, overwrite=False, progress=True)`, and the training verbs also
`resume=False`; the config says what to do, `out` where, the keywords how. Each verb is one line into the module that
owns its stage (docs/ARCHITECTURE.md), imported when called, so `import flexmoe.api` stays light and the checkpoint
verbs never load transformers or training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from flexmoe.anchor.meta import AnchorResult
    from flexmoe.checkpoint.inspection import InspectResult
    from flexmoe.checkpoint.surgery import CheckpointResult, PackageResult
    from flexmoe.checkpoint.verify import VerifyResult
    from flexmoe.config import (AddConfig, AdoptConfig, EmbedConfig, EvalConfig, ExpertSpec, ExtractConfig,
                                ExtractionConfig, GenerateConfig, ImportExpertConfig, InitAnchorConfig, MergeConfig,
                                ProxyConfig, RemoveConfig, RouterTuneConfig, TrainAnchorConfig)
    from flexmoe.eval.evaluate import EvalResult
    from flexmoe.eval.extraction import ExtractionResult
    from flexmoe.expert.train import ExpertResult
    from flexmoe.infer.run import GenerateResult
    from flexmoe.router.embed import EmbedResult
    from flexmoe.router.proxy import ProxyResult
    from flexmoe.router.tune import TuneResult

OnStep = Callable[[int], None]  # called with the optimizer step after each step (tests use it to interrupt a run)

# ---- 1. the public anchor


def train_anchor(cfg: TrainAnchorConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 progress: bool = True, on_step: OnStep | None = None) -> AnchorResult:
    """Train a dense OLMo-2 anchor on public text; save it with its tokenizer, r_pub and fingerprint at `out`."""
    from flexmoe.anchor.train import train_anchor as run

    return run(cfg, Path(out), overwrite=overwrite, resume=resume, progress=progress, on_step=on_step)


def init_anchor(cfg: InitAnchorConfig, out: str | Path, *, overwrite: bool = False,
                progress: bool = True) -> AnchorResult:
    """Adopt an existing HF `Olmo2ForCausalLM` directory as an anchor: a copy plus r_pub and the fingerprint."""
    from flexmoe.anchor.adopt import init_anchor as run

    return run(cfg, Path(out), overwrite=overwrite, progress=progress)


# ---- 2. an owner's expert (its router row starts in flexmoe/router/rows.py)


def embed_domain(cfg: EmbedConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> EmbedResult:
    """Write a router-row file: the mean embedding of up to `cfg.num_docs` documents sampled with `cfg.seed`."""
    from flexmoe.router.embed import embed_domain as run

    return run(cfg, Path(out), overwrite=overwrite, progress=progress)


def train_expert(cfg: ExpertSpec, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 progress: bool = True, on_step: OnStep | None = None) -> ExpertResult:
    """Train one data owner's expert against a frozen anchor; write its package (docs/FORMAT.md) at `out`."""
    from flexmoe.expert.train import train_expert as run

    return run(cfg, Path(out), overwrite=overwrite, resume=resume, progress=progress, on_step=on_step)


# ---- 3. the merged checkpoint (streaming key-level surgery: no transformers, no training code)


def merge(cfg: MergeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Merge an anchor and expert packages into one transformers `flex_olmo` checkpoint at `out`."""
    from flexmoe.checkpoint.surgery import merge as run

    return run(cfg, out, overwrite=overwrite, progress=progress)


def add(cfg: AddConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Append an expert package to a merged checkpoint. `out == cfg.merged` with `overwrite` edits it in place."""
    from flexmoe.checkpoint.surgery import add as run

    return run(cfg, out, overwrite=overwrite, progress=progress)


def remove(cfg: RemoveConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Remove an expert (the owner's opt-out); top-k becomes min(k, E-1). `out == cfg.merged` edits in place."""
    from flexmoe.checkpoint.surgery import remove as run

    return run(cfg, out, overwrite=overwrite, progress=progress)


def extract(cfg: ExtractConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> PackageResult:
    """Write one expert of a merged checkpoint back out as an expert package."""
    from flexmoe.checkpoint.surgery import extract as run

    return run(cfg, out, overwrite=overwrite, progress=progress)


def adopt(cfg: AdoptConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """Take over an existing E-expert `FlexOlmoForCausalLM` folder (e.g. FlexOlmo-7x7B) as a merged checkpoint."""
    from flexmoe.checkpoint.adopt import adopt as run

    return run(cfg, out, overwrite=overwrite, progress=progress)


def import_expert(cfg: ImportExpertConfig, out: str | Path, *, overwrite: bool = False,
                  progress: bool = True) -> PackageResult:
    """A 2-expert `FlexOlmoForCausalLM` built on `cfg.anchor` (e.g. Flex-math-2x7B) as an expert package."""
    from flexmoe.checkpoint.adopt import import_expert as run

    return run(cfg, out, overwrite=overwrite, progress=progress)


def inspect(path: str | Path, *, verify: bool = False) -> InspectResult:
    """Describe a merged checkpoint, an anchor or an expert package; `verify` recomputes the anchor fingerprint."""
    from flexmoe.checkpoint.inspection import inspect as run

    return run(path, verify=verify)


def verify(path: str | Path) -> VerifyResult:
    """Check every file of a flexmoe folder against its manifest, and its fingerprints; `ok` says whether all holds."""
    from flexmoe.checkpoint.verify import verify as run

    return run(path)


def load_model(path: str | Path, *, dtype=None, device=None, experts_implementation: str | None = None,
               apply_bias: bool = True, fast: bool = False):
    """`FlexOlmoForCausalLM` from a merged folder, with the expert biases applied (flexmoe/checkpoint/load.py).

    `fast=True` switches to flexmoe's inference path (flexmoe/infer): the registered sort + grouped-GEMM experts
    kernel, fused norms, and `flexmoe.infer.fast_generate` decoding over a static cache with CUDA graphs and
    compiled decode steps on CUDA. The checkpoint is unchanged; the model still works with `generate`.
    """
    from flexmoe.checkpoint.load import load_model as run

    model = run(path, dtype=dtype, device=device, experts_implementation=experts_implementation, apply_bias=apply_bias)
    if fast:
        from flexmoe.infer import enable_fast_path

        enable_fast_path(model, compile=next(model.parameters()).is_cuda)
    return model


# ---- after the merge: router tuning on public proxy data (FLEXOLMO.md §4)


def select_proxy(cfg: ProxyConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> ProxyResult:
    """Write the share `cfg.fraction` of the public documents that a classifier over sentence embeddings finds
    most like the domain, as `.jsonl` with a `text` field (flexmoe/router/proxy.py)."""
    from flexmoe.router.proxy import select_proxy as run

    return run(cfg, Path(out), overwrite=overwrite, progress=progress)


def tune_router(cfg: RouterTuneConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                progress: bool = True, on_step: OnStep | None = None) -> TuneResult:
    """Train only the owners' router rows and biases of `cfg.merged` on public proxy data; write the tuned merged
    checkpoint at `out` (flexmoe/router/tune.py says why r_pub stays frozen)."""
    from flexmoe.router.tune import tune_router as run

    return run(cfg, Path(out), overwrite=overwrite, resume=resume, progress=progress, on_step=on_step)


# ---- 4. evaluation and generation


def evaluate(cfg: EvalConfig, out: str | Path | None = None, *, plots: str | Path | None = None,
             overwrite: bool = False, progress: bool = True, model=None, tokenizer=None) -> EvalResult:
    """BPB per domain (+ routing statistics for MoE models) of `cfg.model`, or of an in-memory `model`; the result
    as JSON at `out` and PNG plots in the folder `plots` when given.

    `model` may be any transformers causal LM or a scorer such as `flexmoe.eval.ensemble.Ensemble`; then
    `tokenizer` (or `cfg.model`, to load one from) is required. A `cfg.top_k` override is undone afterwards.
    """
    from flexmoe.eval.evaluate import evaluate as run

    return run(cfg, None if out is None else Path(out), plots=None if plots is None else Path(plots),
               overwrite=overwrite, progress=progress, model=model, tokenizer=tokenizer)


def generate(cfg: GenerateConfig) -> GenerateResult:
    """Greedy continuations of `cfg.prompts` by the model at `cfg.model`: a merged checkpoint loads with its expert
    biases; with `cfg.fast` it runs flexmoe's fast path (experts kernel, static cache, CUDA graphs on GPU)."""
    from flexmoe.infer.run import run_generate

    return run_generate(cfg)


def audit_extraction(cfg: ExtractionConfig, out: str | Path | None = None, *, overwrite: bool = False,
                     progress: bool = True) -> ExtractionResult:
    """How much of an owner's training text `cfg.model` reproduces: greedy continuations of sampled prefixes against
    the documents' true next tokens, exact-match and softer rates with 95% Wilson intervals (docs/privacy.md); the
    report (no text) as JSON at `out` when given."""
    from flexmoe.eval.extraction import audit_extraction as run

    return run(cfg, None if out is None else Path(out), overwrite=overwrite, progress=progress)


# ---- 5. the process


def release_processes() -> None:
    """After a command succeeded under `accelerate launch`/torchrun: tear down this process's process groups before
    the interpreter exits, so that no rank aborts at exit (flexmoe/train/accel.py says why). A no-op otherwise."""
    import sys

    dist = sys.modules.get("torch.distributed")  # looked up, not imported: `flexmoe inspect` & co. stay torch-free
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return  # and no training stack imported for nothing
    from flexmoe.train.accel import release_processes as run

    run()
