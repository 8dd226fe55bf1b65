"""Command: generate (owned by the inference work, flexmoe/infer)."""

from __future__ import annotations

import click

from flexmoe.cli import main
from flexmoe.cli import options as o


@main.command(name="generate")
@click.argument("model", type=o.PATH)
@click.option("--prompt", "prompts", multiple=True, required=True, metavar="TEXT",
              help="A prompt. Repeatable (one batch).")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate per prompt at most.")
@o.device
@o.dtype
@o.no_fast
@o.no_bias
@o.top_k
@o.deterministic
@o.as_json
def generate_cmd(model, prompts, max_new_tokens, device, dtype, no_fast, no_bias, top_k, deterministic, as_json):
    """Greedy continuation of each --prompt by MODEL (a merged checkpoint, a 2-expert model or an anchor).

    The fast path swaps in flexmoe's experts kernel and decodes over a static KV cache, with each decode step
    (and a small prompt's prefill) captured in a CUDA graph on GPU; a FlexOlmo model in bf16 on CUDA decodes
    through flexmoe's fused decode layer (ten kernels a layer). The checkpoint on disk is untouched and still
    loads in stock transformers. A batch of many prompts may decode slightly differently from one run to the
    next on GPU (the expert kernels' tiles are autotuned in each process, and the prompt's cuDNN attention need
    not repeat its sums); --deterministic makes every run give the same tokens.

    \b
    Example:
      flexmoe generate runs/merged --prompt "def fibonacci(n):" --max-new-tokens 48
      flexmoe generate runs/merged --prompt "Four score" --prompt "import numpy" --no-fast
      flexmoe generate runs/merged --prompt "def add(a, b):" --prompt "SELECT" --deterministic
      flexmoe generate runs/merged --prompt "The court held" --top-k 1
    """
    from flexmoe import api
    from flexmoe.config import GenerateConfig

    cfg = GenerateConfig(model=model, prompts=list(prompts), max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                         fast=not no_fast, bias=not no_bias, deterministic=deterministic, top_k=top_k)
    result = api.generate(cfg)
    if as_json:
        o.emit(result, True, "")
        return
    for prompt, text in zip(result.prompts, result.texts):
        click.echo(f"{prompt}{text}")
        click.echo("")
    path = ("fast path" if result.fast else "stock generate") + (", deterministic" if result.deterministic else "")
    routed = "" if result.top_k is None else f", top-{result.top_k}"
    click.echo(f"{sum(result.new_tokens)} tokens in {result.prefill_s + result.decode_s:.2f} s "
               f"({result.tok_s:.1f} tok/s, {path}, {result.device}{routed})")
