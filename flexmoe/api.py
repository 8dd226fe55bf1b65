"""The public verbs of flexmoe, as typed functions.

Each verb takes a config object and paths and returns a small result dataclass. The CLI and the recipes
call only these. Sections are owned by separate modules; keep each verb a short orchestration.
"""

from __future__ import annotations

import dataclasses as _dc
from pathlib import Path as _Path

# ---- training verbs: train_anchor, init_anchor, embed_domain, train_expert ----
# Heavy libraries (transformers, accelerate, sentence-transformers, datasets) are imported inside the verbs,
# so the checkpoint verbs stay importable without them.
import shutil as _shutil  # noqa: E402
from typing import Callable as _Callable  # noqa: E402

from flexmoe.config import (Device, EmbedConfig, ExpertMode, ExpertSpec, InitAnchorConfig,  # noqa: E402
                            RouterSource, TrainAnchorConfig, TrainConfig)
from flexmoe.errors import CheckpointError as _CheckpointError  # noqa: E402
from flexmoe.errors import ConfigError as _ConfigError  # noqa: E402
from flexmoe.errors import DataError as _DataError  # noqa: E402
from flexmoe.errors import OutputExistsError as _OutputExistsError  # noqa: E402


@_dc.dataclass
class AnchorResult:
    path: _Path
    fingerprint: str
    num_params: int
    steps: int = 0  # 0 for an adopted model (init-anchor)
    final_loss: float | None = None
    tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0


@_dc.dataclass
class EmbedResult:
    path: _Path
    dim: int
    num_docs: int
    num_chunks: int


@_dc.dataclass
class ExpertResult:
    path: _Path
    name: str
    steps: int
    final_loss: float | None
    tokens: int
    wall_s: float
    tokens_per_s: float
    package_bytes: int
    resumed_from: int = 0


def _jsonable(value):
    import enum

    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _Path):
        return str(value)
    return value


def _state(choice: Device):
    """accelerate's process state, created the way the training loop's `Accelerator` will see it: on a machine
    without CUDA (or with --device cpu) only `cpu=True` detects a multi-process CPU launch."""
    import torch
    from accelerate import PartialState

    if choice == Device.CUDA and not torch.cuda.is_available():
        raise _ConfigError("--device cuda was asked for, but no CUDA device is available")
    return PartialState(cpu=choice == Device.CPU or not torch.cuda.is_available())


def _device(choice: Device) -> str:
    """The torch device for the single-process parts (embedding, hidden means) of a run."""
    return "cpu" if choice == Device.CPU else str(_state(choice).device)  # under torchrun: this process's GPU


def _is_main(choice: Device) -> bool:
    return _state(choice).is_main_process


def _barrier(choice: Device) -> None:
    _state(choice).wait_for_everyone()


def _prepare_work_dir(out: _Path, resume: bool, overwrite: bool, device: Device) -> _Path:
    """A fresh run starts from an empty work dir, but never silently drops an interrupted run's checkpoints."""
    from flexmoe.train.state import latest_checkpoint, work_dir

    work = work_dir(out)
    if not resume and work.exists():
        if latest_checkpoint(work) is not None and not overwrite:
            raise _OutputExistsError(f"{work} holds checkpoints of an interrupted run: pass --resume to continue "
                                     "it or --overwrite to start over")
        _barrier(device)  # every process has looked before the main one deletes
        if _is_main(device):
            _shutil.rmtree(work, ignore_errors=True)
        _barrier(device)
    return work


def _seq_len(train: TrainConfig, max_positions: int) -> int:
    return train.seq_len if train.seq_len is not None else min(max_positions, 2048)


def _run_identity(train: TrainConfig, **extra) -> dict:
    """What a resumed run must share with the interrupted one (steps, logging, device and compilation may change)."""
    settings = {k: v for k, v in _dc.asdict(train).items()
                if k not in ("max_steps", "checkpoint_every", "log_every", "device", "compile")}
    return _jsonable({**extra, "train": settings})


def _public_source(embedder: _Path | None, row_file: _Path | None):
    """The router embedder of a new anchor: a folder, or a row file of the public data made by `embed-domain`
    (for machines that cannot hold the embedder). Checked before any slow work; returns a `RowFile` or None."""
    from flexmoe.embed import embedder_identity, read_row_file

    if (embedder is None) == (row_file is None):
        raise _ConfigError("give the router embedder as --embedder PATH, or --public-row FILE made with "
                           "`flexmoe embed-domain` on the public data (not both)")
    if row_file is not None:
        return read_row_file(row_file)
    embedder_identity(embedder)
    return None


def _public_row(docs, embedder: _Path | None, rows, hidden: int, *, num_docs: int, seed: int, device: str,
                progress: bool):
    """r_pub in model space, the embedder's identity, and the projection (when its dim != hidden)."""
    from flexmoe.embed import embedder_identity, mean_embedding
    from flexmoe.io.anchor import ProjectionSpec, make_projection

    if rows is not None:
        identity, row = rows.embedder, rows.row
    else:
        identity = embedder_identity(embedder)
        row = mean_embedding(docs.texts, embedder, num_docs=num_docs, seed=seed, device=device,
                             progress=progress).row
    if row.numel() != identity.dim:
        raise _ConfigError(f"embedder {identity.name} produced {row.numel()}-d vectors, its config says {identity.dim}")
    if identity.dim == hidden:
        return row, identity, None, None
    projection = make_projection(identity.dim, hidden, seed)
    spec = ProjectionSpec(kind="gaussian", seed=seed, in_dim=identity.dim, out_dim=hidden)
    return projection @ row, identity, projection, spec


def _write_anchor_meta(tmp: _Path, *, hidden: int, layers: int, ffn: int, dtype: str, identity, projection, spec,
                       public_row, docs) -> str:
    from flexmoe.io.anchor import AnchorMeta, write_anchor_files
    from flexmoe.io.fingerprint import anchor_fingerprint

    fingerprint = anchor_fingerprint(tmp)
    meta = AnchorMeta(fingerprint=fingerprint, hidden_size=hidden, num_layers=layers, intermediate_size=ffn,
                      dtype=dtype, embedder=identity, projection=spec,
                      public_data={"documents": len(docs.texts), "bytes": docs.num_bytes})
    write_anchor_files(tmp, meta, public_row, projection)
    return fingerprint


def _train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE on the public documents, as a `PreTrainedTokenizerFast` with EOS and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def _load_tokenizer(path: _Path, what: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise _CheckpointError(f"{what} {path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise _CheckpointError(f"{what} {path}: the tokenizer has no EOS token")
    if not hasattr(tok, "backend_tokenizer"):
        raise _CheckpointError(f"{what} {path}: need a fast (tokenizers-backed) tokenizer")
    return tok


def train_anchor(cfg: TrainAnchorConfig, out: str | _Path, overwrite: bool = False, *, resume: bool = False,
                 on_step: _Callable[[int], None] | None = None, progress: bool = True) -> AnchorResult:
    """Train a dense OLMo-2 anchor on public text; save it with its tokenizer, r_pub and fingerprint at `out`."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from flexmoe import presets
    from flexmoe.data import load_documents, pack
    from flexmoe.io.anchor import ANCHOR_META
    from flexmoe.io.atomic import atomic_dir, check_output
    from flexmoe.train import fsdp
    from flexmoe.train.loop import train

    out = check_output(out, overwrite)
    shape = presets.get(cfg.preset)
    flags = {"max_steps": cfg.max_steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr,
             "bf16": cfg.bf16, "checkpoint_every": cfg.checkpoint_every, "compile": cfg.compile}
    train_cfg = _dc.replace(shape.train, **{k: v for k, v in flags.items() if v is not None}, seed=cfg.seed,
                            device=cfg.device)
    rows = _public_source(cfg.embedder, cfg.public_row)
    docs = load_documents(cfg.data)
    work = _prepare_work_dir(out, resume, overwrite, cfg.device)
    if cfg.tokenizer is not None:
        tokenizer = _load_tokenizer(cfg.tokenizer, "tokenizer")
    else:  # trained once, by the main process, and kept for a resume
        tok_dir = work / "tokenizer"
        if _is_main(cfg.device) and not (tok_dir / "tokenizer.json").is_file():
            with atomic_dir(tok_dir, overwrite=True) as tmp:
                _train_bpe(docs.texts, shape.vocab_size).save_pretrained(str(tmp))
        _barrier(cfg.device)
        tokenizer = _load_tokenizer(tok_dir, "tokenizer")
    vocab = max(shape.vocab_size, -(-len(tokenizer) // 128) * 128)
    seq_len = _seq_len(train_cfg, shape.max_position_embeddings)
    train_cfg = _dc.replace(train_cfg, seq_len=seq_len)
    public_row, identity, projection, spec = _public_row(
        docs, cfg.embedder, rows, shape.hidden_size, num_docs=cfg.num_docs, seed=cfg.seed,
        device=_device(cfg.device), progress=progress)
    config = Olmo2Config(
        vocab_size=vocab, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False, use_cache=True)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = Olmo2ForCausalLM(config)
    data, summary = pack(docs, tokenizer, seq_len, seed=cfg.seed, progress=progress)
    identity_run = _run_identity(train_cfg, preset=_dc.asdict(shape) | {"train": None}, vocab=vocab,
                                 data=summary.to_json())
    result, model = train(model, data, train_cfg, work_dir=work, resume=resume, identity=identity_run,
                          on_step=on_step, desc=f"anchor {shape.name}", progress=progress)
    num_params = sum(p.numel() for p in model.parameters())
    fingerprint = ""
    if _is_main(cfg.device):
        from flexmoe.model.upcycle import DTYPES

        if fsdp.is_sharded(model):  # FSDP2: every tensor was trained, so every tensor was gathered here
            model = fsdp.unsharded_copy(model, lambda: Olmo2ForCausalLM(config))
        with atomic_dir(out, overwrite, seal=ANCHOR_META) as tmp:
            model.to(DTYPES[shape.dtype]).save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            fingerprint = _write_anchor_meta(tmp, hidden=shape.hidden_size, layers=shape.num_layers,
                                             ffn=shape.intermediate_size, dtype=shape.dtype, identity=identity,
                                             projection=projection, spec=spec, public_row=public_row, docs=docs)
        _shutil.rmtree(work, ignore_errors=True)
    _barrier(cfg.device)
    return AnchorResult(path=out, fingerprint=fingerprint, num_params=num_params, steps=result.steps,
                        final_loss=result.final_loss, tokens=result.tokens, wall_s=result.wall_s,
                        tokens_per_s=result.tokens_per_s)


def init_anchor(cfg: InitAnchorConfig, out: str | _Path, overwrite: bool = False, *,
                progress: bool = True) -> AnchorResult:
    """Adopt an existing HF `Olmo2ForCausalLM` directory as an anchor: a copy plus r_pub and the fingerprint."""
    import json

    from flexmoe.data import load_documents
    from flexmoe.io.anchor import ANCHOR_META, ANCHOR_ROUTER
    from flexmoe.io.atomic import atomic_dir, check_output
    from flexmoe.io.reader import LazyReader, model_files
    from flexmoe.io.safetensors_format import DTYPE_TO_TORCH

    out = check_output(out, overwrite)
    src = _Path(cfg.model)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise _CheckpointError(f"{src}: not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        raise _CheckpointError(f"{config_file}: not valid JSON") from None
    if config.get("model_type") != "olmo2":
        raise _CheckpointError(f"{src}: model_type {config.get('model_type')!r} is not an OLMo-2 model "
                               "(expected 'olmo2', an Olmo2ForCausalLM directory)")
    files = model_files(src)
    tokenizer = _load_tokenizer(cfg.tokenizer or src, "tokenizer of" if cfg.tokenizer is None else "tokenizer")
    rows = _public_source(cfg.embedder, cfg.public_row)
    docs = load_documents(cfg.public_data)
    hidden = int(config["hidden_size"])
    public_row, identity, projection, spec = _public_row(
        docs, cfg.embedder, rows, hidden, num_docs=cfg.num_docs, seed=cfg.seed, device=_device(cfg.device),
        progress=progress)
    with LazyReader(files) as reader:
        floats = [reader.spec(k).dtype for k in reader.keys() if DTYPE_TO_TORCH[reader.spec(k).dtype].is_floating_point]
        num_params = sum(reader.spec(k).nbytes // DTYPE_TO_TORCH[reader.spec(k).dtype].itemsize for k in reader.keys())
    dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(floats[0] if floats else "", None)
    if dtype is None:
        raise _CheckpointError(f"{src}: weights of dtype {floats[0] if floats else 'none'} are not supported")
    with atomic_dir(out, overwrite, seal=ANCHOR_META) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in (ANCHOR_META, ANCHOR_ROUTER) and not f.name.startswith("."):
                _shutil.copyfile(f, tmp / f.name)
        if cfg.tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        fingerprint = _write_anchor_meta(tmp, hidden=hidden, layers=int(config["num_hidden_layers"]),
                                         ffn=int(config["intermediate_size"]), dtype=dtype, identity=identity,
                                         projection=projection, spec=spec, public_row=public_row, docs=docs)
    return AnchorResult(path=out, fingerprint=fingerprint, num_params=num_params)


def embed_domain(cfg: EmbedConfig, out: str | _Path, overwrite: bool = False, *, progress: bool = True) -> EmbedResult:
    """Write a router-row file: the mean embedding of up to `cfg.num_docs` documents sampled with `cfg.seed`."""
    from flexmoe.data import load_documents
    from flexmoe.embed import embedder_identity, mean_embedding, write_row_file
    from flexmoe.io.atomic import check_output

    out = check_output(out, overwrite)
    identity = embedder_identity(cfg.embedder)
    docs = load_documents(cfg.data)
    emb = mean_embedding(docs.texts, cfg.embedder, num_docs=cfg.num_docs, seed=cfg.seed, batch_size=cfg.batch_size,
                         max_chunks_per_doc=cfg.max_chunks_per_doc, device=_device(cfg.device), progress=progress)
    write_row_file(out, emb, identity)
    return EmbedResult(path=out, dim=int(emb.row.numel()), num_docs=emb.num_docs, num_chunks=emb.num_chunks)


def _dense_anchor(path: _Path):
    """A flexmoe anchor that is a dense OLMo-2 model (not a merged checkpoint)."""
    import json

    from flexmoe.io.anchor import read_anchor

    anchor = read_anchor(path)
    model_type = json.loads((anchor.path / "config.json").read_text()).get("model_type")
    if model_type != "olmo2":
        raise _CheckpointError(f"{path}: model_type {model_type!r} is not a dense OLMo-2 anchor; "
                               "experts are trained against the anchor, not a merged checkpoint")
    return anchor


def _router_row(cfg: ExpertSpec, anchor):
    """(make_row(docs, data, device, progress) -> r_i in model space, embedder identity for the card or None).

    The embedder or row file is checked against the anchor here, before any slow work.
    """
    from flexmoe.embed import check_same_embedder, embedder_identity, mean_embedding, read_row_file
    from flexmoe.model.upcycle import hidden_mean_row, random_row

    source, router = cfg.router.source, cfg.router
    if source == RouterSource.EMBEDDING:
        if cfg.embedder is None:
            raise _ConfigError("router source 'embedding' needs an embedder: pass --embedder PATH "
                               "(the anchor's) or --router-row FILE")
        identity = embedder_identity(cfg.embedder)
        check_same_embedder(identity, anchor.meta.embedder, f"embedder {cfg.embedder}")
        return lambda docs, data, device, progress: anchor.to_model_space(mean_embedding(
            docs.texts, cfg.embedder, num_docs=router.num_docs, seed=router.seed, device=device,
            progress=progress).row), identity
    if source == RouterSource.ROW_FILE:
        if router.row_file is None:
            raise _ConfigError("router source 'row-file' needs --router-row FILE (made with `flexmoe embed-domain`)")
        rows = read_row_file(router.row_file)
        check_same_embedder(rows.embedder, anchor.meta.embedder, f"router row {router.row_file}")
        row = anchor.to_model_space(rows.row)
        return lambda *_: row, rows.embedder
    if source == RouterSource.RANDOM:
        return lambda *_: random_row(anchor.public_row, router.seed), None
    return lambda docs, data, device, progress: hidden_mean_row(
        anchor, data, num_seqs=router.num_docs, batch_size=cfg.train.batch_size, device=device), None


def _public_mix(cfg: ExpertSpec, tokenizer, train_cfg, *, dense: bool, progress: bool):
    """(`PublicMix` | None, summary of the public text packed | None) for `cfg.router_training`.

    Only as much public text is tokenized as the run draws (plus one block), so a large public corpus costs
    nothing extra. A dense (no-coordination) run has no router: it takes none.
    """
    from flexmoe.config import PublicLoss
    from flexmoe.data import load_documents, pack
    from flexmoe.train.loop import PublicMix

    rt = cfg.router_training
    rows = rt.public_rows(train_cfg.batch_size)
    if dense or rows == 0:
        return None, None
    seq = train_cfg.seq_len
    need = (train_cfg.max_steps * train_cfg.grad_accum * _state(train_cfg.device).num_processes * rows + 1) * seq + 1
    data, summary = pack(load_documents(rt.public_data), tokenizer, seq, seed=train_cfg.seed + 1, max_tokens=need,
                         progress=progress)
    return PublicMix(data=data, rows=rows, router_only=rt.public_loss == PublicLoss.ROUTER,
                     route_loss=rt.public_route_loss), summary


def _check_router_training(rt, batch_size: int, *, dense: bool) -> None:
    """Refuse, before any slow work, a router training that cannot run as asked."""
    if dense or rt.public_ratio == 0:
        return
    if not rt.public_data:
        raise _ConfigError(f"router_training.public_ratio is {rt.public_ratio}, but no public text was given: pass "
                           "--public-data PATH (the anchor's public corpus), or --paper-router to train on owner "
                           "text only as the paper does")
    if batch_size < 2:
        raise _ConfigError(f"a batch of {batch_size} sequence leaves no room for public text: use --batch-size 2 "
                           "or more, or --paper-router")


def _router_training_record(rt, public_summary, *, dense: bool) -> dict:
    """What the card and the resume identity say of `RouterTraining` (files by name: they may move)."""
    if dense:
        return {"mode": "dense (no router)"}
    return {"public_ratio": rt.public_ratio if public_summary is not None else 0.0,
            "public_loss": rt.public_loss.value, "public_route_loss": rt.public_route_loss, "bias": rt.bias.value,
            "public_data": None if public_summary is None else public_summary.to_json()}


def train_expert(cfg: ExpertSpec, out: str | _Path, overwrite: bool = False, resume: bool = False, *,
                 on_step: _Callable[[int], None] | None = None, progress: bool = True) -> ExpertResult:
    """Train one data owner's expert against a frozen anchor; write its package (docs/FORMAT.md) at `out`."""
    import json
    from dataclasses import asdict

    import torch

    from flexmoe import __version__
    from flexmoe.data import load_documents, pack
    from flexmoe.io.atomic import atomic_dir, check_output
    from flexmoe.io.package import PACKAGE_CARD, PACKAGE_TENSORS, ExpertCard, validate_expert_name, write_package
    from flexmoe.config import BiasUpdate
    from flexmoe.model.upcycle import (anchor_dtype, expert_skeleton, export_dense_package_tensors,
                                       export_package_tensors, fill_expert_, load_dense, project_biases_)
    from flexmoe.train.loop import train
    from flexmoe.train.state import latest_checkpoint

    name = validate_expert_name(cfg.name)
    if cfg.anchor is None:
        raise _ConfigError("no anchor: pass --anchor DIR (made with `flexmoe train-anchor` or `init-anchor`)")
    if not cfg.data:
        raise _DataError("no data given: pass --data PATH or list `data:` in the expert spec")
    out = check_output(out, overwrite)
    anchor = _dense_anchor(_Path(cfg.anchor))
    make_row, identity = _router_row(cfg, anchor)
    device = _device(cfg.train.device)
    docs = load_documents(cfg.data)
    dense = cfg.mode == ExpertMode.DENSE
    _check_router_training(cfg.router_training, cfg.train.batch_size, dense=dense)
    tokenizer = _load_tokenizer(anchor.path, "anchor")
    max_positions = json.loads((anchor.path / "config.json").read_text()).get("max_position_embeddings", 2048)
    train_cfg = _dc.replace(cfg.train, seq_len=_seq_len(cfg.train, max_positions))
    work = _prepare_work_dir(out, resume, overwrite, cfg.train.device)
    data, summary = pack(docs, tokenizer, train_cfg.seq_len, seed=train_cfg.seed, progress=progress)
    public, public_summary = _public_mix(cfg, tokenizer, train_cfg, dense=dense, progress=progress)
    # A resumed expert takes r_i from its checkpoint: no need to embed the data again (a dense run never trains it).
    resuming = resume and latest_checkpoint(work) is not None and not dense
    row = anchor.public_row if resuming else make_row(docs, data, device, progress)
    if dense:
        model, init = load_dense(anchor), None
    else:  # built on the meta device, filled from the anchor where it trains (one device, or FSDP shards)
        model = expert_skeleton(anchor, top_k=cfg.train_top_k, frozen_dtype=torch.bfloat16 if train_cfg.bf16 else None)

        def init(placed, put):
            fill_expert_(placed, anchor, row, put)
    router_training = _router_training_record(cfg.router_training, public_summary, dense=dense)
    run = _run_identity(train_cfg, anchor=anchor.meta.fingerprint, name=name, data=summary.to_json(),
                        train_top_k=cfg.train_top_k, router=cfg.router.source, mode=cfg.mode,
                        router_training=router_training)
    project = not dense and cfg.router_training.bias == BiasUpdate.PROJECT
    result, model = train(model, data, train_cfg, work_dir=work, resume=resume, identity=run, on_step=on_step,
                          desc=f"expert {name}", progress=progress, init=init, public=public,
                          after_step=project_biases_ if project else None)
    package_bytes = 0
    if _is_main(cfg.train.device):
        hparams = _jsonable({**asdict(train_cfg), "train_top_k": cfg.train_top_k, "mode": cfg.mode,
                             "router": {"num_docs": cfg.router.num_docs, "seed": cfg.router.seed},
                             "router_training": router_training})
        card = ExpertCard(name=name, anchor_fingerprint=anchor.meta.fingerprint,
                          embedder=None if identity is None else asdict(identity),
                          router_source=cfg.router.source.value, data=summary.to_json(), hparams=hparams,
                          steps=result.steps, final_loss=result.final_loss, flexmoe_version=__version__)
        with atomic_dir(out, overwrite, seal=PACKAGE_CARD) as tmp:
            dtype = anchor_dtype(anchor)
            tensors = export_dense_package_tensors(model, row, dtype) if dense else export_package_tensors(model, dtype)
            write_package(tmp, tensors, card)
        package_bytes = (out / PACKAGE_TENSORS).stat().st_size
        _shutil.rmtree(work, ignore_errors=True)
    _barrier(cfg.train.device)
    return ExpertResult(path=out, name=name, steps=result.steps, final_loss=result.final_loss, tokens=result.tokens,
                        wall_s=result.wall_s, tokens_per_s=result.tokens_per_s, package_bytes=package_bytes,
                        resumed_from=result.resumed_from)


# ---- checkpoint verbs: merge, add, remove, extract, inspect, load_model ----
# Streaming key-level surgery (flexmoe/surgery.py, flexmoe/inspection.py): neither imports transformers nor any
# training code.
from pathlib import Path  # noqa: E402

from flexmoe.config import MergeConfig  # noqa: E402
from flexmoe.inspection import ExpertInfo, InspectResult, ShardInfo  # noqa: E402,F401
from flexmoe.surgery import CheckpointResult, ExtractResult  # noqa: E402,F401
from flexmoe import inspection as _inspection  # noqa: E402
from flexmoe import surgery as _surgery  # noqa: E402


def merge(anchor: str | Path, experts: list[str | Path], out: str | Path,
          config: MergeConfig | None = None) -> CheckpointResult:
    """Merge an anchor and expert packages into one transformers `flex_olmo` checkpoint at `out`."""
    return _surgery.merge(anchor, experts, out, config)


def add(merged: str | Path, expert: str | Path, out: str | Path, config: MergeConfig | None = None) -> CheckpointResult:
    """Append an expert package to a merged checkpoint. `out == merged` with `overwrite` edits it in place, atomically."""
    return _surgery.add(merged, expert, out, config)


def remove(merged: str | Path, name: str, out: str | Path, config: MergeConfig | None = None) -> CheckpointResult:
    """Remove expert `name` (opt-out); top-k becomes min(k, E-1). `out == merged` with `overwrite` edits in place."""
    return _surgery.remove(merged, name, out, config)


def extract(merged: str | Path, name: str, out: str | Path, config: MergeConfig | None = None) -> ExtractResult:
    """Write expert `name` of a merged checkpoint back out as an expert package."""
    return _surgery.extract(merged, name, out, config)


def inspect(path: str | Path, *, verify: bool = False) -> InspectResult:
    """Describe a merged checkpoint, an anchor or an expert package; `verify` recomputes the anchor fingerprint."""
    return _inspection.inspect(path, verify=verify)


def verify(path: str | Path):
    """Check every file of a flexmoe folder against its manifest, and its fingerprints (flexmoe/verify.py);
    returns a `VerifyResult` whose `ok` says whether all holds."""
    from flexmoe.verify import verify as _verify

    return _verify(path)


def load_model(path: str | Path, *, dtype=None, device=None, experts_implementation: str | None = None,
               apply_bias: bool = True, fast: bool = False):
    """`FlexOlmoForCausalLM` from a merged folder, with the expert biases applied (see flexmoe/model/load.py).

    `fast=True` switches to flexmoe's inference path (flexmoe/infer): the registered sort + grouped-GEMM experts
    kernel, fused norms, and `flexmoe.infer.fast_generate` decoding over a static cache with CUDA graphs and
    compiled decode steps on CUDA. The checkpoint is unchanged; the model still works with `generate`.
    """
    from flexmoe.model.load import load_model as _load

    model = _load(path, dtype=dtype, device=device, experts_implementation=experts_implementation,
                  apply_bias=apply_bias)
    if fast:
        from flexmoe.infer import enable_fast_path

        enable_fast_path(model, compile=next(model.parameters()).is_cuda)
    return model


# ---- evaluation verbs: evaluate, generate ----

@_dc.dataclass
class EvalResult:
    """Per-domain BPB (flexmoe/eval/bpb.py), routing statistics for MoE models, and provenance."""

    model: str
    domains: list  # list[flexmoe.eval.bpb.DomainBPB]
    routing: object | None  # flexmoe.eval.routing.RoutingStats
    settings: dict
    versions: dict
    wall_s: float
    json_path: str | None = None
    plots: list[str] = _dc.field(default_factory=list)

    @property
    def mean_bpb(self) -> float:
        return sum(d.bpb for d in self.domains) / len(self.domains)

    def bpb(self, domain: str) -> float:
        return next(d.bpb for d in self.domains if d.domain == domain)

    def to_json(self) -> dict:
        return {"format": "flexmoe-eval/1", "model": self.model, "mean_bpb": self.mean_bpb,
                "domains": [d.to_json() for d in self.domains],
                "routing": None if self.routing is None else self.routing.to_json(),
                "settings": self.settings, "versions": self.versions, "wall_s": self.wall_s, "plots": self.plots}


def evaluate(cfg, *, model=None, tokenizer=None) -> EvalResult:
    """BPB per domain (+ routing statistics for MoE models) of `cfg.model`, or of an in-memory `model`.

    `model` may be any transformers causal LM or a scorer such as `flexmoe.eval.ensemble.Ensemble`; then
    `tokenizer` (or `cfg.model`, to load one from) is required. A `cfg.top_k` override is undone afterwards.
    """
    import json
    import time

    from flexmoe.eval import bpb as B
    from flexmoe.eval import evaluate as E
    from flexmoe.io.atomic import atomic_dir, atomic_write_text, check_output

    cfg.validate()
    for out in (cfg.json_out, cfg.plots):
        if out is not None:
            check_output(out, cfg.overwrite)
    t0 = time.perf_counter()
    docs = E.read_domains(cfg.data, cfg.max_bytes)  # before any model is loaded, so bad data fails fast
    device = B.resolve_device(cfg.device)
    scorer, tokenizer, name = E.build_scorer(cfg, device, model=model, tokenizer=tokenizer)
    seq_len = E.window_length(cfg, scorer)
    results, routing = E.score_domains(cfg, scorer, tokenizer, docs, seq_len)
    settings = {k: (str(v) if isinstance(v, _Path) else v) for k, v in _dc.asdict(cfg).items()}
    settings.update(device=str(device), ensemble=[str(p) for p in cfg.ensemble], seq_len=seq_len,
                    top_k_used=routing.top_k if routing is not None else None)
    result = EvalResult(model=name, domains=results, routing=routing, settings=settings,
                        versions=_versions(), wall_s=0.0)
    if cfg.plots is not None:
        from flexmoe.eval.plots import write_plots

        with atomic_dir(cfg.plots, overwrite=cfg.overwrite) as tmp:
            files = write_plots(tmp, results, routing, title=name)
        result.plots = [str(_Path(cfg.plots) / f.name) for f in files]
    result.wall_s = time.perf_counter() - t0
    if cfg.json_out is not None:
        atomic_write_text(cfg.json_out, json.dumps(result.to_json(), indent=2) + "\n")
        result.json_path = str(cfg.json_out)
    return result


def _versions() -> dict:
    import platform

    import torch
    import transformers

    from flexmoe import __version__

    return {"flexmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def generate(cfg):
    """Greedy continuations of `cfg.prompts` (a `flexmoe.infer.GenerateConfig`) by the model at `cfg.model`.

    A merged checkpoint loads with its expert biases; with `cfg.fast` it runs flexmoe's fast path (experts
    kernel, static cache, CUDA graphs on GPU), else stock `model.generate`.
    Returns a `flexmoe.infer.run.GenerateResult`.
    """
    from flexmoe.infer.run import run_generate

    return run_generate(cfg)


# ---- router tuning verbs: tune_router, select_proxy (flexmoe/tune.py, flexmoe/proxy.py) ----

from flexmoe.config import ProxyConfig, RouterTuneConfig  # noqa: E402


@_dc.dataclass
class TuneResult:
    path: _Path
    experts: list[str]  # the owners whose rows and biases were tuned, in router order
    steps: int
    final_loss: float | None
    first_loss: float | None  # mean LM loss of the first of several logging windows of this invocation, else None
    tokens: int
    wall_s: float
    tokens_per_s: float
    resumed_from: int = 0


def tune_router(cfg: RouterTuneConfig, out: str | _Path, overwrite: bool = False, resume: bool = False, *,
                on_step: _Callable[[int], None] | None = None, progress: bool = True) -> TuneResult:
    """Router tuning (FLEXOLMO.md §4): train only the owners' router rows and biases of `cfg.merged` on public proxy
    data; write the tuned merged checkpoint at `out` (flexmoe/tune.py says why r_pub stays frozen)."""
    from flexmoe import __version__
    from flexmoe import tune as T
    from flexmoe.data import load_documents, pack
    from flexmoe.io.atomic import check_output
    from flexmoe.train.loop import train

    merged = _Path(cfg.merged)
    if _Path(out).resolve() == merged.resolve():
        raise _ConfigError(f"--out {out} is the checkpoint being tuned; write the tuned one to a new folder")
    out = check_output(out, overwrite)
    names, config, fingerprint = T.check_tunable(merged)
    docs = load_documents(cfg.data)
    tokenizer = _load_tokenizer(merged, "merged checkpoint")
    steps = cfg.train.max_steps
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else min(100, max(1, steps // 10))
    train_cfg = _dc.replace(cfg.train, seq_len=_seq_len(cfg.train, config.get("max_position_embeddings", 2048)),
                            warmup_steps=warmup)
    work = _prepare_work_dir(out, resume, overwrite, train_cfg.device)
    data, summary = pack(docs, tokenizer, train_cfg.seq_len, seed=train_cfg.seed, progress=progress)
    model = T.load_checked(merged)  # fp32 rows to train; written back in the router's dtype
    T.make_tunable(model)
    run = _run_identity(train_cfg, anchor=fingerprint, experts=names, data=summary.to_json())
    result, model = train(model, data, train_cfg, work_dir=work, resume=resume, identity=run, on_step=on_step,
                          desc="router tuning", progress=progress, router_z_fn=T.tuning_z_loss)
    if _is_main(train_cfg.device):
        rows, biases = T.tuned_router(model)
        record = _jsonable({"steps": result.steps, "final_loss": result.final_loss, "data": summary.to_json(),
                            "hparams": _dc.asdict(train_cfg), "flexmoe_version": __version__})
        T.write_tuned(merged, out, rows, biases, record, shard_size=cfg.shard_size, overwrite=overwrite,
                      progress=progress)
        _shutil.rmtree(work, ignore_errors=True)
    _barrier(train_cfg.device)
    first = result.losses[0][1] if len(result.losses) > 1 else None
    return TuneResult(path=out, experts=names[1:], steps=result.steps, final_loss=result.final_loss, first_loss=first,
                      tokens=result.tokens, wall_s=result.wall_s, tokens_per_s=result.tokens_per_s,
                      resumed_from=result.resumed_from)


def select_proxy(cfg: ProxyConfig, out: str | _Path, overwrite: bool = False, *, progress: bool = True):
    """Write the share `cfg.fraction` of the public documents that a classifier over sentence embeddings finds
    most like the domain, as `.jsonl` with a `text` field (flexmoe/proxy.py). Returns a `flexmoe.proxy.ProxyResult`."""
    from flexmoe.io.atomic import check_output
    from flexmoe.proxy import select_proxy as _select

    out = check_output(out, overwrite)
    return _select(cfg, out, device=_device(cfg.device), progress=progress)
