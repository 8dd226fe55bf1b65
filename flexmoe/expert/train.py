"""`train_expert`: one data owner's expert trained against a frozen anchor, written as an expert package."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from flexmoe import __version__
from flexmoe.config import BiasUpdate, ExpertMode, ExpertSpec, PublicLoss, RouterTraining, TrainConfig, jsonable
from flexmoe.data import load_documents, load_tokenizer, pack
from flexmoe.errors import ConfigError, DataError
from flexmoe.expert.upcycle import (anchor_dtype, expert_skeleton, export_dense_package_tensors,
                                    export_package_tensors, fill_expert_, load_dense, project_biases_)
from flexmoe.io import hf_config
from flexmoe.io.anchor import Anchor, read_anchor
from flexmoe.io.atomic import atomic_dir, check_output
from flexmoe.io.package import PACKAGE_CARD, PACKAGE_TENSORS, ExpertCard, validate_expert_name, write_package
from flexmoe.router.rows import initial_row
from flexmoe.train import accel
from flexmoe.train.loop import PublicMix, TrainStats, train
from flexmoe.train.state import latest_checkpoint


@dataclass
class ExpertResult:
    path: Path
    name: str
    package_bytes: int
    train: TrainStats


def dense_anchor(path: Path) -> Anchor:
    """A flexmoe anchor that is a dense OLMo-2 model (not a merged checkpoint)."""
    anchor = read_anchor(path)
    config = hf_config.require(anchor.path, hf_config.DENSE, "experts are trained against the dense anchor, not a "
                                                             "merged checkpoint")
    hf_config.family(config)  # a known anchor family (flexmoe.io.families)
    return anchor


def check_router_training(rt: RouterTraining, batch_size: int, *, dense: bool) -> None:
    """Refuse, before any slow work, a router training that cannot run as asked."""
    if dense or rt.public_ratio == 0:
        return
    if not rt.public_data:
        raise ConfigError(f"router_training.public_ratio is {rt.public_ratio}, but no public text was given: pass "
                          "--public-data PATH (the anchor's public corpus), or --paper-router to train on owner "
                          "text only as the paper does")
    if batch_size < 2:
        raise ConfigError(f"a batch of {batch_size} sequence leaves no room for public text: use --batch-size 2 "
                          "or more, or --paper-router")


def public_mix(rt: RouterTraining, tokenizer, train_cfg: TrainConfig, *, dense: bool, progress: bool):
    """(`PublicMix` | None, summary of the public text packed | None) for the router training `rt`.

    Only as much public text is tokenized as the run draws (plus one block), so a large public corpus costs
    nothing extra. A dense (no-coordination) run has no router: it takes none.
    """
    rows = rt.public_rows(train_cfg.batch_size)
    if dense or rows == 0:
        return None, None
    seq = train_cfg.seq_len
    processes = accel.process_state(train_cfg.device).num_processes
    need = (train_cfg.max_steps * train_cfg.grad_accum * processes * rows + 1) * seq + 1
    data, summary = pack(load_documents(rt.public_data), tokenizer, seq, seed=train_cfg.seed + 1, max_tokens=need,
                         progress=progress)
    return PublicMix(data=data, rows=rows, router_only=rt.public_loss == PublicLoss.ROUTER,
                     route_loss=rt.public_route_loss), summary


def router_training_record(rt: RouterTraining, public_summary, *, dense: bool) -> dict:
    """What the card and the resume identity say of `RouterTraining` (files by name: they may move)."""
    if dense:
        return {"mode": "dense (no router)"}
    return {"public_ratio": rt.public_ratio if public_summary is not None else 0.0,
            "public_loss": rt.public_loss.value, "public_route_loss": rt.public_route_loss, "bias": rt.bias.value,
            "public_data": None if public_summary is None else public_summary.to_json()}


def train_expert(cfg: ExpertSpec, out: Path, *, overwrite: bool, resume: bool, progress: bool,
                 on_step: Callable[[int], None] | None) -> ExpertResult:
    name = validate_expert_name(cfg.name)
    if cfg.anchor is None:
        raise ConfigError("no anchor: pass --anchor DIR (made with `flexmoe train-anchor` or `init-anchor`)")
    if not cfg.data:
        raise DataError("no data given: pass --data PATH or list `data:` in the expert spec")
    out = check_output(out, overwrite)
    anchor = dense_anchor(Path(cfg.anchor))
    make_row, identity = initial_row(cfg.router.source, cfg, anchor)
    device = cfg.train.device
    local = accel.local_device(device)  # also refuses --device cuda without CUDA, before any slow work
    docs = load_documents(cfg.data)
    dense = cfg.mode == ExpertMode.DENSE
    check_router_training(cfg.router_training, cfg.train.batch_size, dense=dense)
    tokenizer = load_tokenizer(anchor.path, "anchor")
    max_positions = hf_config.read_config(anchor.path).get("max_position_embeddings", 2048)
    train_cfg = cfg.train.for_context(max_positions)
    work = accel.prepare_work_dir(out, resume, overwrite, device)
    data, summary = pack(docs, tokenizer, train_cfg.seq_len, seed=train_cfg.seed, progress=progress)
    public, public_summary = public_mix(cfg.router_training, tokenizer, train_cfg, dense=dense, progress=progress)
    # A resumed expert takes r_i from its checkpoint: no need to embed the data again (a dense run never trains it).
    resuming = resume and latest_checkpoint(work) is not None and not dense
    row = anchor.public_row if resuming else make_row(docs, data, local, progress)
    if dense:
        model, init = load_dense(anchor), None
    else:  # built on the meta device, filled from the anchor where it trains (one device, or FSDP shards)
        model = expert_skeleton(anchor, top_k=cfg.train_top_k, frozen_dtype=torch.bfloat16 if train_cfg.bf16 else None)

        def init(placed, put):
            fill_expert_(placed, anchor, row, put)
    router_training = router_training_record(cfg.router_training, public_summary, dense=dense)
    identity_run = train_cfg.run_identity(anchor=anchor.meta.fingerprint, name=name, data=summary.to_json(),
                                          train_top_k=cfg.train_top_k, router=cfg.router.source, mode=cfg.mode,
                                          router_training=router_training)
    project = not dense and cfg.router_training.bias == BiasUpdate.PROJECT
    stats, model = train(model, data, train_cfg, work_dir=work, resume=resume, identity=identity_run, on_step=on_step,
                         desc=f"expert {name}", progress=progress, init=init, public=public,
                         after_step=project_biases_ if project else None)
    package_bytes = 0
    if accel.is_main(device):
        hparams = jsonable({**asdict(train_cfg), "train_top_k": cfg.train_top_k, "mode": cfg.mode,
                            "router": {"num_docs": cfg.router.num_docs, "seed": cfg.router.seed},
                            "router_training": router_training})
        card = ExpertCard(name=name, anchor_fingerprint=anchor.meta.fingerprint,
                          embedder=None if identity is None else asdict(identity),
                          router_source=cfg.router.source.value, data=summary.to_json(), hparams=hparams,
                          steps=stats.steps, final_loss=stats.final_loss, flexmoe_version=__version__)
        with atomic_dir(out, overwrite, seal=PACKAGE_CARD) as tmp:
            dtype = anchor_dtype(anchor)
            tensors = export_dense_package_tensors(model, row, dtype) if dense else export_package_tensors(model, dtype)
            write_package(tmp, tensors, card)
        package_bytes = (out / PACKAGE_TENSORS).stat().st_size
    accel.finish(out, work, device)
    return ExpertResult(path=out, name=name, package_bytes=package_bytes, train=stats)
