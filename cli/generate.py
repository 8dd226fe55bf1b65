"""Command: generate (owned by the inference work, flexmoe/infer)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from flexmoe.cli import main


@main.command(name="generate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, metavar="TEXT",
              help="A prompt. Repeatable (one batch).")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate per prompt at most.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="auto: bfloat16 on CUDA, float32 on CPU.")
@click.option("--no-fast", is_flag=True, help="Stock transformers generate instead of flexmoe's fast path.")
@click.option("--no-bias", is_flag=True, help="Load a merged checkpoint as stock transformers does (no expert bias).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate_cmd(model, prompts, max_new_tokens, device, dtype, no_fast, no_bias, as_json):
    """Greedy continuation of each --prompt by MODEL (a merged checkpoint, a 2-expert model or an anchor).

    The fast path swaps in flexmoe's experts kernel and decodes over a static KV cache, with each decode step
    captured in a CUDA graph on GPU; the checkpoint on disk is untouched and still loads in stock transformers.

    \b
    Example:
      flexmoe generate runs/merged --prompt "def fibonacci(n):" --max-new-tokens 48
      flexmoe generate runs/merged --prompt "Four score" --prompt "import numpy" --no-fast
    """
    from flexmoe import api
    from flexmoe.infer import GenerateConfig

    cfg = GenerateConfig(model=model, prompts=list(prompts), max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                         fast=not no_fast, bias=not no_bias)
    result = api.generate(cfg)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    for prompt, text in zip(result.prompts, result.texts):
        click.echo(f"{prompt}{text}")
        click.echo("")
    path = "fast path" if result.fast else "stock generate"
    click.echo(f"{sum(result.new_tokens)} tokens in {result.prefill_s + result.decode_s:.2f} s "
               f"({result.tok_s:.1f} tok/s, {path}, {result.device})")
