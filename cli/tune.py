"""Commands: tune-router, select-proxy (router tuning, FLEXOLMO.md §4)."""

from __future__ import annotations

import dataclasses

import click

from flexmoe import api
from flexmoe.cli import main
from flexmoe.cli import options as o
from flexmoe.config import SHARD_SIZE, ProxyConfig, RouterTuneConfig, router_tuning_train

_PATH = o.PATH


@main.command("tune-router")
@click.argument("merged", type=_PATH)
@click.option("--data", "data", type=_PATH, multiple=True, required=True,
              help="Public proxy text, e.g. select-proxy's outputs (repeatable).")
@click.option("--out", type=_PATH, required=True, help="Tuned merged checkpoint to create.")
@click.option("--max-steps", type=int, default=router_tuning_train().max_steps, show_default=True)
@click.option("--lr", type=float, default=router_tuning_train().lr, show_default=True)
@click.option("--warmup-steps", type=int, help="Default: min(100, max_steps // 10).")
@click.option("--batch-size", type=int, default=router_tuning_train().batch_size, show_default=True,
              help="Sequences per process and step.")
@click.option("--seq-len", type=int, help="Tokens per sequence (default: the model's context, at most 2048).")
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast.")
@click.option("--seed", type=int, default=0, show_default=True, help="Data-order seed.")
@click.option("--checkpoint-every", type=int, default=0, help="Steps between resume checkpoints (0: none).")
@o.resume
@click.option("--shard-size", default=SHARD_SIZE, show_default=True, help="Largest output shard.")
@o.device
@o.overwrite
def tune_router(merged, data, out, max_steps, lr, warmup_steps, batch_size, seq_len, bf16, seed, checkpoint_every,
                resume, shard_size, device, overwrite):
    """Router tuning: train only the owners' router rows and biases of MERGED on public proxy data.

    Experts, shared layers and the public row stay frozen (weight decay 0.1, router z-loss 1e-3).
    The output is a normal merged checkpoint: add, remove and extract work on it.

    \b
    Example:
      flexmoe select-proxy --public data/public.jsonl --domain data/code.jsonl \\
          --embedder runs/embedder --out runs/proxy/code.jsonl
      flexmoe tune-router runs/merged --data runs/proxy/code.jsonl --data runs/proxy/news.jsonl \\
          --out runs/merged-rt --max-steps 200
    """
    train = dataclasses.replace(router_tuning_train(), max_steps=max_steps, lr=lr, warmup_steps=warmup_steps,
                                batch_size=batch_size, seq_len=seq_len, bf16=bf16, seed=seed,
                                checkpoint_every=checkpoint_every, device=device)
    cfg = RouterTuneConfig(merged=merged, data=list(data), train=train, shard_size=shard_size)
    r = api.tune_router(cfg, out, overwrite=overwrite, resume=resume)
    loss = o.loss(r.train.final_loss)
    if r.first_loss is not None:
        loss = f"{r.first_loss:.3f} -> {loss}"
    o.say(f"tuned router rows of {', '.join(r.experts)} written to {r.path} ({r.train.steps} steps, loss {loss}, "
          f"{r.train.tokens_per_s:,.0f} tok/s)")


@main.command("select-proxy")
@click.option("--public", "public", type=_PATH, multiple=True, required=True, help="Public text (repeatable).")
@click.option("--domain", "domain", type=_PATH, multiple=True, required=True,
              help="The domain's text; only used to train the classifier (repeatable).")
@click.option("--embedder", type=_PATH, required=True, help="Local sentence-transformers folder.")
@click.option("--out", type=_PATH, required=True, help="Output .jsonl (text + classifier score).")
@click.option("--fraction", type=float, default=0.1, show_default=True, help="Share of the public documents kept.")
@click.option("--num-domain-docs", type=int, default=1000, show_default=True,
              help="Domain documents (and as many public ones) the classifier learns from.")
@click.option("--max-public-docs", type=int, help="Score only a seeded sample of this many public documents.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@o.device
@o.overwrite
def select_proxy(public, domain, embedder, out, fraction, num_domain_docs, max_public_docs, seed, batch_size, device,
                 overwrite):
    """Pick the public documents that look most like a domain: proxy data for tune-router.

    A logistic regression over sentence embeddings learns domain vs public; the public documents it
    scores highest are written out. Deterministic for the same inputs and seed.

    \b
    Example:
      flexmoe select-proxy --public data/public/train.jsonl --domain data/code/train.jsonl \\
          --embedder runs/demo/embedder --out runs/proxy/code.jsonl --fraction 0.1
    """
    cfg = ProxyConfig(public=list(public), domain=list(domain), embedder=embedder, fraction=fraction,
                      num_domain_docs=num_domain_docs, max_public_docs=max_public_docs, seed=seed,
                      batch_size=batch_size, device=device)
    r = api.select_proxy(cfg, out, overwrite=overwrite)
    click.echo(f"{r.selected} of {r.public_docs} public documents written to {r.path} (classifier accuracy "
               f"{r.train_accuracy:.2f} on {r.domain_docs} domain documents, lowest score kept {r.min_score:.3f})")
