"""A tiny CPU quality check per anchor family (slow suite): an anchor trained briefly on fixtures/public, two
owners (code, speeches) train experts against it on their fixtures, and the merge of both beats the anchor in
bits per byte on each owner's held-out domain. OLMo-2 anchors come from `flexmoe.api.train_anchor`; a Qwen3 or
Llama anchor is the stock dense class of the same shape and tokenizer, trained by flexmoe's loop
(`flexmoe.train.loop.train`) on the same public text, then adopted with `init-anchor`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
DOMAINS = ("code", "speeches")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def olmo_anchor(tmp_path_factory):
    from flexmoe import api, presets
    from flexmoe.config import Device, TrainAnchorConfig
    from flexmoe.testing import build_random_embedder

    root = tmp_path_factory.mktemp("quality")
    embedder = build_random_embedder(root / "embedder", dim=64)
    res = api.train_anchor(TrainAnchorConfig(data=[FIX / "public" / "train.jsonl"], embedder=embedder, preset="tiny",
                                             train=presets.training("tiny", device=Device.CPU)),
                           root / "olmo2", progress=False)
    return res.path, embedder, root


def _dense_anchor(family: str, olmo: Path, embedder: Path, root: Path) -> Path:
    """The stock dense `family` model of the tiny preset's shape, trained like the OLMo-2 anchor, adopted."""
    import transformers

    from flexmoe import api, presets
    from flexmoe.config import Device, InitAnchorConfig
    from flexmoe.data import load_documents, pack
    from flexmoe.data import load_tokenizer
    from flexmoe.train.loop import train

    shape = presets.get("tiny")
    tok = load_tokenizer(olmo, "tokenizer")
    cfg = transformers.AutoConfig.from_pretrained(olmo).to_dict()
    kw = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                              "rms_norm_eps", "eos_token_id", "pad_token_id", "bos_token_id", "tie_word_embeddings")}
    cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    torch.manual_seed(0)
    model = cls[1](cls[0](**kw, head_dim=kw["hidden_size"] // kw["num_attention_heads"]))
    tcfg = presets.training("tiny", device=Device.CPU).for_context(shape.max_position_embeddings)
    data, _ = pack(load_documents([FIX / "public" / "train.jsonl"]), tok, tcfg.seq_len, progress=False)
    _, model = train(model, data, tcfg, work_dir=root / f"{family}-work", progress=False)
    dense = root / f"{family}-dense"
    model.save_pretrained(dense)
    tok.save_pretrained(str(dense))
    out = root / family
    api.init_anchor(InitAnchorConfig(model=dense, public_data=[FIX / "public" / "train.jsonl"], embedder=embedder,
                                     num_docs=50, device="cpu"), out, progress=False)
    return out


def bits_per_byte(model, tok, path: Path) -> float:
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for line in path.read_text().splitlines():
            text = json.loads(line)["text"]
            ids = tok(text, return_tensors="pt").input_ids[:, :256]
            logits = model(ids).logits[0, :-1].float()
            nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            nbytes += len(tok.decode(ids[0, 1:]).encode())
    return nats / math.log(2) / nbytes


@pytest.mark.parametrize("family", ["olmo2", "qwen3", "llama"])
def test_merge_of_two_experts_beats_its_anchor_on_both_owner_domains(family, olmo_anchor, tmp_path):
    import transformers

    from flexmoe import api
    from flexmoe.checkpoint.load import load_model
    from flexmoe.config import ExpertSpec, MergeConfig
    from flexmoe.data import load_tokenizer

    olmo, embedder, root = olmo_anchor
    anchor = olmo if family == "olmo2" else _dense_anchor(family, olmo, embedder, root)
    experts = []
    for name in DOMAINS:
        spec = ExpertSpec.load(ROOT / "experts" / "demo" / f"{name}.yaml",
                               {"anchor": anchor, "embedder": embedder, "train.device": "cpu",
                                "data": [str(FIX / name / "train.jsonl")],
                                "router_training.public_data": [str(FIX / "public" / "train.jsonl")]})
        experts.append(api.train_expert(spec, tmp_path / name, progress=False).path)
    merged = api.merge(MergeConfig(anchor, experts), tmp_path / "merged", progress=False).out
    tok = load_tokenizer(anchor, "tokenizer")
    dense = transformers.AutoModelForCausalLM.from_pretrained(anchor).eval()
    moe = load_model(merged)
    for name in DOMAINS:
        before = bits_per_byte(dense, tok, FIX / name / "eval.jsonl")
        after = bits_per_byte(moe, tok, FIX / name / "eval.jsonl")
        print(f"{family} {name}: anchor {before:.4f} bpb, merged {after:.4f} bpb")  # for `pytest -s` reports
        assert after < before, f"{family} {name}: merged {after:.3f} bpb, anchor {before:.3f}"
