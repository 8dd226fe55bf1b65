"""Builders of tiny real components for tests, benchmarks and the offline demo.

Nothing here is a mock: the models are real transformers/sentence-transformers objects with random weights,
saved in their normal on-disk formats, so every code path that loads them is the production one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexmoe.io import manifest
from flexmoe.io.anchor import ANCHOR_META
from flexmoe.io.package import PACKAGE_CARD


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's rendezvous: torchrun's and accelerate's default 29500 may be taken by
    another distributed test or job on the machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_olmo2_config(*, vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                      num_layers: int = 2, num_heads: int = 4, max_position_embeddings: int = 256):
    """A 2-layer OLMo-2 config that runs in milliseconds on CPU."""
    from transformers import Olmo2Config

    return Olmo2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=1, eos_token_id=0, bos_token_id=None,
        tie_word_embeddings=False, rope_theta=500000.0,
    )


def save_random_olmo2(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Save a random dense `Olmo2ForCausalLM` (no tokenizer) with `save_pretrained`."""
    from transformers import Olmo2ForCausalLM

    torch.manual_seed(seed)
    return _save_stock(Olmo2ForCausalLM(tiny_olmo2_config(**config_kwargs)), Path(out_dir), dtype, None)


def tiny_qwen3_config(*, vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                      num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 256):
    """A 2-layer Qwen3 config (grouped-query attention, per-head q/k norms) that runs in milliseconds on CPU."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings, pad_token_id=1,
        eos_token_id=0, bos_token_id=None, tie_word_embeddings=False,
    )


def save_random_qwen3(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Save a random dense `Qwen3ForCausalLM` (no tokenizer) with `save_pretrained`."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return _save_stock(Qwen3ForCausalLM(tiny_qwen3_config(**config_kwargs)), Path(out_dir), dtype, None)


def tiny_llama_config(*, vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                      num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 256):
    """A 2-layer Llama config (grouped-query attention) that runs in milliseconds on CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=1, eos_token_id=0, bos_token_id=None,
        tie_word_embeddings=False,
    )


def save_random_llama(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Save a random dense `LlamaForCausalLM` (no tokenizer) with `save_pretrained`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return _save_stock(LlamaForCausalLM(tiny_llama_config(**config_kwargs)), Path(out_dir), dtype, None)


def tiny_mistral_config(*, sliding_window: int | None = None, **kwargs):
    """`tiny_llama_config` as a Mistral config (same tensors; Mistral adds `sliding_window`, None by default)."""
    from transformers import MistralConfig

    cfg = tiny_llama_config(**kwargs).to_dict()
    keep = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings")}
    return MistralConfig(**keep, sliding_window=sliding_window)


def save_random_mistral(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                        **config_kwargs) -> Path:
    """Save a random dense `MistralForCausalLM` (no tokenizer) with `save_pretrained`."""
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    return _save_stock(MistralForCausalLM(tiny_mistral_config(**config_kwargs)), Path(out_dir), dtype, None)


_DENSE_BUILDERS = {"olmo2": (save_random_olmo2, tiny_olmo2_config), "qwen3": (save_random_qwen3, tiny_qwen3_config),
                   "llama": (save_random_llama, tiny_llama_config),
                   "mistral": (save_random_mistral, tiny_mistral_config)}


def build_random_embedder(out_dir: str | Path, *, dim: int = 32, seed: int = 0, max_seq_length: int = 128) -> Path:
    """Save a random 2-layer BERT with mean pooling as a sentence-transformers folder.

    The word-piece vocabulary is built from printable ASCII plus common English fragments, so real text
    tokenizes into many distinct ids and different domains get different mean embeddings.
    """
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_hf"
    work.mkdir(exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    frags = ["the", "and", "def", "self", "return", "import", "of", "to", "in", "that", "is", "for", "shall",
             "lord", "god", "state", "nation", "congress", "class", "if", "else", "print", "law", "license"]
    vocab = specials + chars + ["##" + c for c in chars] + frags + ["##" + f for f in frags]
    # transformers v5 takes the vocabulary itself (`vocab`); a `vocab_file` is ignored, leaving only the specials.
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(dict.fromkeys(vocab))}, do_lower_case=True)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=2 * dim,
                                max_position_embeddings=max(512, max_seq_length)))
    bert.save_pretrained(work)
    tokenizer.save_pretrained(work)
    word = models.Transformer(str(work), max_seq_length=max_seq_length)
    dim_of = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    pooling = models.Pooling(dim_of(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(out))
    import shutil

    shutil.rmtree(work)
    return out


def save_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Save a word-level `PreTrainedTokenizerFast` (printable characters + filler words) of `vocab_size` ids.

    Ids 0 and 1 are `<eos>` and `<pad>`, matching `tiny_olmo2_config`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<pad>", "<unk>"] + [chr(c) for c in range(33, 127)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_random_anchor(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                        tokenizer: bool = True, family: str = "olmo2", **config_kwargs) -> Path:
    """A complete flexmoe anchor (random dense OLMo-2, or `family="qwen3"` / "llama" / "mistral", + `flexmoe_anchor.json` +
    `flexmoe_router.safetensors`).

    Built without any training code: the fingerprint is computed from the saved tensors and r_pub is random.
    """
    from flexmoe.io.anchor import AnchorMeta, write_anchor_files
    from flexmoe.io.fingerprint import anchor_fingerprint

    save, tiny_config = _DENSE_BUILDERS[family]
    out = save(out_dir, seed=seed, dtype=dtype, **config_kwargs)
    cfg = tiny_config(**config_kwargs)
    if tokenizer:
        save_tiny_tokenizer(out, vocab_size=cfg.vocab_size)
    g = torch.Generator().manual_seed(10_000 + seed)
    meta = AnchorMeta(fingerprint=anchor_fingerprint(out), hidden_size=cfg.hidden_size,
                      num_layers=cfg.num_hidden_layers, intermediate_size=cfg.intermediate_size,
                      dtype=str(dtype).removeprefix("torch."), embedder=None,
                      public_data={"documents": 0, "bytes": 0})
    write_anchor_files(out, meta, torch.randn(cfg.hidden_size, generator=g), None)
    manifest.seal(out, ANCHOR_META)  # as train-anchor seals its anchors
    return out


def build_random_package(out_dir: str | Path, anchor: str | Path, name: str, seed: int, *,
                         fingerprint: str | None = None, bias: float | list[float] | None = None,
                         ffn_std: float = 0.02, row_std: float = 1.0, anchor_ffn: bool = False) -> Path:
    """A random expert package for `anchor`: FFN of the anchor's shapes and dtype, row in the anchor dtype,
    float32 bias per layer (uniform in [-1, 0.5] unless given, so both clamped and active signs occur).
    `anchor_ffn`: the FFN is the anchor's own (a merge whose top-k weights sum to 1 then computes the dense FFN).

    `fingerprint` overrides the card's anchor fingerprint (to build packages that must be refused).
    """
    from flexmoe.io.anchor import read_anchor
    from flexmoe.io.package import ExpertCard, write_package
    from flexmoe.io.reader import LazyReader
    from flexmoe.io.safetensors_format import DTYPE_TO_TORCH
    from flexmoe.io.keys import FFN_PROJS, dense_ffn_key, package_bias_key, package_row_key

    a = read_anchor(anchor)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with LazyReader.from_dir(anchor) as reader:
        for layer in range(a.meta.num_layers):
            for proj in FFN_PROJS:
                spec = reader.spec(dense_ffn_key(layer, proj))
                w = torch.randn(spec.shape, generator=g) * ffn_std
                if anchor_ffn:
                    w = reader.get(dense_ffn_key(layer, proj))
                tensors[dense_ffn_key(layer, proj)] = w.to(DTYPE_TO_TORCH[spec.dtype])
            dtype = DTYPE_TO_TORCH[reader.spec(dense_ffn_key(layer, "gate_proj")).dtype]
            tensors[package_row_key(layer)] = (torch.randn(a.meta.hidden_size, generator=g) * row_std).to(dtype)
            if bias is None:
                b = float(torch.rand((), generator=g)) * 1.5 - 1.0
            else:
                b = bias[layer] if isinstance(bias, (list, tuple)) else bias
            tensors[package_bias_key(layer)] = torch.tensor(b, dtype=torch.float32)
    card = ExpertCard(name=name, anchor_fingerprint=fingerprint or a.meta.fingerprint, router_source="random",
                      data={"documents": 10 + seed, "bytes": 1000 * (seed + 1)}, steps=seed, final_loss=1.0 + seed,
                      flexmoe_version="test")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_package(out, tensors, card)
    manifest.seal(out, PACKAGE_CARD)  # as train-expert seals its packages
    return out


def _olmo2_tensor_specs(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                        kv_dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a dense `Olmo2ForCausalLM` state dict (untied LM head)."""
    out = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for L in range(num_layers):
        p = f"model.layers.{L}."
        out += [(p + "self_attn.q_proj.weight", (hidden_size, hidden_size)),
                (p + "self_attn.k_proj.weight", (kv_dim, hidden_size)),
                (p + "self_attn.v_proj.weight", (kv_dim, hidden_size)),
                (p + "self_attn.o_proj.weight", (hidden_size, hidden_size)),
                (p + "self_attn.q_norm.weight", (hidden_size,)), (p + "self_attn.k_norm.weight", (kv_dim,)),
                (p + "post_attention_layernorm.weight", (hidden_size,)),
                (p + "post_feedforward_layernorm.weight", (hidden_size,)),
                (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)),
                (p + "mlp.up_proj.weight", (intermediate_size, hidden_size)),
                (p + "mlp.down_proj.weight", (hidden_size, intermediate_size))]
    return out + [("model.norm.weight", (hidden_size,)), ("lm_head.weight", (vocab_size, hidden_size))]


class _RandomPool:
    """Random values reused at shifting offsets: builds GBs of distinct-looking tensors at memcpy speed."""

    def __init__(self, dtype: torch.dtype, seed: int, numel: int = 2**23):
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(numel, generator=g) * 0.02).to(dtype)
        self.offset = 0

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        flat = torch.empty(n, dtype=self.pool.dtype)
        pos = 0
        while pos < n:
            start = self.offset % (self.pool.numel() - 1)
            take = min(n - pos, self.pool.numel() - start)
            flat[pos:pos + take] = self.pool[start:start + take]
            pos += take
            self.offset += 7919  # a prime stride, so consecutive tensors differ
        return flat.reshape(shape)


def build_synthetic_anchor(out_dir: str | Path, *, vocab_size: int = 100352, hidden_size: int = 2048,
                           intermediate_size: int = 8192, num_layers: int = 16, num_heads: int = 16,
                           dtype: torch.dtype = torch.bfloat16, shard_size: str | int = "5GB", seed: int = 0) -> Path:
    """A full-size flexmoe anchor in the real on-disk layout, filled with random values (defaults: 1B class, bf16).

    Written tensor by tensor through `ShardWriter` (peak memory: one tensor), for benchmarks and kill tests.
    """
    import json

    from flexmoe.io.anchor import AnchorMeta, write_anchor_files
    from flexmoe.io.fingerprint import anchor_fingerprint
    from flexmoe.io.safetensors_format import TensorSpec, TORCH_TO_DTYPE
    from flexmoe.config import parse_size
    from flexmoe.io.writer import ShardWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = _olmo2_tensor_specs(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                num_layers=num_layers, kv_dim=hidden_size)
    pool = _RandomPool(dtype, seed)
    with ShardWriter(out, [TensorSpec(n, TORCH_TO_DTYPE[dtype], s) for n, s in specs],
                     max_shard_bytes=parse_size(shard_size)) as w:
        for name, shape in specs:
            w.write(name, pool.tensor(shape))
        w.finalize()
    cfg = tiny_olmo2_config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_layers=num_layers, num_heads=num_heads).to_dict()
    cfg.update(architectures=["Olmo2ForCausalLM"], dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "pad_token_id": 1}) + "\n")
    meta = AnchorMeta(fingerprint=anchor_fingerprint(out), hidden_size=hidden_size, num_layers=num_layers,
                      intermediate_size=intermediate_size, dtype=str(dtype).removeprefix("torch."), embedder=None)
    write_anchor_files(out, meta, torch.randn(hidden_size, generator=torch.Generator().manual_seed(seed)), None)
    manifest.seal(out, ANCHOR_META)
    return out


def build_synthetic_package(out_dir: str | Path, anchor: str | Path, name: str, seed: int) -> Path:
    """A random expert package for a (large) anchor, streamed tensor by tensor like `build_synthetic_anchor`."""
    import json

    from flexmoe.io.anchor import read_anchor
    from flexmoe.io.package import PACKAGE_CARD, ExpertCard, package_keys
    from flexmoe.io.reader import LazyReader
    from flexmoe.io.safetensors_format import DTYPE_TO_TORCH, TensorSpec
    from flexmoe.io.writer import NO_SHARD_LIMIT, ShardWriter
    from flexmoe.io.keys import parse_dense_ffn

    a = read_anchor(anchor)
    with LazyReader.from_dir(anchor) as r:
        dtype = DTYPE_TO_TORCH[r.spec("model.layers.0.mlp.gate_proj.weight").dtype]
        shapes = {k: r.spec(k).shape for k in r.keys() if parse_dense_ffn(k)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool, g = _RandomPool(dtype, 1000 + seed), torch.Generator().manual_seed(seed)
    keys = package_keys(a.meta.num_layers)
    tensors = {}
    for k in keys:
        if k in shapes:
            tensors[k] = None
        elif k.endswith("router.weight"):
            tensors[k] = torch.randn(a.meta.hidden_size, generator=g).to(dtype)
        else:
            tensors[k] = torch.tensor(float(torch.rand((), generator=g)) - 0.75, dtype=torch.float32)
    specs = [TensorSpec(k, TensorSpec.of(k, pool.pool[:1]).dtype, shapes[k]) if tensors[k] is None
             else TensorSpec.of(k, tensors[k]) for k in keys]
    with ShardWriter(out, specs, prefix="expert", max_shard_bytes=NO_SHARD_LIMIT) as w:
        for k in keys:
            w.write(k, pool.tensor(shapes[k]) if tensors[k] is None else tensors[k])
        w.finalize()
    card = ExpertCard(name=name, anchor_fingerprint=a.meta.fingerprint, router_source="random", flexmoe_version="synthetic")
    (out / PACKAGE_CARD).write_text(json.dumps(card.to_json(), indent=2) + "\n")
    manifest.seal(out, PACKAGE_CARD)  # as train-expert seals its packages
    return out


def drop_manifest(folder: str | Path) -> Path:
    """Make `folder` look as if written before manifests existed: remove "files" from its flexmoe JSON
    (tests of the checks that stand behind the manifest: fingerprints, shapes, config consistency)."""
    import json

    for name in ("flexmoe.json", "expert.json", "flexmoe_anchor.json"):
        meta = Path(folder) / name
        if meta.is_file():
            data = json.loads(meta.read_text())
            if data.pop(manifest.MANIFEST_KEY, None) is not None:
                meta.write_text(json.dumps(data, indent=2) + "\n")
                break
    return Path(folder)


# ---- stock FlexOlmo folders (the models flexmoe did not write: adopt, import-expert, init-anchor --from-moe)

_OLMO2_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
               "tie_word_embeddings", "rope_parameters")


def tiny_flex_olmo_config(*, num_experts: int, top_k: int | None = None, **config_kwargs):
    """`tiny_olmo2_config` as a `FlexOlmoConfig` of `num_experts` experts, top-k `top_k` (default: all)."""
    from transformers import FlexOlmoConfig

    base = tiny_olmo2_config(**config_kwargs).to_dict()
    return FlexOlmoConfig(**{k: base[k] for k in _OLMO2_KEYS if k in base}, num_experts=num_experts,
                          num_experts_per_tok=top_k or num_experts, norm_topk_prob=False)


def _save_stock(model, out: Path, dtype: torch.dtype, max_shard_size: str | None) -> Path:
    model = model.to(dtype)
    if max_shard_size is None:
        model.save_pretrained(out)
    else:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def save_random_flex_olmo(out_dir: str | Path, *, num_experts: int = 3, top_k: int | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                          router_std: float = 1.0, **config_kwargs) -> Path:
    """A random `FlexOlmoForCausalLM` saved by stock `save_pretrained` (sharded when `max_shard_size` is small),
    with router weights of std `router_std` so that every expert gets tokens."""
    from transformers import FlexOlmoForCausalLM

    torch.manual_seed(seed)
    model = FlexOlmoForCausalLM(tiny_flex_olmo_config(num_experts=num_experts, top_k=top_k, **config_kwargs))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, router_std)
    return _save_stock(model, Path(out_dir), dtype, max_shard_size)


def save_flex_olmo_on_anchor(out_dir: str | Path, anchor: str | Path, *, seed: int, num_experts: int = 2,
                             max_shard_size: str | None = None, ffn_std: float = 0.02, row_std: float = 1.0,
                             **config_kwargs) -> Path:
    """A `FlexOlmoForCausalLM` built on a flexmoe anchor the way FlexOlmo's released 2x7B models are: shared
    tensors and expert 0 from the anchor, router row 0 = r_pub, random experts 1.. and their rows; saved by stock
    `save_pretrained` in the anchor's dtype."""
    from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

    from flexmoe.io.anchor import read_anchor

    dense = Olmo2ForCausalLM.from_pretrained(anchor)
    dtype = next(dense.parameters()).dtype
    model = FlexOlmoForCausalLM(tiny_flex_olmo_config(num_experts=num_experts, **config_kwargs)).to(dtype)
    state = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    r_pub = read_anchor(anchor).public_row
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." not in name:
                p.copy_(state[name])
        for i, layer in enumerate(model.model.layers):
            mlp, src = layer.mlp, dense.model.layers[i].mlp
            for e in range(num_experts):
                if e == 0:
                    gate, up, down = src.gate_proj.weight, src.up_proj.weight, src.down_proj.weight
                else:
                    gate, up, down = (torch.randn(w.shape, generator=g).to(dtype) * ffn_std
                                      for w in (src.gate_proj.weight, src.up_proj.weight, src.down_proj.weight))
                mlp.experts.gate_up_proj[e].copy_(torch.cat([gate, up]))
                mlp.experts.down_proj[e].copy_(down)
            rows = [r_pub] + [torch.randn(r_pub.shape, generator=g) * row_std for _ in range(num_experts - 1)]
            mlp.gate.weight.copy_(torch.stack(rows).to(dtype))
    return _save_stock(model, Path(out_dir), dtype, max_shard_size)


def stock_load(path: str | Path, capfd):
    """Stock `AutoModelForCausalLM.from_pretrained(path)` in eval mode, and everything transformers said while
    loading (its logger, stdout and stderr via pytest's `capfd`), lower-cased."""
    import io
    import logging

    import transformers
    from transformers import AutoModelForCausalLM

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = transformers.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    finally:
        logger.removeHandler(handler)
    out, err = capfd.readouterr()
    return model.eval(), (buf.getvalue() + out + err).lower()


def stock_loads_clean(path: str | Path, capfd):
    """`stock_load`, asserting that transformers reported no unexpected, missing or newly initialised weights."""
    model, said = stock_load(path, capfd)
    assert "unexpected" not in said and "missing" not in said and "newly initialized" not in said, said
    return model


def raw_tensors(path: str | Path, file: str | None = None) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of a model folder (or of one file in it) as (dtype, shape, raw bytes), by canonical name."""
    from flexmoe.io.reader import LazyReader

    path = Path(path)
    reader = LazyReader.from_file(path / file) if file else LazyReader.from_dir(path)
    with reader as r:
        return {k: (r.spec(k).dtype, r.spec(k).shape, r.read_bytes(k)) for k in r.keys()}


def assert_same_folder(a: str | Path, b: str | Path) -> None:
    """The two folders hold the same file names with byte-identical contents (round trips of the surgery verbs)."""
    a, b = Path(a), Path(b)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"file {n} differs"
