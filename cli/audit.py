"""Command: audit-extraction (owned by the privacy audit, flexmoe/eval/extraction.py)."""

from __future__ import annotations

import click

from flexmoe.cli import main
from flexmoe.cli import options as o


@main.command(name="audit-extraction")
@click.argument("model", type=o.PATH)
@click.option("--data", "data", multiple=True, required=True, type=o.PATH, metavar="PATH",
              help="The owner's training text (.jsonl with 'text', .txt, or a directory). Repeatable.")
@click.option("--prefixes", default=1000, show_default=True, help="Documents to sample, one prefix each.")
@click.option("--prefix-len", default=32, show_default=True, help="Tokens of each prefix.")
@click.option("--gen-len", default=64, show_default=True, help="Tokens to generate and compare.")
@click.option("--seed", default=0, show_default=True, help="Seed of the documents and offsets sampled.")
@click.option("--batch-size", default=64, show_default=True, help="Prefixes decoded at once.")
@o.device
@o.dtype
@o.no_bias
@o.no_fast
@o.deterministic
@click.option("--json-out", type=o.PATH, metavar="FILE",
              help="Write the report here (rates, settings, document index and offset per sample; no text).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json-out file.")
@o.quiet
@o.as_json
def audit_extraction_cmd(model, data, prefixes, prefix_len, gen_len, seed, batch_size, device, dtype, no_bias,
                         no_fast, deterministic, json_out, overwrite, quiet, as_json):
    """Privacy audit: how much of an owner's training text MODEL reproduces.

    MODEL is a dense anchor, a 2-expert model or a merged checkpoint. From --prefixes documents of --data (drawn
    with --seed; those shorter than --prefix-len + --gen-len tokens are skipped), one --prefix-len-token prefix
    each is greedily continued by --gen-len tokens and compared with the document's true next tokens. Reported,
    each with a 95% Wilson interval: the exact-match rate, the share whose longest common prefix is >= 50% of
    --gen-len, the mean LCP fraction, and the share with normalised token Levenshtein similarity >= 0.9 (the
    paper's criterion, here on greedy continuations). docs/privacy.md says more.

    \b
    Example:
      flexmoe audit-extraction runs/merged --data data/math/train.jsonl --json-out results/extract-merged.json
      flexmoe audit-extraction runs/anchor --data data/math/train.jsonl --prefixes 200 --seed 1
    """
    from flexmoe import api
    from flexmoe.config import ExtractionConfig

    cfg = ExtractionConfig(model=model, data=list(data), prefixes=prefixes, prefix_len=prefix_len, gen_len=gen_len,
                           seed=seed, batch_size=batch_size, device=device, dtype=dtype, bias=not no_bias,
                           fast=not no_fast, deterministic=deterministic)
    r = api.audit_extraction(cfg, json_out, overwrite=overwrite, progress=not quiet)
    if as_json:
        o.emit(r, True, "")
        return
    click.echo(f"{r.model}: {r.n} samples (one per document) of {r.documents} documents, {r.skipped_short} "
               f"shorter than {prefix_len + gen_len} tokens skipped; {prefix_len}-token prefixes, {gen_len} tokens "
               f"generated ({'fast path' if r.fast else 'generate'}, {r.device}), seed {seed}")
    click.echo(f"{'measure':<36} {'rate':>7}   95% Wilson interval")
    for label, rate in (("exact match", r.exact), ("LCP >= 50% of gen-len", r.half), ("mean LCP fraction", r.lcp),
                        ("similarity >= 0.9 (paper criterion)", r.paper)):
        click.echo(f"{label:<36} {rate.rate:>7.4f}   [{rate.low:.4f}, {rate.high:.4f}]")
    if r.json_path:
        click.echo(f"wrote {r.json_path}")
