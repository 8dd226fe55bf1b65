"""Commands: train-anchor, init-anchor, embed-domain, train-expert (owned by the training work)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from flexmoe import api
from flexmoe.cli import main
from flexmoe.config import (Device, EmbedConfig, ExpertMode, InitAnchorConfig, RouterSource, TrainAnchorConfig,
                            load_expert_spec)

_PATH = click.Path(path_type=Path)  # existence is checked by the library, which names what is wrong
_DEVICE = click.option("--device", type=click.Choice([d.value for d in Device]), default="auto", show_default=True,
                       help="Where to run; under `accelerate launch` each process takes its own GPU.")
_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one report, also under torchrun / accelerate launch
        click.echo(text)


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@main.command("train-anchor")
@click.option("--data", "data", type=_PATH, multiple=True, required=True, help="Public text (repeatable).")
@click.option("--embedder", type=_PATH, help="Local sentence-transformers folder (router rows).")
@click.option("--public-row", type=_PATH, help="Instead of --embedder: embed-domain's row file of the public data.")
@click.option("--out", type=_PATH, required=True, help="Anchor directory to create.")
@click.option("--preset", default="tiny", show_default=True, help="Model size: tiny, small or base.")
@click.option("--tokenizer", type=_PATH, help="Tokenizer folder to use instead of training a byte-level BPE.")
@click.option("--max-steps", type=int, help="Optimizer steps (default: the preset's).")
@click.option("--seq-len", type=int, help="Tokens per sequence (default: the preset's).")
@click.option("--batch-size", type=int, help="Sequences per process and step (default: the preset's).")
@click.option("--lr", type=float, help="Peak learning rate (default: the preset's).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (default: the preset's).")
@click.option("--checkpoint-every", type=int, help="Steps between resume checkpoints (0: none).")
@click.option("--num-docs", type=int, default=1000, show_default=True, help="Public documents embedded for r_pub.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@_DEVICE
@_OVERWRITE
def train_anchor(data, embedder, public_row, out, preset, tokenizer, max_steps, seq_len, batch_size, lr, bf16, checkpoint_every,
                 num_docs, seed, resume, device, overwrite):
    """Train a dense OLMo-2 anchor on public text.

    Saves a standard Hugging Face directory (config, safetensors, tokenizer) plus the public router
    row r_pub and the anchor fingerprint that every expert is checked against. Where the embedder
    cannot go (a GPU box), embed the public data elsewhere and pass --public-row instead.

    \b
    Example:
      flexmoe train-anchor --data fixtures/public/train.jsonl --embedder runs/demo/embedder \\
          --out runs/anchor --preset tiny --max-steps 200
    """
    cfg = TrainAnchorConfig(data=list(data), embedder=embedder, public_row=public_row, preset=preset, tokenizer=tokenizer, num_docs=num_docs,
                            seed=seed, max_steps=max_steps, seq_len=seq_len, batch_size=batch_size, lr=lr, bf16=bf16,
                            checkpoint_every=checkpoint_every, device=Device(device))
    r = api.train_anchor(cfg, out, overwrite, resume=resume)
    _say(f"anchor written to {r.path} ({r.num_params:,} parameters, {r.steps} steps, loss {_loss(r.final_loss)}, "
         f"{r.tokens_per_s:,.0f} tok/s)\nfingerprint {r.fingerprint}")


@main.command("init-anchor")
@click.option("--model", type=_PATH, required=True, help="Existing Olmo2ForCausalLM directory (safetensors).")
@click.option("--public-data", type=_PATH, multiple=True, required=True, help="Public text for r_pub (repeatable).")
@click.option("--embedder", type=_PATH, help="Local sentence-transformers folder (router rows).")
@click.option("--public-row", type=_PATH, help="Instead of --embedder: embed-domain's row file of the public data.")
@click.option("--out", type=_PATH, required=True, help="Anchor directory to create (a copy of --model).")
@click.option("--tokenizer", type=_PATH, help="Tokenizer folder, if --model has none.")
@click.option("--num-docs", type=int, default=1000, show_default=True, help="Public documents embedded for r_pub.")
@click.option("--seed", type=int, default=0, show_default=True)
@_DEVICE
@_OVERWRITE
def init_anchor(model, public_data, embedder, public_row, out, tokenizer, num_docs, seed, device, overwrite):
    """Adopt an existing OLMo-2 model as an anchor (copy + r_pub + fingerprint).

    \b
    Example:
      flexmoe init-anchor --model path/to/OLMo-2-1B --public-data data/public/train.jsonl \\
          --embedder path/to/all-MiniLM-L6-v2 --out runs/anchor-1b
    """
    cfg = InitAnchorConfig(model=model, public_data=list(public_data), embedder=embedder, public_row=public_row,
                           tokenizer=tokenizer,
                           num_docs=num_docs, seed=seed, device=Device(device))
    r = api.init_anchor(cfg, out, overwrite)
    _say(f"anchor written to {r.path} ({r.num_params:,} parameters)\nfingerprint {r.fingerprint}")


@main.command("embed-domain")
@click.option("--data", "data", type=_PATH, multiple=True, required=True, help="The domain's text (repeatable).")
@click.option("--embedder", type=_PATH, required=True, help="Local sentence-transformers folder (the anchor's).")
@click.option("--out", type=_PATH, required=True, help="Router-row file to write (.safetensors).")
@click.option("--num-docs", type=int, default=1000, show_default=True, help="Documents sampled.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@_DEVICE
@_OVERWRITE
def embed_domain(data, embedder, out, num_docs, seed, batch_size, device, overwrite):
    """Mean sentence embedding of a domain's documents: a router row for train-expert.

    \b
    Example:
      flexmoe embed-domain --data data/code/train.jsonl --embedder runs/demo/embedder \\
          --out runs/code.row.safetensors --num-docs 1000
    """
    cfg = EmbedConfig(data=list(data), embedder=embedder, num_docs=num_docs, seed=seed, batch_size=batch_size,
                      device=Device(device))
    r = api.embed_domain(cfg, out, overwrite)
    _say(f"router row ({r.dim}-d, {r.num_docs} documents, {r.num_chunks} chunks) written to {r.path}")


@main.command("train-expert")
@click.option("--config", "config", type=_PATH, help="Expert spec (experts/<name>.yaml); flags override it.")
@click.option("--anchor", type=_PATH, help="Anchor directory.")
@click.option("--data", "data", type=_PATH, multiple=True, help="The owner's text (repeatable).")
@click.option("--name", help="Expert name: letters, digits, '_', '.', '-'.")
@click.option("--out", type=_PATH, required=True, help="Expert package directory to create.")
@click.option("--embedder", type=_PATH, help="The anchor's sentence-transformers folder (router source embedding).")
@click.option("--router-row", type=_PATH, help="Router-row file from embed-domain (router source row-file).")
@click.option("--router-source", type=click.Choice([s.value for s in RouterSource]),
              help="How r_i starts (default: the spec's, else embedding).")
@click.option("--max-steps", type=int)
@click.option("--lr", type=float)
@click.option("--batch-size", type=int, help="Sequences per process and micro-step.")
@click.option("--grad-accum", type=int, help="Micro-steps per optimizer step.")
@click.option("--seq-len", type=int)
@click.option("--public-data", type=_PATH, multiple=True,
              help="Public text mixed into every batch (repeatable; the default router training needs it: the "
                   "anchor's public corpus).")
@click.option("--public-ratio", type=float, help="Share of each batch's sequences taken from --public-data (0.25).")
@click.option("--paper-router", is_flag=True,
              help="Train the router as the paper does: owner text only, bias min(b, 0) with its plain gradient.")
@click.option("--train-top-k", type=click.IntRange(1, 2), help="Experts per token while training (1 or 2).")
@click.option("--mode", type=click.Choice([m.value for m in ExpertMode]),
              help="flexolmo (default) or dense: the no-coordination baseline (whole anchor fine-tuned).")
@click.option("--set", "dotted", multiple=True, metavar="KEY=VALUE",
              help="Override any spec field, e.g. --set train.warmup_steps=10 (repeatable).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast.")
@click.option("--checkpoint-every", type=int, help="Steps between resume checkpoints (0: none).")
@click.option("--seed", type=int, help="Data-order seed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--device", type=click.Choice([d.value for d in Device]), help="auto, cpu or cuda.")
@_OVERWRITE
def train_expert(config, anchor, data, name, out, embedder, router_row, router_source, max_steps, lr, batch_size,
                 grad_accum, seq_len, public_data, public_ratio, paper_router, train_top_k, mode, dotted, bf16,
                 checkpoint_every, seed, resume, device, overwrite):
    """Train one data owner's expert against a frozen anchor; writes an expert package.

    Only the owner FFN, its router row and expert bias are trained; the package holds just those.
    By default a quarter of every batch is public text (--public-data): the router row then learns
    where the public expert is better, and the bias is kept <= 0 by projection (docs/router.md).
    --paper-router trains on owner text alone, as the paper does.

    \b
    Examples:
      flexmoe train-expert --config experts/demo/code.yaml --anchor runs/demo/anchor --out runs/demo/code
      flexmoe train-expert --anchor runs/anchor --data my_docs/ --name law --out runs/law \\
          --public-data data/public/train.jsonl --router-row runs/law.row.safetensors --max-steps 500 --bf16
    """
    if router_row is not None and router_source is None:
        router_source = RouterSource.ROW_FILE.value
    if paper_router and public_ratio:
        raise click.ClickException("--paper-router trains on owner text only: leave out --public-ratio")
    paper = {"router_training.public_ratio": 0.0, "router_training.bias": "clamp"} if paper_router else {}
    spec = load_expert_spec(config, {
        "router_training.public_data": list(public_data) or None, "router_training.public_ratio": public_ratio,
        "name": name, "anchor": anchor, "data": list(data) or None, "embedder": embedder,
        "router.source": router_source, "router.row_file": router_row, "train_top_k": train_top_k, "mode": mode,
        "train.max_steps": max_steps, "train.lr": lr, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
        "train.seq_len": seq_len, "train.bf16": bf16, "train.checkpoint_every": checkpoint_every,
        "train.seed": seed, "train.device": device, **paper}, list(dotted))
    r = api.train_expert(spec, out, overwrite, resume)
    _say(f"expert {r.name!r} written to {r.path} ({r.package_bytes / 2**20:.1f} MiB, {r.steps} steps, "
         f"loss {_loss(r.final_loss)}, {r.tokens_per_s:,.0f} tok/s)")
