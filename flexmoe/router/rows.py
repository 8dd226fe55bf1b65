"""Where router rows start: r_pub of a new anchor, and each owner's r_i (FLEXOLMO.md §2, ablations §6).

`initial_row(source, ...)` is the one entry point for an owner's row; a new router source is one more entry in
`STRATEGIES` (and one member of `config.RouterSource`). Every row lives in model space (hidden,): embedder rows go
through the anchor's fixed projection when the embedder's dimension is not the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flexmoe.config import ExpertSpec, RouterSource
from flexmoe.errors import ConfigError
from flexmoe.io.anchor import Anchor, EmbedderIdentity, ProjectionSpec
from flexmoe.router.embed import check_same_embedder, embedder_identity, mean_embedding, read_row_file

# ---- r_pub, when an anchor is made


def make_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A fixed Gaussian map (out_dim, in_dim) scaled to preserve norms in expectation (Johnson-Lindenstrauss)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_dim, in_dim, generator=g, dtype=torch.float32) / out_dim**0.5


@dataclass
class PublicRow:
    """r_pub in model space (hidden,), the embedder it came from, and the projection when dims differ."""

    row: torch.Tensor
    embedder: EmbedderIdentity
    projection: torch.Tensor | None = None  # (hidden, embed_dim)
    projection_spec: ProjectionSpec | None = None


def check_public_source(embedder: Path | None, row_file: Path | None):
    """The router embedder of a new anchor: a folder, or a row file of the public data made by `embed-domain`
    (for machines that cannot hold the embedder). Checked before any slow work; returns a `RowFile` or None."""
    if (embedder is None) == (row_file is None):
        raise ConfigError("give the router embedder as --embedder PATH, or --public-row FILE made with "
                          "`flexmoe embed-domain` on the public data (not both)")
    if row_file is not None:
        return read_row_file(row_file)
    embedder_identity(embedder)
    return None


def public_row(texts: list[str], embedder: Path | None, rows, hidden: int, *, num_docs: int, seed: int,
               device: str, progress: bool) -> PublicRow:
    """r_pub: the mean embedding of the public documents (or the given row file), projected to `hidden`."""
    if rows is not None:
        identity, row = rows.embedder, rows.row
    else:
        identity = embedder_identity(embedder)
        row = mean_embedding(texts, embedder, num_docs=num_docs, seed=seed, device=device, progress=progress).row
    if row.numel() != identity.dim:
        raise ConfigError(f"embedder {identity.name} produced {row.numel()}-d vectors, its config says {identity.dim}")
    if identity.dim == hidden:
        return PublicRow(row, identity)
    projection = make_projection(identity.dim, hidden, seed)
    spec = ProjectionSpec(kind="gaussian", seed=seed, in_dim=identity.dim, out_dim=hidden)
    return PublicRow(projection @ row, identity, projection, spec)


# ---- r_i, when an owner's expert starts

RowMaker = Callable[..., torch.Tensor]  # (docs, data, device, progress) -> (hidden,) row in model space


def scaled_like(vector: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`vector` rescaled to the norm of `reference` (router-row ablations stay on r_pub's scale)."""
    v = vector.float().reshape(-1)
    return v * (reference.float().norm() / v.norm().clamp_min(1e-12))


def random_row(public_row: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded Gaussian row with the norm of r_pub (the random-router ablation)."""
    g = torch.Generator().manual_seed(seed)
    return scaled_like(torch.randn(public_row.numel(), generator=g), public_row)


@torch.no_grad()
def hidden_mean_row(anchor: Anchor, data, *, num_seqs: int, batch_size: int, device: str = "cpu") -> torch.Tensor:
    """Mean hidden state over owner sequences, scaled to the norm of r_pub: in OLMo-2 the anchor's final residual
    stream (input of the last norm; its routers read the raw residual), in a pre-norm family (Qwen3, Llama) the last
    layer's post_attention_layernorm output, which is what its routers read.

    `data` is a `flexmoe.data.PackedData`; the first `num_seqs` blocks of its seeded order are used.
    """
    from flexmoe.expert.upcycle import load_dense
    from flexmoe.io import hf_config

    model = load_dense(anchor).to(device).eval()
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64, device=device)
    count = 0

    def grab(h: torch.Tensor) -> None:
        nonlocal count
        h = h.reshape(-1, h.shape[-1])  # (N, H)
        total.add_(h.double().sum(0))
        count += h.shape[0]

    if hf_config.family(hf_config.read_config(anchor.path)).pre_norm:
        norm = model.model.layers[-1].post_attention_layernorm
        handle = norm.register_forward_hook(lambda _m, _args, out: grab(out))
    else:
        handle = model.model.norm.register_forward_pre_hook(lambda _m, args: grab(args[0]))
    try:
        n = min(num_seqs, data.num_blocks)
        for start in range(0, n, batch_size):
            inputs, _ = data.batch(start, min(batch_size, n - start))
            model(input_ids=inputs.to(device), use_cache=False)
    finally:
        handle.remove()
    return scaled_like((total / count).cpu(), anchor.public_row)


def _embedding(spec: ExpertSpec, anchor: Anchor):
    if spec.embedder is None:
        raise ConfigError("router source 'embedding' needs an embedder: pass --embedder PATH "
                          "(the anchor's) or --router-row FILE")
    identity = embedder_identity(spec.embedder)
    check_same_embedder(identity, anchor.meta.embedder, f"embedder {spec.embedder}")
    r = spec.router
    return lambda docs, data, device, progress: anchor.to_model_space(mean_embedding(
        docs.texts, spec.embedder, num_docs=r.num_docs, seed=r.seed, device=device, progress=progress).row), identity


def _row_file(spec: ExpertSpec, anchor: Anchor):
    if spec.router.row_file is None:
        raise ConfigError("router source 'row-file' needs --router-row FILE (made with `flexmoe embed-domain`)")
    rows = read_row_file(spec.router.row_file)
    check_same_embedder(rows.embedder, anchor.meta.embedder, f"router row {spec.router.row_file}")
    row = anchor.to_model_space(rows.row)
    return lambda *_: row, rows.embedder


def _random(spec: ExpertSpec, anchor: Anchor):
    return lambda *_: random_row(anchor.public_row, spec.router.seed), None


def _hidden_mean(spec: ExpertSpec, anchor: Anchor):
    return lambda docs, data, device, progress: hidden_mean_row(
        anchor, data, num_seqs=spec.router.num_docs, batch_size=spec.train.batch_size, device=device), None


# Each strategy checks its inputs against the anchor at once (before any slow work) and returns
# (make_row, embedder identity for the card or None); make_row runs once the owner's data is packed.
STRATEGIES: dict[RouterSource, Callable[[ExpertSpec, Anchor], tuple[RowMaker, EmbedderIdentity | None]]] = {
    RouterSource.EMBEDDING: _embedding,  # paper
    RouterSource.ROW_FILE: _row_file,  # paper (the same row, embedded elsewhere)
    RouterSource.RANDOM: _random,  # ablation
    RouterSource.HIDDEN_MEAN: _hidden_mean,  # ablation (extension)
}


def initial_row(source: RouterSource, spec: ExpertSpec, anchor: Anchor) -> tuple[RowMaker, EmbedderIdentity | None]:
    """How owner `spec` starts its router row r_i: (make_row(docs, data, device, progress), embedder identity)."""
    return STRATEGIES[source](spec, anchor)
