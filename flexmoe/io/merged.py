"""The merged-checkpoint format (docs/FORMAT.md): a stock transformers `flex_olmo` folder plus flexmoe files.

`flexmoe.json` names the experts in router order and keeps each owner's card; the expert biases live in a sidecar
safetensors file that stock `from_pretrained` never reads. Everything here is derived from (config, meta, biases)
alone, so two checkpoints with the same experts get byte-identical metadata files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io.anchor import ANCHOR_META, ANCHOR_ROUTER
from flexmoe.io import hf_config, manifest
from flexmoe.io.jsonfile import dump_json, read_json  # noqa: F401  (re-exported for surgery)
from flexmoe.io.package import PUBLIC_NAME
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import TensorSpec
from flexmoe.io.writer import NO_SHARD_LIMIT, ShardWriter
from flexmoe.io.keys import FFN_PROJS, expert_key, router_bias_key, router_key

MERGED_META = "flexmoe.json"
BIAS_FILE = "flexmoe_router_bias.safetensors"
MERGED_FORMAT = "flexmoe-merged/1"
MERGED_REMAKE = "the merge / add / remove that wrote it"  # for damaged-file errors
# Paper: quality rises with active experts up to 4, then plateaus; the 7B reference runs top-4 of 8.
DEFAULT_TOP_K = 4
# Non-tensor files a model directory carries over unchanged (tokenizer + generation defaults).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                "chat_template.json")
ROUTER_TUNING = "router_tuning"  # per-owner list in flexmoe.json's expert entries, one record per tuning run


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...], listed: manifest.Listed | None = None) -> None:
    """Copy the files `names` that `src` has; the large ones of its manifest `listed` are hashed as they are copied
    (the small ones its reader hashed already)."""
    for n in names:
        if (src / n).is_file():
            want = listed.large(src / n) if listed is not None else None
            if want is None:
                shutil.copyfile(src / n, dst / n)
            else:
                manifest.copy_checked(src / n, dst / n, want, listed.remake)


def write_biases(out_dir: Path, biases: torch.Tensor) -> None:
    """biases: (L, E) float32 raw expert biases -> sidecar with one (E,) tensor per layer."""
    names = [router_bias_key(layer) for layer in range(biases.shape[0])]
    specs = [TensorSpec(n, "F32", (biases.shape[1],)) for n in names]
    with ShardWriter(out_dir, specs, max_shard_bytes=NO_SHARD_LIMIT, prefix=BIAS_FILE.removesuffix(".safetensors")) as w:
        for layer, n in enumerate(names):
            w.write(n, biases[layer].contiguous())
        w.finalize()


def moe_config(base: dict, num_experts: int, top_k: int) -> dict:
    """A dense (or MoE) config.json turned into its family's MoE one (Olmo2 / FlexOlmo -> FlexOlmo, Qwen3 /
    Qwen3-MoE -> Qwen3-MoE); every other key is kept as is."""
    return hf_config.family(base).moe_config(base, num_experts, top_k)


def merged_meta(fingerprint: str, top_k: int, requested: int | None, experts: list[dict]) -> dict:
    return {"format": MERGED_FORMAT, "anchor_fingerprint": fingerprint, "top_k": top_k,
            "top_k_requested": requested, "experts": experts}


def model_card(config: dict, meta: dict, biases: torch.Tensor) -> str:
    """README.md of a merged checkpoint: YAML header for the Hub, then the experts, routing and usage."""
    applied = biases.clamp(max=0).mean(dim=0)  # (E,) bias as applied, averaged over layers
    rows = []
    for i, e in enumerate(meta["experts"]):
        card = e.get("card") or {}
        data = card.get("data") or {}
        loss = card.get("final_loss")
        rows.append(f"| {i} | {e['name']} | {card.get('router_source', 'anchor (r_pub)') if i else 'anchor (r_pub)'} "
                    f"| {data.get('documents', '-')} | {data.get('tokens', '-')} | {card.get('steps', '-')} "
                    f"| {'-' if loss is None else f'{loss:.4g}'} | {float(applied[i]):.4g} |")
    fam = hf_config.family(config)
    e_total, k = fam.num_experts(config), config["num_experts_per_tok"]
    routing = ("renormalised over all E experts (Mixtral always renormalises; at k = E that is FlexOlmo's routing)"
               if fam.renormalises else "without renormalisation (`norm_topk_prob: false`)")
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- flexolmo", "- moe",
        "- flexmoe", "---", "",
        "# FlexOlmo mixture of experts (flexmoe)", "",
        f"A `{fam.moe_type}` model with {e_total} experts, top-{k} routing {routing}. Expert 0 is the public FFN of the anchor; every other expert was trained "
        "by its data owner against the same frozen anchor and merged without joint training.", "",
        f"- Anchor fingerprint: `{meta['anchor_fingerprint']}`",
        f"- Router: rows stacked in expert order, row 0 = r_pub from the anchor; top-k = {k}",
        "- Expert bias: per layer and expert, applied as `logits += min(b, 0)` before the softmax. It lives in "
        f"`{BIAS_FILE}`, which stock transformers does not read: `AutoModelForCausalLM.from_pretrained` loads "
        "this folder cleanly **without** the bias; `flexmoe.load_model` applies it.", "",
        "| # | expert | router source | documents | tokens | steps | final loss | mean min(b,0) |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "## Use", "", "```python",
        "import flexmoe", "model = flexmoe.load_model(\"path/to/this/folder\")   # with expert biases",
        "# or, without biases: transformers.AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", "",
        "Remove an expert (opt-out) with `flexmoe remove DIR --expert NAME --out NEW`; add one with "
        "`flexmoe add DIR --expert PKG --out NEW`.", ""])


def write_merged_files(tmp: Path, *, side_src: Path, config: dict, meta: dict, biases: torch.Tensor,
                       side_listed: manifest.Listed | None = None) -> None:
    """The non-tensor files of a merged folder; tokenizer and anchor files are copied from `side_src`, checked
    against its manifest `side_listed`."""
    write_biases(tmp, biases)
    dump_json(tmp / "config.json", config, sort_keys=True)
    dump_json(tmp / MERGED_META, meta)
    (tmp / "README.md").write_text(model_card(config, meta, biases))
    copy_side_files(side_src, tmp, COPIED_FILES + (ANCHOR_META, ANCHOR_ROUTER), side_listed)


@dataclass
class Merged:
    """An opened merged checkpoint: metadata, lazy tensors and the (L, E) biases."""

    path: Path
    config: dict
    meta: dict
    reader: LazyReader
    biases: torch.Tensor  # (L, E) float32
    num_layers: int
    hidden_size: int
    dtype: str  # safetensors dtype of the router and FFNs

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.meta["experts"]]

    @property
    def num_experts(self) -> int:
        return len(self.meta["experts"])

    def index_of(self, name: str) -> int:
        if name == PUBLIC_NAME:
            raise ConfigError(f"expert {PUBLIC_NAME!r} is the anchor's own FFN and cannot be removed or extracted")
        if name not in self.names:
            raise ConfigError(f"no expert {name!r} in {self.path}; it has: {', '.join(self.names[1:]) or 'none'}")
        return self.names.index(name)

    def ffn_spec(self, layer: int, proj: str) -> TensorSpec:
        return self.reader.spec(expert_key(layer, 0, proj))

    def close(self) -> None:
        self.reader.close()


def read_merged(path: str | Path) -> Merged:
    """Open a flexmoe merged checkpoint and check that config, flexmoe.json, tensors and biases agree."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    config = hf_config.require(path, hf_config.MOE, "not a merged checkpoint")
    meta = read_json(path / MERGED_META, "flexmoe merged checkpoint")
    listed = manifest.check(path, meta, MERGED_META, remake=MERGED_REMAKE, hashed=manifest.small_files(meta))
    try:
        if meta.get("format") != MERGED_FORMAT:
            raise CheckpointError(f"{path / MERGED_META}: unknown format {meta.get('format')!r} (expected {MERGED_FORMAT})")
        experts = meta["experts"]
        names = [e["name"] for e in experts]
        num_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
        if not isinstance(meta["anchor_fingerprint"], str) or int(meta["top_k"]) < 1:
            raise ValueError("bad anchor_fingerprint or top_k")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt {MERGED_META} or config.json ({e})") from e
    if not names or names[0] != PUBLIC_NAME or len(set(names)) != len(names):
        raise CheckpointError(f"{path / MERGED_META}: expert list must start with {PUBLIC_NAME!r} and have unique names")
    family = hf_config.family(config)
    try:
        num_experts = family.num_experts(config)
    except (KeyError, TypeError, ValueError):
        num_experts = None
    if num_experts != len(names):
        raise CheckpointError(f"{path}: config.json has {family.num_experts_key}={num_experts}, "
                              f"{MERGED_META} lists {len(names)} experts")
    reader = LazyReader.from_dir(path, listed=listed)
    try:
        for layer in range(num_layers):
            gate = reader.spec(router_key(layer))
            if gate.shape != (len(names), hidden):
                raise CheckpointError(f"{path}: {router_key(layer)} has shape {list(gate.shape)}, "
                                      f"expected [{len(names)}, {hidden}]")
            for e in range(len(names)):
                for proj in FFN_PROJS:
                    reader.spec(expert_key(layer, e, proj))
        with LazyReader.from_file(path / BIAS_FILE) as br:
            for layer in range(num_layers):
                if br.spec(router_bias_key(layer)).shape != (len(names),):
                    raise CheckpointError(f"{path / BIAS_FILE}: {router_bias_key(layer)} has shape "
                                          f"{list(br.spec(router_bias_key(layer)).shape)}, expected [{len(names)}]")
            biases = torch.stack([br.get(router_bias_key(layer)).float() for layer in range(num_layers)])  # (L, E)
        dtype = reader.spec(router_key(0)).dtype
    except BaseException:
        reader.close()
        raise
    return Merged(path=path, config=config, meta=meta, reader=reader, biases=biases, num_layers=num_layers,
                  hidden_size=hidden, dtype=dtype)
