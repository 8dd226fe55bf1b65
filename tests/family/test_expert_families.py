"""train-expert on the anchors of other families (Qwen3 -> Qwen3Moe, Llama -> Mixtral): the upcycled model is the
family's stock MoE class with `ExpertMoEBlock`s (both are pre-norm: the block, and so the router, reads the
post-attention RMS-normalised residual), it is the dense anchor at init, its frozen tensors stay bit-identical
through training, and the package merges onto the anchor (for Mixtral a k = E folder)."""

from __future__ import annotations

import json

import pytest
import torch

from flexmoe.checkpoint import surgery
from flexmoe.checkpoint.load import load_model
from flexmoe.config import Device, ExpertSpec, MergeConfig, RouterInit, RouterSource, RouterTraining, TrainConfig
from flexmoe.expert.upcycle import expert_blocks, upcycle
from flexmoe.io.anchor import read_anchor
from flexmoe.io.keys import dense_ffn_key, is_shared
from flexmoe.io.package import read_package
from flexmoe.io.reader import LazyReader
from flexmoe.testing import build_random_anchor

IDS = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(0))


# family -> (the MoE class train-expert upcycles to, the anchor's dense class)
FAMILIES = {"qwen3": ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM"), "llama": ("MixtralForCausalLM", "LlamaForCausalLM")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def anchor(family, tmp_path_factory):
    return read_anchor(build_random_anchor(tmp_path_factory.mktemp(family) / "anchor", family=family))


def test_upcycle_is_the_dense_anchor_at_init(family, anchor):
    import transformers

    moe_class, dense_class = FAMILIES[family]
    model = upcycle(anchor, torch.randn(64), top_k=2).eval()
    assert type(model).__name__ == moe_class and len(expert_blocks(model)) == 2
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"owner_gate_up", "owner_down", "owner_row", "bias"}
    dense = getattr(transformers, dense_class).from_pretrained(anchor.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, dense(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_train_expert_keeps_frozen_tensors_and_merges(anchor, tmp_path):
    from flexmoe import api

    data = tmp_path / "owner.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 300}" for j in range(80))}) + "\n"
                            for i in range(20)))
    spec = ExpertSpec(name="owner", data=[data], anchor=anchor.path, router=RouterInit(source=RouterSource.RANDOM),
                      router_training=RouterTraining(public_ratio=0),
                      train=TrainConfig(max_steps=3, batch_size=2, seq_len=32, lr=1e-2, device=Device.CPU))
    with LazyReader.from_dir(anchor.path) as r:
        before = {k: r.get(k).clone() for k in r.keys()}
    res = api.train_expert(spec, tmp_path / "pkg", progress=False)
    with LazyReader.from_dir(anchor.path) as r:
        assert all(torch.equal(r.get(k), v) for k, v in before.items())  # the anchor is never written
    pkg = read_package(tmp_path / "pkg")
    try:
        ffn = pkg.reader.get(dense_ffn_key(0, "down_proj"))
        assert not torch.equal(ffn, before[dense_ffn_key(0, "down_proj")])  # the owner FFN trained
    finally:
        pkg.close()
    surgery.merge(MergeConfig(anchor.path, [res.path]), tmp_path / "m", progress=False)
    model = load_model(tmp_path / "m")
    sd = model.state_dict()
    for k, v in before.items():  # shared tensors bit-identical in the merged model
        if is_shared(k):
            assert torch.equal(sd[k], v), k
    with torch.no_grad():
        assert model(IDS).logits.isfinite().all()
