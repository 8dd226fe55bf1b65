"""Baseline checkpoints for the reproduction table, written from a merged checkpoint by streaming tensors.

Model soup (`soup`): the paper's baseline "average the owner FFNs into one FFN". Every owner publishes a
2-expert model (public FFN + own FFN, router rows [r_pub; r_i], bias b_i) whose shared tensors, public FFN and
r_pub are identical across owners, so the classic parameter-average soup (Wortsman et al. 2022) of those models
is exactly a 2-expert `flex_olmo` with expert 0 = the public FFN, expert 1 = the mean of the owner FFNs, router
rows [r_pub; mean r_i] and raw bias mean b_i. We write that, rather than a dense model that also averages in the
public FFN: it keeps what every owner trained against (the frozen public half), has the active parameters of one
expert alone, and differs from FlexOlmo only in averaging the owners instead of concatenating them. The soup of
one owner is that owner's own 2-expert model, bit for bit.

`with_router_rows` replaces the router rows of a checkpoint (e.g. random rows for an ablation) and keeps all else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from flexmoe.checkpoint.surgery import built_item, copy_item, stream_items
from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io import hf_config
from flexmoe.io.atomic import atomic_dir, check_output
from flexmoe.io.jsonfile import read_json
from flexmoe.io.merged import BIAS_FILE, MERGED_META, NO_SHARD_LIMIT
from flexmoe.io.reader import INDEX_NAME, LazyReader, model_files
from flexmoe.io.safetensors_format import DTYPE_TO_TORCH, TensorSpec
from flexmoe.io.writer import DEFAULT_SHARD_BYTES, ShardWriter
from flexmoe.io.keys import FFN_PROJS, expert_key, parse_expert_key, parse_router_key, router_bias_key


# An output tensor is copied as raw bytes from the source (str: the source key) or computed (a callable).
Producer = str | Callable[[], torch.Tensor]


def _read_json(path: Path) -> dict:
    return read_json(path, "merged checkpoint")


def _write_model(src: Path, tmp: Path, plan: dict[str, tuple[TensorSpec, Producer]], config: dict,
                 bias: dict[str, torch.Tensor] | None, meta: dict | None) -> None:
    """Write the planned tensors, config, bias sidecar and flexmoe.json into `tmp`; copy every other file of `src`."""
    skip = {f.name for f in model_files(src)} | {INDEX_NAME, "config.json", BIAS_FILE, MERGED_META, "README.md"}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, tmp / f.name)
    with LazyReader.from_dir(src) as reader:  # through surgery's planner: canonical order, reads hashed
        items = [copy_item(name, reader, produce) if isinstance(produce, str) else
                 built_item(name, spec.dtype, spec.shape, lambda produce=produce: produce().contiguous())
                 for name, (spec, produce) in plan.items()]
        stream_items(tmp, items, sources=[reader], max_shard_bytes=DEFAULT_SHARD_BYTES, prefix="model",
                     progress=False, desc="baseline", to_disk=hf_config.family(config).to_disk)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if bias is not None:
        with ShardWriter(tmp, [TensorSpec.of(k, v) for k, v in bias.items()], prefix=BIAS_FILE.split(".")[0],
                         max_shard_bytes=NO_SHARD_LIMIT) as w:
            for k, v in bias.items():
                w.write(k, v)
            w.finalize()
    if meta is not None:
        (tmp / MERGED_META).write_text(json.dumps(meta, indent=2) + "\n")


def _mean(reader: LazyReader, keys: list[str], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        acc = reader.get(keys[0]).float()  # float32 accumulation; one extra tensor in memory at a time
        for k in keys[1:]:
            acc += reader.get(k).float()
        return (acc / len(keys)).to(dtype)
    return produce


def soup(merged_dir: str | Path, out: str | Path, *, experts: list[str] | None = None,
         overwrite: bool = False) -> Path:
    """Write the model soup of `experts` (default: every owner) of a merged checkpoint as a 2-expert model of its
    family."""
    src, out = Path(merged_dir), check_output(out, overwrite)
    config = hf_config.require(src, hf_config.MOE, "a soup is made of a merged checkpoint")
    family = hf_config.family(config)
    num, layers = family.num_experts(config), int(config["num_hidden_layers"])
    meta = _read_json(src / MERGED_META) if (src / MERGED_META).is_file() else None
    names = [e["name"] for e in meta["experts"]] if meta else ["public"] + [f"expert{i}" for i in range(1, num)]
    if len(names) != num:
        raise CheckpointError(f"{src}: {MERGED_META} names {len(names)} experts, config.json has {num}")
    chosen = names[1:] if experts is None else list(experts)
    unknown = [n for n in chosen if n not in names[1:]]
    if unknown or not chosen:
        raise ConfigError(f"soup: unknown expert {unknown[0]!r} (owners: {', '.join(names[1:])})" if unknown
                          else "soup: give at least one owner expert")
    idx = [names.index(n) for n in chosen]

    reader = LazyReader.from_dir(src)
    plan: dict[str, tuple[TensorSpec, Producer]] = {}
    for key in reader.keys():
        parsed, layer = parse_expert_key(key), parse_router_key(key)
        spec = reader.spec(key)
        if parsed is not None:
            L, e, proj = parsed
            if e == 0:
                plan[key] = (spec, key)
            elif e == idx[0]:
                name = expert_key(L, 1, proj)
                plan[name] = (TensorSpec(name, spec.dtype, spec.shape),
                              _mean(reader, [expert_key(L, i, proj) for i in idx], DTYPE_TO_TORCH[spec.dtype]))
        elif layer is not None:
            def rows(layer=layer, key=key) -> torch.Tensor:
                w = reader.get(key)  # (E, H)
                return torch.stack([w[0], w[idx].float().mean(0).to(w.dtype)])  # (2, H)
            plan[key] = (TensorSpec(key, spec.dtype, (2, spec.shape[1])), rows)
        else:
            plan[key] = (spec, key)
    missing = [expert_key(L, 1, p) for L in range(layers) for p in FFN_PROJS if expert_key(L, 1, p) not in plan]
    if missing:
        raise CheckpointError(f"{src}: tensor {missing[0]!r} has no source (incomplete checkpoint?)")
    bias = None
    if (src / BIAS_FILE).is_file():
        with LazyReader.from_file(src / BIAS_FILE) as br:
            bias = {}
            for L in range(layers):
                b = br.get(router_bias_key(L))  # (E,)
                bias[router_bias_key(L)] = torch.stack([b[0], b[idx].float().mean().to(b.dtype)])
    # a family that renormalises the top-k weights has k = E, so min(k, 2) keeps k = E = 2
    config = family.moe_config(config, 2, min(int(config["num_experts_per_tok"]), 2))
    new_meta = {**(meta or {"format": "flexmoe-merged/1"}), "top_k": config["num_experts_per_tok"],
                "experts": [{"name": "public"}, {"name": "soup", "soup_of": chosen}]}
    try:
        with atomic_dir(out, overwrite, seal=MERGED_META) as tmp:
            _write_model(src, tmp, plan, config, bias, new_meta)
    finally:
        reader.close()
    return out


def with_router_rows(merged_dir: str | Path, rows: torch.Tensor, out: str | Path, *,
                     overwrite: bool = False) -> Path:
    """Copy a merged checkpoint with router rows replaced: `rows` (E, H) for every layer or (layers, E, H)."""
    src, out = Path(merged_dir), check_output(out, overwrite)
    config = _read_json(src / "config.json")
    layers = int(config.get("num_hidden_layers", 0))
    reader = LazyReader.from_dir(src)
    plan: dict[str, tuple[TensorSpec, Producer]] = {}
    for key in reader.keys():
        layer, spec = parse_router_key(key), reader.spec(key)
        if layer is None:
            plan[key] = (spec, key)
            continue
        new = rows if rows.dim() == 2 else rows[layer] if rows.dim() == 3 and rows.shape[0] == layers else None
        if new is None or tuple(new.shape) != spec.shape:
            reader.close()
            raise ConfigError(f"router rows of shape {tuple(rows.shape)} do not fit {key} {list(spec.shape)} "
                              f"(give (E, H) or (layers, E, H))")
        plan[key] = (spec, lambda new=new, dt=DTYPE_TO_TORCH[spec.dtype]: new.detach().to(dt).cpu())
    meta = _read_json(src / MERGED_META) if (src / MERGED_META).is_file() else None
    bias = None
    if (src / BIAS_FILE).is_file():
        with LazyReader.from_file(src / BIAS_FILE) as br:
            bias = {k: br.get(k) for k in br.keys()}
    try:
        with atomic_dir(out, overwrite, seal=MERGED_META if meta is not None else None) as tmp:
            _write_model(src, tmp, plan, config, bias, meta)
    finally:
        reader.close()
    return out
