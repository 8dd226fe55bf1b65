"""Commands: merge, add, remove, extract, adopt, import-expert, inspect — thin wrappers over the checkpoint verbs of `flexmoe.api`."""

from __future__ import annotations

from pathlib import Path

import click

from flexmoe import api
from flexmoe.cli import main
from flexmoe.cli import options as o
from flexmoe.config import (SHARD_SIZE, AddConfig, AdoptConfig, ExtractConfig, ImportExpertConfig, MergeConfig,
                            RemoveConfig)
from flexmoe.errors import ConfigError

_path = o.PATH
_shard_flag = click.option("--shard-size", default=SHARD_SIZE, show_default=True, help="Largest output shard.")


def _report(result, as_json: bool) -> None:
    text = (f"wrote {result.out}: experts {', '.join(result.experts)} (E={len(result.experts)}), "
            f"top-k {result.top_k}, {len(result.shards)} shard(s), {result.total_bytes / 1e6:.1f} MB "
            f"in {result.seconds:.1f}s")
    o.emit(result, as_json, "\n".join([text, *result.notes]))


def _target(merged: Path, out: Path | None, in_place: bool) -> tuple[Path, bool]:
    """--out or --in-place (exactly one); in place = atomic swap of the input folder."""
    if in_place == (out is not None):
        raise ConfigError("give exactly one of --out DIR or --in-place")
    return (merged, True) if in_place else (out, False)


@main.command()
@click.option("--anchor", required=True, type=_path, help="Anchor directory (dense OLMo-2 + flexmoe_anchor.json).")
@click.option("--expert", "experts", multiple=True, required=True, type=_path, help="Expert package (repeatable).")
@click.option("--out", required=True, type=_path, help="Output folder (created atomically).")
@click.option("--top-k", type=int, default=None, help="Experts per token [default: min(4, E)].")
@click.option("--verify", is_flag=True, help="Recompute the anchor fingerprint from its tensors first.")
@_shard_flag
@o.overwrite
@o.quiet
@o.as_json
def merge(anchor, experts, out, top_k, verify, shard_size, overwrite, quiet, as_json):
    """Merge an anchor and expert packages into one transformers FlexOlmo checkpoint.

    Expert 0 is the anchor's FFN; the experts follow in the order given. Every package must have been
    trained on this anchor (its fingerprint is checked).

    \b
    Example:
      flexmoe merge --anchor runs/anchor --expert runs/code --expert runs/news --out runs/merged
      flexmoe merge --anchor runs/anchor --expert runs/code --out runs/m --top-k 2 --shard-size 2GB
    """
    cfg = MergeConfig(anchor, list(experts), top_k=top_k, shard_size=shard_size, verify_fingerprint=verify)
    _report(api.merge(cfg, out, overwrite=overwrite, progress=not quiet), as_json)


@main.command()
@click.argument("merged", type=_path)
@click.option("--expert", required=True, type=_path, help="Expert package to append.")
@click.option("--out", type=_path, help="Output folder.")
@click.option("--in-place", is_flag=True, help="Replace MERGED (built beside it, swapped in at the end).")
@click.option("--top-k", type=int, default=None, help="New top-k [default: keep the merge's setting].")
@click.option("--verify", is_flag=True, help="Recompute MERGED's anchor fingerprint from its tensors first.")
@_shard_flag
@o.overwrite
@o.quiet
@o.as_json
def add(merged, expert, out, in_place, top_k, verify, shard_size, overwrite, quiet, as_json):
    """Add an expert package to a merged checkpoint (no anchor needed).

    \b
    Example:
      flexmoe add runs/merged --expert runs/law --out runs/merged-law
      flexmoe add runs/merged --expert runs/law --in-place
    """
    out, swap = _target(merged, out, in_place)
    cfg = AddConfig(merged, expert, top_k=top_k, shard_size=shard_size, verify_fingerprint=verify)
    _report(api.add(cfg, out, overwrite=overwrite or swap, progress=not quiet), as_json)


@main.command()
@click.argument("merged", type=_path)
@click.option("--expert", "name", required=True, help="Name of the expert to remove.")
@click.option("--out", type=_path, help="Output folder.")
@click.option("--in-place", is_flag=True, help="Replace MERGED (built beside it, swapped in at the end).")
@_shard_flag
@o.overwrite
@o.quiet
@o.as_json
def remove(merged, name, out, in_place, shard_size, overwrite, quiet, as_json):
    """Remove an expert (its FFN, router row and bias): the owner's opt-out. Top-k becomes min(k, E-1).

    \b
    Example:
      flexmoe remove runs/merged --expert news --out runs/merged-no-news
      flexmoe remove runs/merged --expert news --in-place
    """
    out, swap = _target(merged, out, in_place)
    cfg = RemoveConfig(merged, name, shard_size=shard_size)
    _report(api.remove(cfg, out, overwrite=overwrite or swap, progress=not quiet), as_json)


@main.command()
@click.argument("merged", type=_path)
@click.option("--expert", "name", required=True, help="Name of the expert to extract.")
@click.option("--out", required=True, type=_path, help="Output package folder.")
@o.overwrite
@o.quiet
@o.as_json
def extract(merged, name, out, overwrite, quiet, as_json):
    """Write one expert of a merged checkpoint back out as an expert package (bit-exact).

    \b
    Example:
      flexmoe extract runs/merged --expert code --out runs/code-again
    """
    res = api.extract(ExtractConfig(merged, name), out, overwrite=overwrite, progress=not quiet)
    o.emit(res, as_json, f"wrote expert package {res.out} ({res.name}, {res.num_layers} layers, "
                         f"{res.total_bytes / 1e6:.1f} MB)")


@main.command()
@click.argument("model", type=_path)
@click.option("--names", required=True, help="One name per expert in router order, 'public' first (comma-separated).")
@click.option("--out", required=True, type=_path, help="Output merged folder (created atomically).")
@_shard_flag
@o.overwrite
@o.quiet
@o.as_json
def adopt(model, names, out, shard_size, overwrite, quiet, as_json):
    """Take over an existing FlexOlmoForCausalLM folder as a flexmoe merged checkpoint.

    The tensors are copied byte for byte; flexmoe.json names the experts, the anchor fingerprint is
    computed from the model's anchor view (shared tensors + expert 0), the expert biases are 0 (the
    source has none), top-k comes from config.json. Afterwards remove / add / extract / inspect /
    verify / eval / generate work on it. The expert order of a released model is not recorded in
    it: check its model card before naming the experts.

    \b
    Example:
      flexmoe adopt FlexOlmo-7x7B-1T --names public,math,news,pes2o,code,creative,reddit --out runs/7x7b
      flexmoe remove runs/7x7b --expert news --out runs/7x7b-no-news
    """
    cfg = AdoptConfig(model, [n.strip() for n in names.split(",")], shard_size=shard_size)
    _report(api.adopt(cfg, out, overwrite=overwrite, progress=not quiet), as_json)


@main.command("import-expert")
@click.argument("model", type=_path)
@click.option("--anchor", required=True, type=_path, help="Anchor the model was built on (its public expert).")
@click.option("--name", required=True, help="Name of the expert.")
@click.option("--out", required=True, type=_path, help="Output package folder.")
@o.overwrite
@o.quiet
@o.as_json
def import_expert(model, anchor, name, out, overwrite, quiet, as_json):
    """Turn a 2-expert FlexOlmo model (public + one domain) into an expert package.

    experts.1 becomes the owner FFN, router row 1 its router row, the bias 0 ("none in source");
    the card records the source folder and every source file's sha256. Refused unless the shared
    tensors, experts.0 and router row 0 equal the anchor's, in the same dtype.

    \b
    Example:
      flexmoe init-anchor --from-moe Flex-math-2x7B-1T --out runs/anchor
      flexmoe import-expert Flex-math-2x7B-1T --anchor runs/anchor --name math --out runs/math
    """
    res = api.import_expert(ImportExpertConfig(model, anchor, name), out, overwrite=overwrite, progress=not quiet)
    o.emit(res, as_json, f"wrote expert package {res.out} ({res.name}, {res.num_layers} layers, "
                         f"{res.total_bytes / 1e6:.1f} MB), anchor {res.anchor_fingerprint[:23]}...")


@main.command()
@click.argument("path", type=_path)
@click.option("--verify", is_flag=True, help="Recompute the anchor fingerprint from the tensors.")
@o.as_json
def inspect(path, verify, as_json):
    """Show a merged checkpoint, anchor or expert package: experts, sizes, fingerprint, top-k, shards.

    \b
    Example:
      flexmoe inspect runs/merged
      flexmoe inspect runs/merged --json --verify
    """
    res = api.inspect(path, verify=verify)
    if as_json:
        o.emit(res, True, "")
        return
    click.echo(f"{res.kind} {res.path}: {res.num_layers} layers, hidden {res.hidden_size}, FFN {res.intermediate_size}, "
               f"{res.dtype}, {res.total_bytes / 1e6:.1f} MB")
    fp = {None: "", True: " (verified)", False: " (MISMATCH: tensors do not match)"}[res.fingerprint_verified]
    click.echo(f"anchor fingerprint: {res.anchor_fingerprint}{fp}")
    if res.num_experts is not None:
        click.echo(f"experts: {res.num_experts}, top-k: {res.top_k}")
    for e in res.experts:
        bias = "" if e.mean_bias is None else f"  mean min(b,0) {e.mean_bias:+.3f}"
        click.echo(f"  [{e.index}] {e.name:<20} {e.bytes / 1e6:9.1f} MB  router {e.router_source}{bias}")
    for s in res.shards:
        click.echo(f"  {s.name}  {s.bytes / 1e6:.1f} MB  {s.tensors} tensors")


@main.command("verify")
@click.argument("path", type=_path)
@o.as_json
def verify(path, as_json):
    """Check a merged checkpoint, anchor or expert package completely; exit 0 only if all holds.

    Every file's size and sha256 against the manifest in the folder's flexmoe JSON, the folder's
    structure, and its fingerprints: an anchor's tensors, a merged checkpoint's shared tensors and
    every expert's card against the recorded anchor. A folder written before manifests existed is
    checked as far as it can be, and the report says what was not.

    \b
    Example:
      flexmoe verify runs/merged
      flexmoe verify runs/experts/code --json
    """
    res = api.verify(path)
    o.emit(res, as_json, res.report())
    if not res.ok:
        raise click.exceptions.Exit(1)
