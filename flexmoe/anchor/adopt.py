"""`init_anchor`: an existing Hugging Face `Olmo2ForCausalLM` folder adopted as an anchor (a copy plus r_pub and the
fingerprint), so owners can train experts against a released model."""

from __future__ import annotations

import shutil
from pathlib import Path

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
    out = check_output(out, overwrite)
    src = Path(cfg.model)
    config = hf_config.require(src, hf_config.DENSE, "adopt an Olmo2ForCausalLM directory")
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
