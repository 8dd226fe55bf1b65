"""FlexOlmo folders that flexmoe did not write: `adopt` (an E-expert model as a merged checkpoint) and
`import_expert` (a 2-expert public + domain model as an expert package).

Both read a stock `FlexOlmoForCausalLM` folder (Ai2's releases, or anything `save_pretrained` wrote: sharded or
not, fp32 or bf16) through the lazy reader and stream its tensors, as raw bytes, through the same planner as
`surgery`: adopted tensors are byte-identical to the source's, in the canonical order, so every later
merge / add / remove / extract round trip holds. Like surgery, nothing here imports transformers.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe import __version__
from flexmoe.checkpoint.surgery import (CheckpointResult, PackageResult, built_item, copy_item, refuse_input_as_output,
                                       sealed_output, stream_items)
from flexmoe.config import AdoptConfig, ImportExpertConfig, parse_size
from flexmoe.errors import CheckpointError, ConfigError, FingerprintMismatch
from flexmoe.io import hf_config, manifest
from flexmoe.io.anchor import read_anchor
from flexmoe.io.atomic import check_output
from flexmoe.io.fingerprint import merged_anchor_fingerprint
from flexmoe.io.keys import (FFN_PROJS, dense_ffn_key, expert_key, is_shared, natural_order, package_bias_key,
                             package_row_key, parse_expert_key, parse_router_key, router_key)
from flexmoe.io.merged import MERGED_META, NO_SHARD_LIMIT, dump_json, moe_config, merged_meta, write_merged_files
from flexmoe.io.package import (PACKAGE_CARD, PACKAGE_TENSORS, PUBLIC_NAME, ExpertCard, package_keys,
                               validate_expert_name)
from flexmoe.io.reader import LazyReader
from flexmoe.io.safetensors_format import DTYPE_TO_TORCH
from flexmoe.io.writer import ShardWriter

NO_BIAS = "none in source"  # what an adopted / imported expert's card says of its bias (stored as 0)
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# ---------------------------------------------------------------- the source folder

@dataclass
class FlexSource:
    """An opened stock FlexOlmo folder, checked to be one flexmoe can take over."""

    path: Path
    config: dict
    reader: LazyReader
    num_experts: int
    num_layers: int
    hidden_size: int
    top_k: int
    dtype: str  # safetensors dtype of the routers and FFNs

    def close(self) -> None:
        self.reader.close()


def open_flex_source(path: str | Path, why: str) -> FlexSource:
    """Open `path` as a stock `FlexOlmoForCausalLM` folder without router bias; `why` ends the wrong-kind error."""
    path = Path(path)
    config = hf_config.require(path, hf_config.MOE, why)
    if (path / MERGED_META).is_file():
        raise CheckpointError(f"{path}: already a flexmoe merged checkpoint ({MERGED_META}); use it as it is "
                              "(or `flexmoe extract` its experts)")
    family = hf_config.family(config)
    try:
        num_experts, num_layers = family.num_experts(config), int(config["num_hidden_layers"])
        hidden, top_k = int(config["hidden_size"]), int(config.get("num_experts_per_tok", num_experts))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: not a complete FlexOlmo config ({e})") from e
    if config.get("norm_topk_prob"):
        raise CheckpointError(f"{path}/config.json: norm_topk_prob is true; FlexOlmo (and flexmoe) route without "
                              "renormalising the top-k weights, so this model would change its outputs here; "
                              "set it to false only if the model was trained that way")
    if family.renormalises and top_k != num_experts:
        raise CheckpointError(f"{path}/config.json: num_experts_per_tok={top_k} < {family.num_experts_key}="
                              f"{num_experts}; {family.moe_label} renormalises the top-k weights, which is FlexOlmo's "
                              "routing only when every expert is active, so flexmoe takes it only with k = E")
    if not 1 <= top_k <= num_experts:
        raise CheckpointError(f"{path}/config.json: num_experts_per_tok={top_k} is not between 1 and "
                              f"num_experts={num_experts}")
    reader = LazyReader.from_dir(path)  # canonical names (Mixtral's block_sparse_moe.* read as mlp.*)
    try:
        dtype = None
        for key in reader.keys():
            if ".mlp." in key and parse_expert_key(key) is None and parse_router_key(key) is None:
                what = "a router bias" if ".mlp.gate." in key else "an unexpected MLP tensor"
                raise CheckpointError(f"{path}: tensor {key} is {what}; flexmoe takes FlexOlmo models whose "
                                      "router is one bias-free linear layer (mlp.gate.weight) and per-expert FFNs")
        for layer in range(num_layers):
            if router_key(layer) not in reader:
                raise CheckpointError(f"{path}: no tensor {router_key(layer)} (layer {layer} of {num_layers})")
            gate = reader.spec(router_key(layer))
            if gate.shape != (num_experts, hidden):
                raise CheckpointError(f"{path}: {router_key(layer)} has shape {list(gate.shape)}, expected "
                                      f"[{num_experts}, {hidden}] (num_experts x hidden_size of config.json)")
            dtype = dtype or gate.dtype
            for e in range(num_experts):
                for proj in FFN_PROJS:
                    key = expert_key(layer, e, proj)
                    if key not in reader:
                        raise CheckpointError(f"{path}: no tensor {key} (config.json says {num_experts} experts)")
                    spec, ref = reader.spec(key), reader.spec(expert_key(layer, 0, proj))
                    if (spec.dtype, spec.shape) != (ref.dtype, ref.shape) or spec.dtype != dtype:
                        raise CheckpointError(f"{path}: {key} is {spec.dtype}{list(spec.shape)}, expert 0's is "
                                              f"{ref.dtype}{list(ref.shape)} and the router {dtype}")
            extra = [k for k in reader.keys() if (p := parse_expert_key(k)) and p[1] >= num_experts]
            if extra:
                raise CheckpointError(f"{path}: tensor {extra[0]} is beyond num_experts={num_experts}")
    except BaseException:
        reader.close()
        raise
    return FlexSource(path=path, config=config, reader=reader, num_experts=num_experts, num_layers=num_layers,
                      hidden_size=hidden, top_k=top_k, dtype=dtype)


def source_record(path: Path, *, hash_files: bool) -> dict:
    """Where a card's tensors came from: the folder, the Hub commit when it is a cache snapshot, and (for
    `import_expert`) the size and sha256 of every file of the folder."""
    path = Path(path).resolve()
    rec = {"folder": str(path), "commit": path.name if path.parent.name == "snapshots" else None,
           "bias": NO_BIAS}
    if hash_files:
        rec["files"] = {f.name: manifest.hash_file(f).to_json() for f in sorted(path.iterdir())
                        if f.is_file() and not f.name.startswith(".")}
    return rec


def _card(name: str, fingerprint: str, router_source: str, source: dict) -> dict:
    card = ExpertCard(name=name, anchor_fingerprint=fingerprint, embedder=None, router_source=router_source,
                      flexmoe_version=__version__).to_json()
    return {**card, "source": source}


# ---------------------------------------------------------------- adopt

def adopt(cfg: AdoptConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> CheckpointResult:
    """An existing E-expert `FlexOlmoForCausalLM` folder -> a flexmoe merged checkpoint (docs/FORMAT.md): the same
    tensors byte for byte (canonical order), `flexmoe.json` with `cfg.names`, zero biases, a model card."""
    t0 = time.perf_counter()
    src_dir = Path(cfg.model)
    refuse_input_as_output(Path(out), [src_dir])
    out = check_output(out, overwrite)
    max_shard = parse_size(cfg.shard_size)
    for name in cfg.names[1:]:
        validate_expert_name(name)
    with ExitStack() as stack:
        src = open_flex_source(src_dir, "adopt takes a FlexOlmoForCausalLM folder")
        stack.callback(src.close)
        if len(cfg.names) != src.num_experts:
            raise ConfigError(f"--names gives {len(cfg.names)} names, {src_dir} has {src.num_experts} experts "
                              f"(num_experts in config.json); give one name per expert, 'public' first")
        fingerprint = merged_anchor_fingerprint(src_dir)
        record = source_record(src_dir, hash_files=False)
        experts = [{"name": PUBLIC_NAME}] + [{"name": n, "card": _card(n, fingerprint, "adopted", record)}
                                             for n in cfg.names[1:]]
        meta = merged_meta(fingerprint, src.top_k, src.top_k, experts)
        items = [copy_item(k, src.reader, k) for k in src.reader.keys()]
        biases = torch.zeros(src.num_layers, src.num_experts)
        fcfg = moe_config(src.config, src.num_experts, src.top_k)
        with sealed_output(out, overwrite) as tmp:
            shards = stream_items(tmp, items, sources=[src.reader], max_shard_bytes=max_shard, prefix="model",
                                  progress=progress, desc="adopt", to_disk=hf_config.family(src.config).to_disk)
            write_merged_files(tmp, side_src=src_dir, config=fcfg, meta=meta, biases=biases)
    return CheckpointResult(out=out, experts=list(cfg.names), top_k=src.top_k, top_k_before=None, shards=shards,
                            total_bytes=sum(it.spec.nbytes for it in items), anchor_fingerprint=fingerprint,
                            seconds=time.perf_counter() - t0,
                            notes=[f"top-k {src.top_k} (from config.json), expert biases 0 ({NO_BIAS})"])


# ---------------------------------------------------------------- import-expert

def _first_difference(src: FlexSource, areader: LazyReader) -> str:
    """The first anchor tensor (in canonical order) that the source's anchor view does not reproduce."""
    src_names = {}
    for k in src.reader.keys():
        parsed = parse_expert_key(k)
        if parsed is None and is_shared(k):
            src_names[k] = k
        elif parsed is not None and parsed[1] == 0:
            src_names[dense_ffn_key(parsed[0], parsed[2])] = k
    for name in sorted(set(src_names) | set(areader.keys()), key=natural_order):
        if name not in areader:
            return f"{src_names[name]} is not in the anchor"
        if name not in src_names:
            return f"the anchor's {name} has no counterpart in the source"
        a, s = areader.spec(name), src.reader.spec(src_names[name])
        if (a.dtype, a.shape) != (s.dtype, s.shape):
            return f"{src_names[name]} is {s.dtype}{list(s.shape)}, the anchor's {name} is {a.dtype}{list(a.shape)}"
        ha, hs = hashlib.sha256(), hashlib.sha256()
        for c in areader.read_chunks(name):
            ha.update(c)
        for c in src.reader.read_chunks(src_names[name]):
            hs.update(c)
        if ha.digest() != hs.digest():
            return f"{src_names[name]} differs from the anchor's {name}"
    return "the tensors are equal but the anchor's recorded fingerprint is not theirs (`flexmoe verify` the anchor)"


def import_expert(cfg: ImportExpertConfig, out: str | Path, *, overwrite: bool = False,
                  progress: bool = True) -> PackageResult:
    """A 2-expert `FlexOlmoForCausalLM` (expert 0 = the anchor's public FFN, expert 1 = a domain's) -> an expert
    package of `cfg.anchor`: experts.1 -> the owner FFN, router row 1 -> its row, bias 0 ("none in source")."""
    t0 = time.perf_counter()
    src_dir, anchor_dir = Path(cfg.model), Path(cfg.anchor)
    refuse_input_as_output(Path(out), [src_dir, anchor_dir])
    out = check_output(out, overwrite)
    validate_expert_name(cfg.name)
    anchor = read_anchor(anchor_dir)
    acfg = hf_config.require(anchor_dir, hf_config.DENSE, "the anchor of an import is the dense model")
    with ExitStack() as stack:
        src = open_flex_source(src_dir, "import-expert takes a 2-expert FlexOlmoForCausalLM folder")
        stack.callback(src.close)
        if src.num_experts != 2:
            raise CheckpointError(f"{src_dir}: a FlexOlmo model with {src.num_experts} experts; import-expert takes "
                                  "a 2-expert one (public + one domain); adopt a larger one with `flexmoe adopt`")
        areader = stack.enter_context(LazyReader.from_dir(anchor_dir))
        layers, hidden = int(acfg["num_hidden_layers"]), int(acfg["hidden_size"])
        if (src.num_layers, src.hidden_size) != (layers, hidden):
            raise CheckpointError(f"{src_dir}: {src.num_layers} layers of hidden size {src.hidden_size}, the anchor "
                                  f"has {layers} of {hidden}; it was not built from this anchor")
        adtype = areader.spec(dense_ffn_key(0, "gate_proj")).dtype
        if src.dtype != adtype:
            theirs, ours = _DTYPE_NAMES.get(src.dtype, src.dtype), _DTYPE_NAMES.get(adtype, adtype)
            raise CheckpointError(
                f"{src_dir} is {theirs}, the anchor {anchor_dir} is {ours}; bring both to one dtype: "
                f"AutoModelForCausalLM.from_pretrained('{src_dir}', dtype=torch.{ours}).save_pretrained(NEW) and "
                f"import NEW, or re-create the anchor from a {theirs} copy (init-anchor --from-moe)")
        if merged_anchor_fingerprint(src_dir) != anchor.meta.fingerprint:
            raise FingerprintMismatch(f"{src_dir} was not built on anchor {anchor_dir}: {_first_difference(src, areader)}; "
                                      "import it against the anchor of its public expert (init-anchor --from-moe "
                                      "of the public 2-expert model)")
        torch_dtype = DTYPE_TO_TORCH[adtype]
        r_pub = anchor.public_row.to(torch_dtype)
        for layer in range(layers):
            if not torch.equal(src.reader.get(router_key(layer))[0].view(torch.uint8), r_pub.view(torch.uint8)):
                raise FingerprintMismatch(f"{src_dir}: row 0 of {router_key(layer)} differs from the anchor's public "
                                          f"router row (r_pub in {anchor_dir}); the model's public expert is not "
                                          "this anchor's: re-create the anchor with init-anchor --from-moe")
        items = []
        for layer in range(layers):
            items += [copy_item(dense_ffn_key(layer, p), src.reader, expert_key(layer, 1, p)) for p in FFN_PROJS]
            items.append(built_item(package_row_key(layer), adtype, (hidden,),
                                    lambda layer=layer: src.reader.get(router_key(layer))[1].clone()))
            items.append(built_item(package_bias_key(layer), "F32", (), lambda: torch.zeros((), dtype=torch.float32)))
        order = {k: i for i, k in enumerate(package_keys(layers))}
        items.sort(key=lambda it: order[it.spec.name])
        card = _card(cfg.name, anchor.meta.fingerprint, "imported", source_record(src_dir, hash_files=True))
        with sealed_output(out, overwrite, seal=PACKAGE_CARD) as tmp:
            with ShardWriter(tmp, [it.spec for it in items], max_shard_bytes=NO_SHARD_LIMIT,
                             prefix=PACKAGE_TENSORS.removesuffix(".safetensors")) as w:
                for it in items:
                    it.emit(w)
                w.finalize()
            dump_json(tmp / PACKAGE_CARD, card)
    return PackageResult(out=out, name=cfg.name, num_layers=layers, total_bytes=sum(it.spec.nbytes for it in items),
                        anchor_fingerprint=anchor.meta.fingerprint, seconds=time.perf_counter() - t0)
