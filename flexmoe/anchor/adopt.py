"""`init_anchor`: an existing Hugging Face `Olmo2ForCausalLM` folder adopted as an anchor (a copy plus r_pub and the
fingerprint), so owners can train experts against a released model; or, `--from-moe`, the dense anchor cut out of a
FlexOlmo model (shared tensors + expert 0, r_pub = router row 0), e.g. of a released public 2x7B."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flexmoe.anchor.meta import AnchorResult, write_meta
from flexmoe.config import DType, InitAnchorConfig
from flexmoe.data import load_documents, load_tokenizer
from flexmoe.errors import CheckpointError
from flexmoe.io import hf_config
from flexmoe.io.anchor import ANCHOR_META, ANCHOR_ROUTER
from flexmoe.io.atomic import atomic_dir, check_output
from flexmoe.io.reader import LazyReader, model_files
from flexmoe.io.safetensors_format import DTYPE_TO_TORCH
from flexmoe.router.rows import check_public_source, public_row
from flexmoe.train import accel


def init_anchor(cfg: InitAnchorConfig, out: Path, *, overwrite: bool, progress: bool) -> AnchorResult:
    if cfg.from_moe is not None:
        return init_anchor_from_moe(cfg, out, overwrite=overwrite, progress=progress)
    out = check_output(out, overwrite)
    src = Path(cfg.model)
    config = hf_config.require(src, hf_config.DENSE, "adopt a dense Olmo2ForCausalLM or Qwen3ForCausalLM directory")
    files = model_files(src)
    tokenizer = load_tokenizer(cfg.tokenizer or src, "tokenizer of" if cfg.tokenizer is None else "tokenizer")
    rows = check_public_source(cfg.embedder, cfg.public_row)
    docs = load_documents(cfg.public_data)
    public = public_row(docs.texts, cfg.embedder, rows, int(config["hidden_size"]), num_docs=cfg.num_docs,
                        seed=cfg.seed, device=accel.local_device(cfg.device), progress=progress)
    with LazyReader(files) as reader:
        specs = [reader.spec(k) for k in reader.keys()]
    floats = [s.dtype for s in specs if DTYPE_TO_TORCH[s.dtype].is_floating_point]
    if not floats:
        raise CheckpointError(f"{src}: no floating-point weights")
    dtype = DType.of_safetensors(floats[0])
    num_params = sum(s.nbytes // DTYPE_TO_TORCH[s.dtype].itemsize for s in specs)
    with atomic_dir(out, overwrite, seal=ANCHOR_META) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in (ANCHOR_META, ANCHOR_ROUTER) and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        if cfg.tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        fingerprint = write_meta(tmp, config=config, dtype=dtype, public=public, docs=docs)
    return AnchorResult(path=out, fingerprint=fingerprint, num_params=num_params)


def init_anchor_from_moe(cfg: InitAnchorConfig, out: Path, *, overwrite: bool, progress: bool) -> AnchorResult:
    """The dense `Olmo2ForCausalLM` inside a FlexOlmo folder: shared tensors and expert 0 (as the dense FFN), copied
    as raw bytes in the canonical order; r_pub = router row 0 (float32, lossless); no embedder. Experts built on
    this public model (its other 2x siblings) then import against it with `import-expert`."""
    from flexmoe.checkpoint.adopt import open_flex_source
    from flexmoe.checkpoint.surgery import copy_item, stream_items
    from flexmoe.config import SHARD_SIZE, parse_size
    from flexmoe.io.jsonfile import dump_json
    from flexmoe.io.keys import dense_ffn_key, parse_expert_key, parse_router_key, router_key
    from flexmoe.io.merged import COPIED_FILES, copy_side_files
    from flexmoe.io.anchor import AnchorMeta, write_anchor_files
    from flexmoe.io.fingerprint import anchor_fingerprint

    out = check_output(out, overwrite)
    src_dir = Path(cfg.from_moe)
    src = open_flex_source(src_dir, "init-anchor --from-moe takes a FlexOlmoForCausalLM folder")
    try:
        items = []
        for key in src.reader.keys():
            parsed = parse_expert_key(key)
            if parsed is not None:
                if parsed[1] == 0:
                    items.append(copy_item(dense_ffn_key(parsed[0], parsed[2]), src.reader, key))
            elif parse_router_key(key) is None:
                items.append(copy_item(key, src.reader, key))
        row0 = src.reader.get(router_key(0))[0]
        for layer in range(1, src.num_layers):
            if not torch.equal(src.reader.get(router_key(layer))[0], row0):
                # flexmoe's anchor has one r_pub for every layer (docs/FORMAT.md), so this public model has no anchor.
                raise CheckpointError(f"{src_dir}: row 0 of {router_key(layer)} differs from layer 0's; a flexmoe anchor "
                                      "has one public router row for every layer, so this model cannot be one "
                                      "(use `flexmoe adopt` to work with it as a merged checkpoint)")
        r_pub = row0.float()
        config = hf_config.family(src.config).dense_config(src.config)
        tokenizer = load_tokenizer(cfg.tokenizer, "tokenizer") if cfg.tokenizer is not None else None
        dtype = DType.of_safetensors(src.dtype)
        with atomic_dir(out, overwrite, seal=ANCHOR_META) as tmp:
            stream_items(tmp, items, sources=[src.reader], max_shard_bytes=parse_size(SHARD_SIZE), prefix="model",
                         progress=progress, desc="init-anchor")
            dump_json(tmp / "config.json", config, sort_keys=True)
            copy_side_files(src_dir, tmp, COPIED_FILES)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            fingerprint = anchor_fingerprint(tmp)
            meta = AnchorMeta(fingerprint=fingerprint, hidden_size=src.hidden_size, num_layers=src.num_layers,
                              intermediate_size=int(config["intermediate_size"]), dtype=dtype.value, embedder=None,
                              public_data={"documents": 0, "bytes": 0,
                                           "r_pub": f"router row 0 of {src_dir.resolve()}"})
            write_anchor_files(tmp, meta, r_pub, None)
    finally:
        src.close()
    num_params = sum(it.spec.nbytes // DTYPE_TO_TORCH[it.spec.dtype].itemsize for it in items)
    return AnchorResult(path=out, fingerprint=fingerprint, num_params=num_params)
