"""`train_anchor`: a dense OLMo-2 anchor trained on public text, saved with its tokenizer, r_pub and fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from flexmoe import presets
from flexmoe.anchor.meta import AnchorResult, write_meta
from flexmoe.config import TrainAnchorConfig, jsonable
from flexmoe.data import load_documents, load_tokenizer, pack
from flexmoe.io.anchor import ANCHOR_META
from flexmoe.io.atomic import atomic_dir, check_output
from flexmoe.router.rows import check_public_source, public_row
from flexmoe.train import accel, fsdp
from flexmoe.train.loop import train


def train_bpe(texts: list[str], vocab_size: int):
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


def train_anchor(cfg: TrainAnchorConfig, out: Path, *, overwrite: bool, resume: bool, progress: bool,
                 on_step: Callable[[int], None] | None) -> AnchorResult:
    out = check_output(out, overwrite)
    shape = presets.get(cfg.preset)
    train_cfg = dataclasses.replace(cfg.train or shape.train, seed=cfg.seed)
    device = train_cfg.device
    rows = check_public_source(cfg.embedder, cfg.public_row)
    docs = load_documents(cfg.data)
    work = accel.prepare_work_dir(out, resume, overwrite, device)
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer, "tokenizer")
    else:  # trained once, by the main process, and kept for a resume
        tok_dir = work / "tokenizer"
        if accel.is_main(device) and not (tok_dir / "tokenizer.json").is_file():
            with atomic_dir(tok_dir, overwrite=True) as tmp:
                train_bpe(docs.texts, shape.vocab_size).save_pretrained(str(tmp))
        accel.barrier(device)
        tokenizer = load_tokenizer(tok_dir, "tokenizer")
    vocab = max(shape.vocab_size, -(-len(tokenizer) // 128) * 128)
    train_cfg = train_cfg.for_context(shape.max_position_embeddings)
    public = public_row(docs.texts, cfg.embedder, rows, shape.hidden_size, num_docs=cfg.num_docs, seed=cfg.seed,
                        device=accel.local_device(device), progress=progress)
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
    data, summary = pack(docs, tokenizer, train_cfg.seq_len, seed=train_cfg.seed, progress=progress)
    identity = train_cfg.run_identity(preset=jsonable(shape) | {"train": None}, vocab=vocab, data=summary.to_json())
    stats, model = train(model, data, train_cfg, work_dir=work, resume=resume, identity=identity, on_step=on_step,
                         desc=f"anchor {shape.name}", progress=progress)
    num_params = sum(p.numel() for p in model.parameters())
    fingerprint = ""
    if accel.is_main(device):
        if fsdp.is_sharded(model):  # FSDP2: every tensor was trained, so every tensor was gathered here
            model = fsdp.unsharded_copy(model, lambda: Olmo2ForCausalLM(config))
        with atomic_dir(out, overwrite, seal=ANCHOR_META) as tmp:
            model.to(shape.dtype.torch).save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            fingerprint = write_meta(tmp, config=config.to_dict(), dtype=shape.dtype, public=public, docs=docs)
    accel.finish(out, work, device)
    return AnchorResult(path=out, fingerprint=fingerprint, num_params=num_params, train=stats)
