"""Commands: train-anchor, init-anchor, embed-domain, train-expert."""

from __future__ import annotations

import dataclasses

import click

from flexmoe import api, presets
from flexmoe.cli import main
from flexmoe.cli import options as o
from flexmoe.config import EmbedConfig, ExpertSpec, InitAnchorConfig, TrainAnchorConfig
from flexmoe.errors import ConfigError


@main.command("train-anchor")
@click.option("--data", "data", type=o.PATH, multiple=True, required=True, help="Public text (repeatable).")
@click.option("--embedder", type=o.PATH, help="Local sentence-transformers folder (router rows).")
@click.option("--public-row", type=o.PATH, help="Instead of --embedder: embed-domain's row file of the public data.")
@click.option("--out", type=o.PATH, required=True, help="Anchor directory to create.")
@click.option("--preset", default="tiny", show_default=True, help="Model size: tiny, small or base.")
@click.option("--tokenizer", type=o.PATH, help="Tokenizer folder to use instead of training a byte-level BPE.")
@click.option("--max-steps", type=int, help="Optimizer steps (default: the preset's).")
@click.option("--seq-len", type=int, help="Tokens per sequence (default: the preset's).")
@click.option("--batch-size", type=int, help="Sequences per process and step (default: the preset's).")
@click.option("--lr", type=float, help="Peak learning rate (default: the preset's).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (default: the preset's).")
@click.option("--checkpoint-every", type=int, help="Steps between resume checkpoints (0: none).")
@click.option("--num-docs", type=int, default=1000, show_default=True, help="Public documents embedded for r_pub.")
@click.option("--seed", type=int, default=0, show_default=True)
@o.resume
@o.device
@o.overwrite
def train_anchor(data, embedder, public_row, out, preset, tokenizer, max_steps, seq_len, batch_size, lr, bf16,
                 checkpoint_every, num_docs, seed, resume, device, overwrite):
    """Train a dense OLMo-2 anchor on public text.

    Saves a standard Hugging Face directory (config, safetensors, tokenizer) plus the public router
    row r_pub and the anchor fingerprint that every expert is checked against. Where the embedder
    cannot go (a GPU box), embed the public data elsewhere and pass --public-row instead.

    \b
    Example:
      flexmoe train-anchor --data fixtures/public/train.jsonl --embedder runs/demo/embedder \\
          --out runs/anchor --preset tiny --max-steps 200
    """
    flags = {"max_steps": max_steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "bf16": bf16,
             "checkpoint_every": checkpoint_every}
    train = dataclasses.replace(presets.get(preset).train, **{k: v for k, v in flags.items() if v is not None},
                                seed=seed, device=device)
    cfg = TrainAnchorConfig(data=list(data), embedder=embedder, public_row=public_row, preset=preset,
                            tokenizer=tokenizer, num_docs=num_docs, seed=seed, train=train)
    r = api.train_anchor(cfg, out, overwrite=overwrite, resume=resume)
    o.say(f"anchor written to {r.path} ({r.num_params:,} parameters, {r.train.steps} steps, loss "
          f"{o.loss(r.train.final_loss)}, {r.train.tokens_per_s:,.0f} tok/s)\nfingerprint {r.fingerprint}")


@main.command("init-anchor")
@click.option("--model", type=o.PATH, help="Existing Olmo2ForCausalLM directory (safetensors).")
@click.option("--from-moe", type=o.PATH,
              help="Instead of --model: a FlexOlmo folder (e.g. a public 2x7B); the anchor is its shared layers + "
                   "expert 0, r_pub its router row 0.")
@click.option("--public-data", type=o.PATH, multiple=True, help="Public text for r_pub (repeatable; with --model).")
@click.option("--embedder", type=o.PATH, help="Local sentence-transformers folder (router rows).")
@click.option("--public-row", type=o.PATH, help="Instead of --embedder: embed-domain's row file of the public data.")
@click.option("--out", type=o.PATH, required=True, help="Anchor directory to create (a copy of --model).")
@click.option("--tokenizer", type=o.PATH, help="Tokenizer folder, if --model has none.")
@click.option("--num-docs", type=int, default=1000, show_default=True, help="Public documents embedded for r_pub.")
@click.option("--seed", type=int, default=0, show_default=True)
@o.device
@o.overwrite
def init_anchor(model, from_moe, public_data, embedder, public_row, out, tokenizer, num_docs, seed, device, overwrite):
    """Adopt an existing OLMo-2 model as an anchor (copy + r_pub + fingerprint), or cut one out of a FlexOlmo model.

    \b
    Example:
      flexmoe init-anchor --model path/to/OLMo-2-1B --public-data data/public/train.jsonl \\
          --embedder path/to/all-MiniLM-L6-v2 --out runs/anchor-1b
      flexmoe init-anchor --from-moe path/to/Flex-math-2x7B-1T --out runs/anchor-7b
    """
    cfg = InitAnchorConfig(model=model, from_moe=from_moe, public_data=list(public_data), embedder=embedder,
                           public_row=public_row, tokenizer=tokenizer, num_docs=num_docs, seed=seed, device=device)
    r = api.init_anchor(cfg, out, overwrite=overwrite)
    o.say(f"anchor written to {r.path} ({r.num_params:,} parameters)\nfingerprint {r.fingerprint}")


@main.command("embed-domain")
@click.option("--data", "data", type=o.PATH, multiple=True, required=True, help="The domain's text (repeatable).")
@click.option("--embedder", type=o.PATH, required=True, help="Local sentence-transformers folder (the anchor's).")
@click.option("--out", type=o.PATH, required=True, help="Router-row file to write (.safetensors).")
@click.option("--num-docs", type=int, default=1000, show_default=True, help="Documents sampled.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@o.device
@o.overwrite
def embed_domain(data, embedder, out, num_docs, seed, batch_size, device, overwrite):
    """Mean sentence embedding of a domain's documents: a router row for train-expert.

    \b
    Example:
      flexmoe embed-domain --data data/code/train.jsonl --embedder runs/demo/embedder \\
          --out runs/code.row.safetensors --num-docs 1000
    """
    cfg = EmbedConfig(data=list(data), embedder=embedder, num_docs=num_docs, seed=seed, batch_size=batch_size,
                      device=device)
    r = api.embed_domain(cfg, out, overwrite=overwrite)
    o.say(f"router row ({r.dim}-d, {r.num_docs} documents, {r.num_chunks} chunks) written to {r.path}")


@main.command("train-expert")
@click.option("--config", "config", type=o.PATH, help="Expert spec (experts/<name>.yaml); flags override it.")
@click.option("--anchor", type=o.PATH, help="Anchor directory.")
@click.option("--data", "data", type=o.PATH, multiple=True, help="The owner's text (repeatable).")
@click.option("--name", help="Expert name: letters, digits, '_', '.', '-'.")
@click.option("--out", type=o.PATH, required=True, help="Expert package directory to create.")
@click.option("--embedder", type=o.PATH, help="The anchor's sentence-transformers folder (router source embedding).")
@click.option("--router-row", type=o.PATH, help="Router-row file from embed-domain (instead of --embedder).")
@click.option("--public-data", type=o.PATH, multiple=True,
              help="Public text mixed into every batch (repeatable; the default router training needs it: the "
                   "anchor's public corpus).")
@click.option("--paper-router", is_flag=True,
              help="Train the router as the paper does: owner text only, bias min(b, 0) with its plain gradient.")
@click.option("--max-steps", type=int)
@click.option("--batch-size", type=int, help="Sequences per process and micro-step.")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast.")
@click.option("--checkpoint-every", type=int, help="Steps between resume checkpoints (0: none).")
@click.option("--set", "dotted", multiple=True, metavar="KEY=VALUE",
              help="Override any spec field, e.g. --set train.lr=1e-3 --set router.source=random (repeatable).")
@o.resume
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto, cpu or cuda (default: the spec's).")
@o.overwrite
def train_expert(config, anchor, data, name, out, embedder, router_row, public_data, paper_router, max_steps,
                 batch_size, bf16, checkpoint_every, dotted, resume, device, overwrite):
    """Train one data owner's expert against a frozen anchor; writes an expert package.

    Only the owner FFN, its router row and expert bias are trained; the package holds just those.
    By default a quarter of every batch is public text (--public-data): the router row then learns
    where the public expert is better, and the bias is kept <= 0 by projection (docs/router.md).
    --paper-router trains on owner text alone, as the paper does. Every other setting of the spec
    (experts/*.yaml, schema `flexmoe.config.ExpertSpec`) is a --set KEY=VALUE: train.lr, train.seq_len,
    train.grad_accum, train.seed, train_top_k, mode (dense: the no-coordination baseline),
    router.source, router_training.public_ratio, ...

    \b
    Examples:
      flexmoe train-expert --config experts/demo/code.yaml --anchor runs/demo/anchor --out runs/demo/code
      flexmoe train-expert --anchor runs/anchor --data my_docs/ --name law --out runs/law \\
          --public-data data/public/train.jsonl --router-row runs/law.row.safetensors --max-steps 500 --bf16
    """
    if paper_router and any(d.startswith("router_training.public_ratio") for d in dotted):
        raise ConfigError("--paper-router trains on owner text only: leave out router_training.public_ratio")
    paper = {"router_training.public_ratio": 0.0, "router_training.bias": "clamp"} if paper_router else {}
    spec = ExpertSpec.load(config, {
        "router_training.public_data": list(public_data) or None, "name": name, "anchor": anchor,
        "data": list(data) or None, "embedder": embedder, "router.row_file": router_row,
        "router.source": "row-file" if router_row is not None else None,
        "train.max_steps": max_steps, "train.batch_size": batch_size, "train.bf16": bf16,
        "train.checkpoint_every": checkpoint_every, "train.device": device, **paper}, dotted)
    r = api.train_expert(spec, out, overwrite=overwrite, resume=resume)
    o.say(f"expert {r.name!r} written to {r.path} ({r.package_bytes / 2**20:.1f} MiB, {r.train.steps} steps, "
          f"loss {o.loss(r.train.final_loss)}, {r.train.tokens_per_s:,.0f} tok/s)")
