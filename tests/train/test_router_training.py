"""Router training (config.RouterTraining, docs/router.md): public text in the owner's batches, router-only public
tokens, the projected bias, the public routing loss, and what the card and the resume identity record."""

from __future__ import annotations

import pytest
import torch

from flexmoe import api
from flexmoe.config import (BiasUpdate, Device, ExpertSpec, PublicLoss, RouterInit, RouterSource, RouterTraining,
                            TrainConfig)
from flexmoe.errors import ConfigError
from flexmoe.io.package import read_package
from flexmoe.expert.upcycle import ExpertMoEBlock
from flexmoe.train.losses import public_route_loss


def _spec(train_inputs, rt: RouterTraining, **train) -> ExpertSpec:
    cfg = TrainConfig(**{**dict(max_steps=8, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2, log_every=2,
                                device=Device.CPU), **train})
    return ExpertSpec(name="code", data=[train_inputs.code], anchor=train_inputs.anchor,
                      router=RouterInit(source=RouterSource.RANDOM), router_training=rt, train=cfg)


def _biases(pkg) -> list[float]:
    return [float(pkg.reader.get(k)) for k in sorted(pkg.reader.keys()) if k.endswith("router.bias")]


def test_settings_parse_validate_and_paper_is_one_call():
    spec = ExpertSpec.load(None, {"router_training.public_ratio": 0.5, "router_training.public_loss": "router",
                                   "router_training.bias": "clamp", "router_training.public_data": ["p.jsonl"]})
    rt = spec.router_training
    assert (rt.public_ratio, rt.public_loss, rt.bias) == (0.5, PublicLoss.ROUTER, BiasUpdate.CLAMP)
    assert [str(p) for p in rt.public_data] == ["p.jsonl"]
    default = RouterTraining()
    assert (default.public_ratio, default.public_loss, default.bias) == (0.25, PublicLoss.FULL, BiasUpdate.PROJECT)
    assert (RouterTraining.paper().public_ratio, RouterTraining.paper().bias) == (0.0, BiasUpdate.CLAMP)
    assert [default.public_rows(b) for b in (2, 4, 16)] == [1, 1, 4]
    assert RouterTraining.paper().public_rows(16) == 0
    for bad, match in (({"router_training.public_ratio": 1.0}, "public_ratio"),
                       ({"router_training.bias": "zero"}, "project"),
                       ({"router_training.public_route_loss": -1}, "public_route_loss")):
        with pytest.raises(ConfigError, match=match):
            ExpertSpec.load(None, bad)


def test_the_default_needs_public_text(train_inputs, tmp_path):
    with pytest.raises(ConfigError, match="--public-data .* or --paper-router"):
        api.train_expert(_spec(train_inputs, RouterTraining()), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_public_tokens_train_only_the_router_when_asked():
    torch.manual_seed(0)
    H, I, N, n_pub = 8, 16, 10, 4
    block = ExpertMoEBlock(public_gate_up=torch.randn(2 * I, H), public_down=torch.randn(H, I),
                           public_row=torch.randn(H), owner_row=torch.randn(H), top_k=2)
    with torch.no_grad():
        block.owner_gate_up.add_(torch.randn(2 * I, H))  # owner FFN differs from the public one
    h = torch.randn(1, N, H)

    def grads(tokens: slice, detach: bool):
        block.zero_grad()
        block.public_tokens, block.detach_public = n_pub, detach
        block(h)[0, tokens].square().sum().backward()
        return block.owner_gate_up.grad.clone(), block.owner_row.grad.clone()

    ffn_all, row_all = grads(slice(None), detach=True)
    ffn_own, _ = grads(slice(0, N - n_pub), detach=True)
    _, row_pub = grads(slice(N - n_pub, None), detach=True)
    torch.testing.assert_close(ffn_all, ffn_own)  # the public tokens added nothing to the owner FFN's gradient
    assert row_pub.abs().sum() > 0  # ... but they still train the router row
    ffn_full, _ = grads(slice(None), detach=False)
    assert not torch.allclose(ffn_full, ffn_own)  # public_loss full: they train the FFN too


def test_public_route_loss_is_minus_log_p_public_on_the_public_tokens():
    torch.manual_seed(1)
    H, I = 8, 16
    block = ExpertMoEBlock(public_gate_up=torch.randn(2 * I, H), public_down=torch.randn(H, I),
                           public_row=torch.randn(H), owner_row=torch.randn(H), top_k=2)
    model = torch.nn.ModuleList([block])
    block(torch.randn(1, 6, H))
    assert public_route_loss(model) is None  # no public tokens: no term
    block.public_tokens = 2
    logits = block.router_logits[-2:]
    want = -torch.log_softmax(logits, dim=-1)[:, 0].mean()
    torch.testing.assert_close(public_route_loss(model), want)


def test_projected_bias_stays_trainable_and_the_card_records_the_setting(train_inputs, tmp_path):
    rt = RouterTraining(public_data=[train_inputs.public], public_loss=PublicLoss.ROUTER, public_route_loss=0.1)
    r = api.train_expert(_spec(train_inputs, rt, max_steps=12), tmp_path / "pkg", progress=False)
    pkg = read_package(r.path)
    biases = _biases(pkg)
    assert all(b <= 0 for b in biases) and min(biases) < 0  # stored already projected: min(b, 0) = b
    rec = pkg.card.hparams["router_training"]
    assert (rec["public_ratio"], rec["public_loss"], rec["bias"], rec["public_route_loss"]) == (0.25, "router",
                                                                                                "project", 0.1)
    assert rec["public_data"]["tokens"] > 0 and rec["public_data"]["documents"] > 0
    paper = api.train_expert(_spec(train_inputs, RouterTraining.paper(), max_steps=4), tmp_path / "paper",
                             progress=False)
    rec = read_package(paper.path).card.hparams["router_training"]
    assert (rec["public_ratio"], rec["bias"], rec["public_data"]) == (0.0, "clamp", None)


def test_public_text_changes_training_and_resume_refuses_another_setting(train_inputs, tmp_path):
    base = dict(max_steps=6, checkpoint_every=3)
    with_public = _spec(train_inputs, RouterTraining(public_data=[train_inputs.public]), **base)
    owner_only = _spec(train_inputs, RouterTraining.paper(), **base)
    a = read_package(api.train_expert(with_public, tmp_path / "a", progress=False).path)
    b = read_package(api.train_expert(owner_only, tmp_path / "b", progress=False).path)
    key = next(k for k in a.reader.keys() if "gate_proj" in k)
    assert not torch.equal(a.reader.get(key), b.reader.get(key))

    def stop_at_3(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.train_expert(with_public, tmp_path / "cut", on_step=stop_at_3, progress=False)
    other = _spec(train_inputs, RouterTraining(public_data=[train_inputs.public], public_ratio=0.5), **base)
    with pytest.raises(ConfigError, match="router_training"):
        api.train_expert(other, tmp_path / "cut", resume=True, progress=False)
    resumed = api.train_expert(with_public, tmp_path / "cut", resume=True, progress=False)
    assert resumed.train.resumed_from == 3
    c = read_package(resumed.path)
    for k in a.reader.keys():
        torch.testing.assert_close(c.reader.get(k), a.reader.get(k))  # public batches resume at the same place


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("loss", [PublicLoss.FULL, PublicLoss.ROUTER])
def test_compiled_cuda_training_with_public_text_matches_eager(train_inputs, tmp_path, loss):
    """The default on CUDA compiles each decoder layer: the public-token constants must compile to the same numbers."""
    rt = RouterTraining(public_data=[train_inputs.public], public_loss=loss, public_route_loss=0.1)
    pkgs = [read_package(api.train_expert(_spec(train_inputs, rt, max_steps=6, device=Device.CUDA, compile=c),
                                          tmp_path / f"c{int(c)}", progress=False).path) for c in (False, True)]
    assert all(b <= 0 for b in _biases(pkgs[1]))
    for key in pkgs[0].reader.keys():
        diff = (pkgs[0].reader.get(key).float() - pkgs[1].reader.get(key).float()).abs()
        assert float(diff.mean()) <= 1e-4, key  # other kernels sum in another order; Adam moves <= lr a step
