"""Router tuning (FlexOlmo "RT", FLEXOLMO.md §4): after merging, train only the owners' router rows and expert
biases on public proxy data; experts, shared layers and the public row r_pub stay frozen.

Why r_pub stays frozen: the softmax over experts is unchanged when the same vector is added to every row
(each logit moves by the same h·v), so rows [r_pub; r_1..r_n] and [r_pub + v; r_1 + v; ...] route identically.
Training r_pub as well adds no routing the owner rows cannot reach; freezing it keeps the merged checkpoint's
row 0 equal to the anchor's r_pub (byte for byte), which every expert, including one `add`ed later, was trained
against. The public expert's bias stays 0 as docs/FORMAT.md requires.

The output is a normal merged checkpoint written by streaming: every tensor but the routers is copied as raw
bytes, in the canonical order and shards of `flexmoe merge`; the tuned rows go into each layer's router, the
biases into the sidecar, and each owner's entry in `flexmoe.json` gets a `router_tuning` record. So add, remove
(which drops the expert's tuned row and bias) and extract work on it as on any merged checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.config import parse_size
from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.checkpoint.surgery import built_item, copy_item, sealed_output, stream_items
from flexmoe.io import hf_config
from flexmoe.io.merged import ROUTER_TUNING, read_merged, write_merged_files
from flexmoe.io.safetensors_format import DTYPE_TO_TORCH
from flexmoe.io.keys import parse_router_key, router_key
from flexmoe.router.biased import BiasedMixtralTopKRouter, BiasedQwen3MoeTopKRouter, BiasedTopKRouter, _Biased

if TYPE_CHECKING:
    from flexmoe.train.loop import TrainStats


class Tunable:
    """Mixed in before a family's biased router (`flexmoe.router.biased`): its weight becomes
    `[public_row; owner_rows]` and its raw bias `[0; owner_bias]`, with the public row frozen and the owners' rows and
    biases trainable (separate tensors, so the frozen row gets no optimizer state and no weight decay), and the
    biased logits of the last forward are kept in `router_logits` for the router z-loss
    (`flexmoe.train.losses.router_z_loss`, which says why).
    """

    def __init__(self, router: _Biased, config):
        super().__init__(config)
        del self.weight, self.expert_bias  # replaced by the split below
        weight = router.weight.detach()  # (E, H)
        self.public_row = nn.Parameter(weight[:1].clone(), requires_grad=False)  # (1, H) r_pub
        self.owner_rows = nn.Parameter(weight[1:].float().clone())  # (E-1, H)
        self.owner_bias = nn.Parameter(router.expert_bias.detach()[1:].float().clone())  # (E-1,) raw b
        self.top_k, self.norm_topk_prob = router.top_k, router.norm_topk_prob
        self.router_logits: torch.Tensor | None = None

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = torch.cat((self.public_row.to(self.owner_rows.dtype), self.owner_rows))  # (E, H)
        bias = torch.cat((torch.zeros_like(self.owner_bias[:1]), self.owner_bias.clamp(max=0)))  # (E,)
        return F.linear(hidden_states, weight.to(hidden_states.dtype)) + bias.to(hidden_states.dtype)  # (T, E)

    def forward(self, hidden_states: torch.Tensor):
        router_logits, scores, indices = super().forward(hidden_states)
        self.router_logits = router_logits  # (T, E)
        return router_logits, scores, indices


class TunableRouter(Tunable, BiasedTopKRouter):
    """The tunable `BiasedTopKRouter` (FlexOlmo)."""


class TunableQwen3MoeRouter(Tunable, BiasedQwen3MoeTopKRouter):
    """The tunable `BiasedQwen3MoeTopKRouter`."""


class TunableMixtralRouter(Tunable, BiasedMixtralTopKRouter):
    """The tunable `BiasedMixtralTopKRouter` (k = E: renormalising the full softmax changes nothing)."""


TUNABLE = {BiasedTopKRouter: TunableRouter, BiasedQwen3MoeTopKRouter: TunableQwen3MoeRouter,
           BiasedMixtralTopKRouter: TunableMixtralRouter}


def make_tunable(model) -> list[Tunable]:
    """Swap every layer's router of a `load_model`ed merged model for its family's `Tunable` router; freeze
    everything else."""
    for p in model.parameters():
        p.requires_grad = False
    routers = []
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if type(gate) not in TUNABLE or gate.num_experts < 2:
            raise CheckpointError("router tuning needs a merged checkpoint loaded with its biases and at least one "
                                  "owner expert")
        layer.mlp.gate = TUNABLE[type(gate)](gate, model.config).to(gate.weight.device)
        routers.append(layer.mlp.gate)
    return routers


@torch.no_grad()
def tuned_router(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner rows (L, E-1, H) float32, raw owner biases (L, E-1) float32) of a tuned model, on CPU."""
    routers = [layer.mlp.gate for layer in model.model.layers]
    if not all(isinstance(r, Tunable) for r in routers):
        raise CheckpointError("model has no tunable routers (see `make_tunable`)")
    return (torch.stack([r.owner_rows.detach().float().cpu() for r in routers]),
            torch.stack([r.owner_bias.detach().float().cpu() for r in routers]))


def write_tuned(merged_dir: str | Path, out: str | Path, rows: torch.Tensor, biases: torch.Tensor, record: dict, *,
                shard_size: str = "5GB", overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write `merged_dir` with the owners' router rows and biases replaced, atomically at `out`.

    Args:
        rows: (L, E-1, H) owner rows; stored in the router's dtype after the untouched public row.
        biases: (L, E-1) raw owner biases; the public expert's stays 0.
        record: appended to every owner's `router_tuning` list in flexmoe.json.
    Returns the shard file names.
    """
    m = read_merged(merged_dir)
    try:
        L, E, H = m.num_layers, m.num_experts, m.hidden_size
        if tuple(rows.shape) != (L, E - 1, H) or tuple(biases.shape) != (L, E - 1):
            raise CheckpointError(f"tuned router of shape {list(rows.shape)} / {list(biases.shape)} does not fit "
                                  f"{m.path} ({L} layers, {E} experts, hidden {H})")
        dtype = DTYPE_TO_TORCH[m.dtype]
        experts = [dict(e) for e in m.meta["experts"]]
        for e in experts[1:]:
            e[ROUTER_TUNING] = [*e.get(ROUTER_TUNING, []), record]
        meta = {**m.meta, "experts": experts}
        new_biases = torch.cat((m.biases[:, :1], biases.float()), dim=1).contiguous()  # (L, E)

        def router(layer: int) -> torch.Tensor:  # row 0 (r_pub) keeps its bytes; the owners' rows are the tuned ones
            return torch.cat((m.reader.get(router_key(layer))[:1], rows[layer].to(dtype)))

        items = []
        for key in m.reader.keys():
            layer, spec = parse_router_key(key), m.reader.spec(key)
            items.append(copy_item(key, m.reader, key) if layer is None else
                         built_item(key, spec.dtype, spec.shape, functools.partial(router, layer)))
        with sealed_output(out, overwrite) as tmp:
            shards = stream_items(tmp, items, sources=[m.reader], max_shard_bytes=parse_size(shard_size),
                                  prefix="model", progress=progress, desc="write",
                                  to_disk=hf_config.family(m.config).to_disk)
            write_merged_files(tmp, side_src=m.path, config=m.config, meta=meta, biases=new_biases,
                               side_listed=m.reader.listed)
    finally:
        m.close()
    return shards


def load_checked(merged_dir: Path):
    """`load_model` of the checkpoint to tune, in float32, its large shards hashed against the manifest while
    transformers reads them: damage fails the run before any training, not at its end."""
    from flexmoe.checkpoint.load import load_model

    m = read_merged(merged_dir)
    try:
        m.reader.hash_reads(now=True)
        model = load_model(merged_dir, dtype=torch.float32)
        m.reader.check_reads()
    finally:
        m.close()
    return model


def check_tunable(merged_dir: Path) -> tuple[list[str], dict, str]:
    """(expert names, config.json, anchor fingerprint) of a merged checkpoint router tuning can work on; fails
    fast otherwise."""
    m = read_merged(merged_dir)
    try:
        if m.num_experts < 2:
            raise ConfigError(f"{merged_dir} has only the public expert: there is no owner row to tune")
        if m.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{merged_dir}: router dtype {m.dtype} is not supported")
        return m.names, m.config, m.meta["anchor_fingerprint"]
    finally:
        m.close()


# ---- the verb


@dataclasses.dataclass
class TuneResult:
    path: Path
    experts: list[str]  # the owners whose rows and biases were tuned, in router order
    first_loss: float | None  # mean LM loss of the first of several logging windows of this invocation, else None
    train: TrainStats


def tune_router(cfg, out: Path, *, overwrite: bool, resume: bool, progress: bool, on_step=None) -> TuneResult:
    """`cfg` is a `RouterTuneConfig`; the tuned merged checkpoint is written at `out`."""
    from flexmoe import __version__
    from flexmoe.config import jsonable
    from flexmoe.data import load_documents, load_tokenizer, pack
    from flexmoe.io.atomic import check_output
    from flexmoe.train import accel
    from flexmoe.train.loop import train

    merged = Path(cfg.merged)
    if Path(out).resolve() == merged.resolve():
        raise ConfigError(f"--out {out} is the checkpoint being tuned; write the tuned one to a new folder")
    out = check_output(out, overwrite)
    names, config, fingerprint = check_tunable(merged)
    docs = load_documents(cfg.data)
    tokenizer = load_tokenizer(merged, "merged checkpoint")
    steps = cfg.train.max_steps
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else min(100, max(1, steps // 10))
    train_cfg = dataclasses.replace(cfg.train, warmup_steps=warmup).for_context(
        config.get("max_position_embeddings", 2048))
    device = train_cfg.device
    work = accel.prepare_work_dir(out, resume, overwrite, device)
    data, summary = pack(docs, tokenizer, train_cfg.seq_len, seed=train_cfg.seed, progress=progress)
    model = load_checked(merged)  # fp32 rows to train; written back in the router's dtype
    make_tunable(model)
    identity = train_cfg.run_identity(anchor=fingerprint, experts=names, data=summary.to_json())
    stats, model = train(model, data, train_cfg, work_dir=work, resume=resume, identity=identity, on_step=on_step,
                         desc="router tuning", progress=progress)
    if accel.is_main(device):
        rows, biases = tuned_router(model)
        record = jsonable({"steps": stats.steps, "final_loss": stats.final_loss, "data": summary.to_json(),
                           "hparams": dataclasses.asdict(train_cfg), "flexmoe_version": __version__})
        write_tuned(merged, out, rows, biases, record, shard_size=cfg.shard_size, overwrite=overwrite,
                    progress=progress)
    accel.finish(out, work, device)
    first = stats.losses[0][1] if len(stats.losses) > 1 else None
    return TuneResult(path=out, experts=names[1:], first_loss=first, train=stats)
