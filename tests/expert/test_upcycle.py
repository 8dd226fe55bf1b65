from __future__ import annotations

import pytest
import torch

from flexmoe.io.anchor import read_anchor
from flexmoe.io.package import package_keys
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import dense_ffn_key, is_shared, package_bias_key, package_row_key
from flexmoe.expert.upcycle import (ExpertMoEBlock, expert_blocks, export_package_tensors, flex_config, import_package_tensors, upcycle)
from flexmoe.router.rows import hidden_mean_row, random_row

TRAINABLE = {"owner_gate_up", "owner_down", "owner_row", "bias"}


@pytest.fixture(scope="module")
def anchor(train_inputs):
    return read_anchor(train_inputs.anchor)


def _ids(vocab=500, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed=0):
    """Give the owner half its own values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in expert_blocks(model):
            b.owner_gate_up.add_(torch.randn(b.owner_gate_up.shape, generator=g) * 0.05)
            b.owner_down.add_(torch.randn(b.owner_down.shape, generator=g) * 0.05)
            b.owner_row.copy_(torch.randn(b.owner_row.shape, generator=g))


def test_at_init_top2_is_the_dense_anchor(anchor):
    from transformers import Olmo2ForCausalLM

    dense = Olmo2ForCausalLM.from_pretrained(anchor.path).eval()
    model = upcycle(anchor, torch.randn(64), top_k=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, dense(input_ids=_ids()).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_same_function_as_stock_flexolmo(anchor, top_k):
    """The merged checkpoint is a stock FlexOlmoForCausalLM: experts [public, owner], router [r_pub; r_i]."""
    from transformers import FlexOlmoForCausalLM, Olmo2Config

    model = upcycle(anchor, torch.randn(64), top_k=top_k).eval()
    _perturb(model)
    stock = FlexOlmoForCausalLM(flex_config(Olmo2Config.from_pretrained(anchor.path), top_k)).eval()
    shared = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    stock.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for layer, b in zip(stock.model.layers, expert_blocks(model)):
            layer.mlp.experts.gate_up_proj.copy_(torch.stack((b.public_gate_up, b.owner_gate_up)))
            layer.mlp.experts.down_proj.copy_(torch.stack((b.public_down, b.owner_down)))
            layer.mlp.gate.weight.copy_(torch.stack((b.public_row, b.owner_row)))
        ours, theirs = model(input_ids=_ids()).logits, stock(input_ids=_ids()).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    routed = torch.cat([b.router_logits.argmax(-1) for b in expert_blocks(model)])
    assert 0 < routed.float().mean() < 1  # both experts win some tokens: the comparison covers both paths


def test_bias_is_applied_as_min_b_0():
    torch.manual_seed(0)
    H, I = 8, 16
    block = ExpertMoEBlock(public_gate_up=torch.randn(2 * I, H), public_down=torch.randn(H, I),
                           public_row=torch.randn(H), owner_row=torch.randn(H), top_k=2)
    x = torch.randn(1, 5, H)

    def logits(b):
        with torch.no_grad():
            block.bias.fill_(b)
            block(x)
        return block.router_logits.clone()

    base = logits(0.0)
    assert torch.equal(logits(3.0), base)  # a positive bias has no effect: it can only push the owner away
    shifted = logits(-3.0)
    torch.testing.assert_close(shifted[:, 1], base[:, 1] - 3.0)
    assert torch.equal(shifted[:, 0], base[:, 0])


def test_shared_tensors_are_the_anchor_and_frozen(anchor):
    model = upcycle(anchor, torch.randn(64), top_k=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.{t}" for i in range(2) for t in TRAINABLE}
    params = dict(model.named_parameters())
    with LazyReader.from_dir(anchor.path) as r:
        for key in r.keys():
            if is_shared(key):
                assert torch.equal(params[key], r.get(key)), key
        for i, b in enumerate(expert_blocks(model)):
            gate, up, down = (r.get(dense_ffn_key(i, p)) for p in ("gate_proj", "up_proj", "down_proj"))
            assert torch.equal(b.public_gate_up, torch.cat((gate, up))) and torch.equal(b.public_down, down)
            assert torch.equal(b.owner_gate_up, b.public_gate_up)  # the owner starts as a copy
            assert torch.equal(b.public_row, anchor.public_row) and b.bias.item() == 0.0


def test_export_holds_exactly_the_package_tensors(anchor):
    model = upcycle(anchor, torch.randn(64), top_k=1)
    _perturb(model)
    expert_blocks(model)[0].bias.data.fill_(-0.5)
    out = export_package_tensors(model, torch.float32)
    assert list(out) == package_keys(2)
    b = expert_blocks(model)[1]
    assert torch.equal(torch.cat((out[dense_ffn_key(1, "gate_proj")], out[dense_ffn_key(1, "up_proj")])),
                       b.owner_gate_up)
    assert torch.equal(out[package_row_key(1)], b.owner_row) and out[package_bias_key(1)].shape == ()
    fresh = upcycle(anchor, torch.zeros(64), top_k=1)
    import_package_tensors(fresh, out)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_bf16_anchor_exports_bf16_ffn_and_row_f32_bias(tmp_path):
    from flexmoe.testing import build_random_anchor

    a = read_anchor(build_random_anchor(tmp_path / "a", dtype=torch.bfloat16))
    model = upcycle(a, torch.randn(64), top_k=2)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # trained in fp32
    with LazyReader.from_dir(a.path) as r:  # bf16 -> fp32 is exact, so the frozen values are the anchor's
        assert torch.equal(model.model.embed_tokens.weight.bfloat16(), r.get("model.embed_tokens.weight"))
    out = export_package_tensors(model, torch.bfloat16)
    assert out[dense_ffn_key(0, "down_proj")].dtype == torch.bfloat16 == out[package_row_key(0)].dtype
    assert out[package_bias_key(0)].dtype == torch.float32


def test_ablation_rows_have_the_norm_of_r_pub(anchor, train_inputs):
    from transformers import AutoTokenizer

    from flexmoe.data import load_documents, pack

    r1, r2 = random_row(anchor.public_row, 0), random_row(anchor.public_row, 0)
    assert torch.equal(r1, r2) and not torch.equal(r1, random_row(anchor.public_row, 1))
    torch.testing.assert_close(r1.norm(), anchor.public_row.norm())
    tok = AutoTokenizer.from_pretrained(str(anchor.path))
    data, _ = pack(load_documents([train_inputs.code]), tok, 32, progress=False)
    h = hidden_mean_row(anchor, data, num_seqs=6, batch_size=4)
    assert h.shape == (64,)
    torch.testing.assert_close(h.norm(), anchor.public_row.norm())
    torch.testing.assert_close(h, hidden_mean_row(anchor, data, num_seqs=6, batch_size=3))  # same blocks, any batching


def test_frozen_matmul_weights_held_in_bf16_give_the_same_bf16_run(anchor):
    """bf16 training builds the frozen matmul weights in bf16 at once: the owner's FFN still starts as the exact
    fp32 anchor FFN, embeddings and norms stay fp32, and under autocast the logits are those of the fp32 build."""
    row = torch.randn(64, generator=torch.Generator().manual_seed(3))
    full, held = upcycle(anchor, row), upcycle(anchor, row, frozen_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == {
        n for n, p in held.named_parameters()
        if n.endswith(("_proj.weight", "public_gate_up", "public_down")) or n == "lm_head.weight"}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.float32
    with LazyReader.from_dir(anchor.path) as reader:
        for i, block in enumerate(expert_blocks(held)):
            gate, up = (reader.get(dense_ffn_key(i, p)).float() for p in ("gate_proj", "up_proj"))
            assert torch.equal(block.owner_gate_up, torch.cat((gate, up)))
            assert block.owner_gate_up.dtype == torch.float32 and block.owner_gate_up.requires_grad
    _perturb(full), _perturb(held)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = full(_ids()).logits, held(_ids()).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_skeleton_holds_no_data_and_fill_puts_every_tensor_once(anchor):
    """What FSDP relies on: the skeleton allocates nothing, and `fill_expert_` hands every parameter its full
    value exactly once, through `put`, giving the model `upcycle` builds."""
    from flexmoe.expert.upcycle import expert_skeleton, fill_expert_
    from flexmoe.testing import drop_manifest

    skeleton = expert_skeleton(anchor, top_k=2)
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    row = torch.randn(64, generator=torch.Generator().manual_seed(5))
    skeleton.to_empty(device="cpu")
    seen = []

    def put(param, value):
        seen.append(id(param))
        param.copy_(value)

    fill_expert_(skeleton, anchor, row, put)
    assert sorted(seen) == sorted(id(p) for p in skeleton.parameters())
    reference = upcycle(anchor, row, top_k=2)
    for (name, a), (_, b) in zip(skeleton.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(skeleton.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_fill_refuses_an_anchor_missing_a_tensor(anchor, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from flexmoe.errors import CheckpointError
    from flexmoe.expert.upcycle import expert_skeleton, fill_expert_
    from flexmoe.testing import drop_manifest

    broken = tmp_path / "anchor"
    shutil.copytree(anchor.path, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    drop_manifest(broken)  # else read_anchor refuses the changed file before the tensor check is reached
    model = expert_skeleton(anchor).to_empty(device="cpu")
    with pytest.raises(CheckpointError, match="k_proj.weight' is missing from the anchor"):
        fill_expert_(model, read_anchor(broken), torch.zeros(64))
