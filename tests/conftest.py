"""Shared test fixtures. Each section belongs to one part of the code base; add yours as a new section."""

from __future__ import annotations

from pathlib import Path

import pytest
from flexmoe import presets

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


# ---- evaluation (tests/eval, tests/test_baselines.py, tests/cli/test_eval_cli.py) ----

def _save_byte_bpe_tokenizer(out: Path, vocab_size: int = 400) -> None:
    """A real byte-level BPE trained on the fixture text: ids 0/1 = EOS/pad (as in `tiny_olmo2_config`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in sorted(FIXTURES.glob("*/train.jsonl"))], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|pad|>").save_pretrained(str(out))


class EvalModels:
    """Directories of tiny random models that share one tokenizer (vocab 512 in the model, ~400 used)."""

    def __init__(self, root: Path):
        import json

        import torch
        from safetensors.torch import save_file
        from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

        from flexmoe.io.keys import router_bias_key
        from flexmoe.testing import save_random_olmo2, tiny_olmo2_config

        self.dense = save_random_olmo2(root / "dense", seed=0)
        _save_byte_bpe_tokenizer(self.dense)
        base = tiny_olmo2_config().to_dict()
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
                "tie_word_embeddings", "rope_parameters")
        self.flex: dict[str, Path] = {}
        for name, experts, k, seed in (("flex2", ["public", "code"], 1, 1),
                                        ("flex3", ["public", "code", "speeches"], 2, 2)):
            torch.manual_seed(seed)
            cfg = FlexOlmoConfig(**{key: base[key] for key in keep if key in base}, num_experts=len(experts),
                                 num_experts_per_tok=k, norm_topk_prob=False)
            model = FlexOlmoForCausalLM(cfg)
            with torch.no_grad():
                for layer in model.model.layers:  # spread routing over every expert
                    layer.mlp.gate.weight.normal_(0.0, 1.0)
            out = root / name
            model.save_pretrained(out)
            _save_byte_bpe_tokenizer(out)
            g = torch.Generator().manual_seed(seed)
            bias = {router_bias_key(L): torch.cat([torch.zeros(1), -torch.rand(len(experts) - 1, generator=g)])
                    for L in range(cfg.num_hidden_layers)}
            save_file(bias, str(out / "flexmoe_router_bias.safetensors"))
            (out / "flexmoe.json").write_text(json.dumps({
                "format": "flexmoe-merged/1", "anchor_fingerprint": "sha256:test", "top_k": k,
                "experts": [{"name": n} for n in experts]}))
            self.flex[name] = out


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory) -> EvalModels:
    return EvalModels(tmp_path_factory.mktemp("eval_models"))


@pytest.fixture(scope="session")
def eval_data() -> dict[str, Path]:
    """Held-out fixture text per domain."""
    return {d: FIXTURES / d / "eval.jsonl" for d in ("public", "code", "speeches")}


# ---- checkpoint tool (tests/checkpoint/test_surgery.py, tests/model/test_load.py, tests/cli/test_ckpt_cli.py, tests/io) ----

class CkptInputs:
    """Tiny anchors and expert packages, built once without any training code. Tests must not modify them."""

    def __init__(self, root: Path):
        import json

        import torch

        from flexmoe.testing import build_random_anchor, build_random_package

        self.root = root
        self.anchor = build_random_anchor(root / "anchor", seed=0)
        self.pkg = {name: build_random_package(root / name, self.anchor, name, seed)
                    for name, seed in (("code", 1), ("news", 2), ("law", 3))}
        # The same shapes, another anchor: its experts must be refused by `anchor`.
        self.anchor2 = build_random_anchor(root / "anchor2", seed=1, tokenizer=False)
        self.foreign = build_random_package(root / "foreign", self.anchor2, "foreign", 4)
        # Hidden size 32 but a card claiming `anchor`: must be refused for its shapes.
        self.anchor_h32 = build_random_anchor(root / "anchor_h32", seed=2, tokenizer=False, hidden_size=32,
                                              intermediate_size=64)
        fp = json.loads((self.anchor / "flexmoe_anchor.json").read_text())["fingerprint"]
        self.narrow = build_random_package(root / "narrow", self.anchor_h32, "narrow", 5, fingerprint=fp)
        # Zero biases (exactly the stock router) and a bf16 world.
        self.zero_bias = {n: build_random_package(root / f"{n}0", self.anchor, n, s, bias=0.0)
                          for n, s in (("code", 1), ("news", 2))}
        self.anchor_bf16 = build_random_anchor(root / "anchor_bf16", seed=3, dtype=torch.bfloat16, tokenizer=False)
        self.pkg_bf16 = {n: build_random_package(root / f"{n}_bf16", self.anchor_bf16, n, s)
                         for n, s in (("code", 1), ("news", 2))}


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> CkptInputs:
    return CkptInputs(tmp_path_factory.mktemp("ckpt"))


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (names relative to each path's parent): proves inputs untouched."""
    import hashlib

    out = {}
    for root in paths:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(Path(root).parent))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture
def digest():
    return tree_digest


# ---- training (tests/test_data.py, tests/test_embed.py, tests/model/test_upcycle.py, tests/train, tests/cli/test_train_cli.py) ----

_PUBLIC_WORDS = ("the lord god said unto them and it was good light darkness earth heaven waters day night "
                 "elizabeth bennet darcy sister mother ball fortune marriage man woman house letter walk").split()
_SPEECH_WORDS = ("congress nation people union states government economy war peace citizens freedom tax law "
                 "president year american future world work duty").split()


def write_corpus(path: Path, kind: str, n: int, seed: int = 0) -> Path:
    """Synthetic `.jsonl` text of one domain (public prose, python code or speeches), deterministic in `seed`."""
    import json
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if kind == "code":
            name, a, b = f"f{rng.randint(0, 999)}", rng.choice("xyzab"), rng.choice("pqrst")
            body = "".join(f"    if {a} > {rng.randint(0, 99)}:\n        {b} = {a} * {rng.randint(2, 9)}\n"
                           for _ in range(rng.randint(3, 8)))
            docs.append(f"def {name}({a}, {b}):\n{body}    return {a} + {b}\n")
        else:
            words = _PUBLIC_WORDS if kind == "public" else _SPEECH_WORDS
            docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(60, 160))).capitalize() + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


class TrainInputs:
    """Synthetic domain text, two random embedders (32-d: the anchor's, 48-d: a wrong one) and a tiny anchor
    trained for a few steps through `flexmoe.api.train_anchor`. Tests must not modify them."""

    def __init__(self, root: Path):
        from flexmoe import api
        from flexmoe.config import Device, TrainAnchorConfig
        from flexmoe.testing import build_random_embedder

        self.root = root
        self.public = write_corpus(root / "data" / "public.jsonl", "public", 60, seed=1)
        self.code = write_corpus(root / "data" / "code.jsonl", "code", 60, seed=2)
        self.speeches = write_corpus(root / "data" / "speeches.jsonl", "speeches", 40, seed=3)
        self.embedder = build_random_embedder(root / "embedder", dim=32, seed=0)
        self.embedder48 = build_random_embedder(root / "embedder48", dim=48, seed=1)
        cfg = TrainAnchorConfig(data=[self.public], embedder=self.embedder, preset="tiny", num_docs=20,
                                train=presets.training("tiny", max_steps=12, seq_len=64, batch_size=4,
                                                       device=Device.CPU))
        self.anchor_result = api.train_anchor(cfg, root / "anchor", progress=False)
        self.anchor = self.anchor_result.path


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory) -> TrainInputs:
    return TrainInputs(tmp_path_factory.mktemp("train"))


# ---- router tuning (tests/test_tune.py, tests/test_proxy.py, tests/cli/test_tune_cli.py) ----

class TuneInputs:
    """A merged checkpoint of the trained tiny anchor with two random owner experts ("code", "news": random FFNs
    that hurt, so tuned routers have something to learn), and public proxy text. Tests must not modify them."""

    def __init__(self, root: Path, train_inputs: TrainInputs):
        from flexmoe import api
        from flexmoe.config import MergeConfig
        from flexmoe.testing import build_random_package

        self.root = root
        self.anchor = train_inputs.anchor
        self.embedder = train_inputs.embedder
        self.public, self.code = train_inputs.public, train_inputs.code
        pkgs = [build_random_package(root / name, self.anchor, name, seed, ffn_std=0.1)
                for name, seed in (("code", 1), ("news", 2))]
        self.news_pkg = pkgs[1]
        self.law_pkg = build_random_package(root / "law", self.anchor, "law", 3, ffn_std=0.1)
        self.merged = api.merge(MergeConfig(self.anchor, pkgs), root / "merged", progress=False).out


@pytest.fixture(scope="session")
def tune_inputs(tmp_path_factory, train_inputs) -> TuneInputs:
    return TuneInputs(tmp_path_factory.mktemp("tune"), train_inputs)


@pytest.fixture(scope="session")
def corpus_writer():
    """`write_corpus` for tests (conftest is not importable under --import-mode=importlib)."""
    return write_corpus


@pytest.fixture(scope="session")
def bow_embedder(tmp_path_factory) -> Path:
    """A sentence-transformers bag-of-words embedder over the synthetic corpora's words: unlike the random BERT of
    `build_random_embedder`, single documents of different domains get clearly different vectors."""
    from sentence_transformers import SentenceTransformer, models

    vocab = sorted(set(_PUBLIC_WORDS + _SPEECH_WORDS) | {"def", "if", "return", "x", "y", "z", "a", "b"})
    out = tmp_path_factory.mktemp("bow") / "embedder"
    SentenceTransformer(modules=[models.BoW(vocab=vocab)], device="cpu").save(str(out))
    return out


# ---- inference (tests/infer/test_run.py, tests/eval/test_extraction.py) ----

@pytest.fixture
def deterministic_seen():
    """`torch.are_deterministic_algorithms_enabled()` as every module's forward saw it, in call order (a global
    forward pre-hook, removed after the test)."""
    import torch

    seen: list[bool] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda _module, _args: seen.append(torch.are_deterministic_algorithms_enabled()))
    yield seen
    handle.remove()
