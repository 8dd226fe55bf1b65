from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flexmoe import api, presets
from flexmoe.config import Device, ExpertSpec, RouterInit, RouterSource, RouterTraining, TrainConfig
from flexmoe.errors import OutputExistsError
from flexmoe.io.anchor import read_anchor
from flexmoe.io.fingerprint import anchor_fingerprint
from flexmoe.io.package import PACKAGE_CARD, PACKAGE_TENSORS, package_keys, read_package
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import dense_ffn_key, is_shared
from flexmoe.expert.upcycle import expert_blocks, upcycle
from flexmoe.router.rows import random_row
from flexmoe.train.loop import lr_at, mean_loss, train
from flexmoe.train.state import OPTIMIZER, latest_checkpoint, work_dir


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2, log_every=2, device=Device.CPU)
    return TrainConfig(**{**base, **kw})


def _spec(train_inputs, **kw) -> ExpertSpec:
    base = dict(name="code", data=[train_inputs.code], anchor=train_inputs.anchor, embedder=train_inputs.embedder,
                router=RouterInit(source=RouterSource.RANDOM), router_training=RouterTraining(
                    public_data=[train_inputs.public]), train=_cfg())
    return ExpertSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def run(train_inputs, tmp_path_factory):
    """One expert trained through the shared loop, with a checkpoint at the end."""
    from transformers import AutoTokenizer

    from flexmoe.data import load_documents, pack

    anchor = read_anchor(train_inputs.anchor)
    data, _ = pack(load_documents([train_inputs.code]), AutoTokenizer.from_pretrained(str(anchor.path)), 64,
                   progress=False)
    model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
    before = mean_loss(model, data, num_seqs=16)
    work = tmp_path_factory.mktemp("work")
    cfg = _cfg(max_steps=30, checkpoint_every=30, log_every=5)
    result, model = train(model, data, cfg, work_dir=work, progress=False)
    return dict(anchor=anchor, model=model, result=result, before=before, after=mean_loss(model, data, num_seqs=16),
                work=work, cfg=cfg)


def test_lr_schedule_warms_up_then_decays_to_min_ratio():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_shared_tensors_public_ffn_and_r_pub_never_change(run):
    params = dict(run["model"].named_parameters())
    with LazyReader.from_dir(run["anchor"].path) as r:
        for key in r.keys():
            if is_shared(key):
                assert torch.equal(params[key], r.get(key)), f"{key} changed"
        for i, b in enumerate(expert_blocks(run["model"])):
            gate, up = r.get(dense_ffn_key(i, "gate_proj")), r.get(dense_ffn_key(i, "up_proj"))
            assert torch.equal(b.public_gate_up, torch.cat((gate, up)))
            assert torch.equal(b.public_down, r.get(dense_ffn_key(i, "down_proj")))
            assert torch.equal(b.public_row, run["anchor"].public_row)
            assert not torch.equal(b.owner_gate_up, b.public_gate_up), "owner FFN did not train"
            assert not torch.equal(b.owner_down, b.public_down)


def test_owner_loss_falls_on_its_domain(run):
    assert run["after"] < run["before"] - 0.2, (run["before"], run["after"])
    losses = [loss for _, loss in run["result"].losses]
    assert losses[-1] < losses[0] and run["result"].steps == 30
    assert run["result"].tokens == 30 * 4 * 64 and run["result"].tokens_per_s > 0


def test_bias_trains_and_stays_at_most_zero_in_effect(run):
    biases = torch.stack([b.bias.detach() for b in expert_blocks(run["model"])])
    assert (biases != 0).any(), "the expert bias got no gradient"
    assert (biases.clamp(max=0) <= 0).all()


def test_no_optimizer_state_for_frozen_tensors(run):
    opt = torch.load(latest_checkpoint(run["work"]) / OPTIMIZER, weights_only=True)
    trainable = [p for p in run["model"].parameters() if p.requires_grad]
    assert len(opt["state"]) == len(trainable) == 4 * 2  # owner gate_up, down, row, bias per layer
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(trainable)
    state_numel = sum(s["exp_avg"].numel() for s in opt["state"].values())
    assert state_numel == sum(p.numel() for p in trainable) < sum(p.numel() for p in run["model"].parameters()) / 2


def test_resume_continues_where_it_stopped(train_inputs, tmp_path):
    spec = _spec(train_inputs, train=_cfg(checkpoint_every=2))
    full = api.train_expert(spec, tmp_path / "full", progress=False)

    def kill_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.train_expert(spec, tmp_path / "cut", on_step=kill_at_4, progress=False)
    assert not (tmp_path / "cut").exists()  # no partial package
    assert latest_checkpoint(work_dir(tmp_path / "cut")).name == "step_00000004"
    with pytest.raises(OutputExistsError, match="--resume"):
        api.train_expert(spec, tmp_path / "cut", progress=False)
    resumed = api.train_expert(spec, tmp_path / "cut", resume=True, progress=False)
    assert (resumed.train.steps, resumed.train.resumed_from) == (full.train.steps, 4) == (8, 4)
    assert resumed.train.final_loss == pytest.approx(full.train.final_loss, abs=1e-4)
    a, b = read_package(tmp_path / "full"), read_package(tmp_path / "cut")
    for key in package_keys(2):  # same data order, optimizer state and schedule: the same expert
        torch.testing.assert_close(a.reader.get(key), b.reader.get(key), atol=1e-5, rtol=1e-5)
    assert not work_dir(tmp_path / "cut").exists()


def test_anchor_training_resumes_to_the_same_anchor(train_inputs, tmp_path):
    from flexmoe.config import TrainAnchorConfig
    from flexmoe.router.embed import MeanEmbedding, embedder_identity, write_row_file

    row = write_row_file(tmp_path / "pub.row", MeanEmbedding(torch.randn(32), 1, 1, 0),
                         embedder_identity(train_inputs.embedder))  # r_pub given: no embedder to load three times
    cfg = TrainAnchorConfig(data=[train_inputs.public], public_row=row, train=presets.training(
        "tiny", max_steps=6, seq_len=64, batch_size=2, checkpoint_every=2, device=Device.CPU))
    full = api.train_anchor(cfg, tmp_path / "full", progress=False)

    def kill_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.train_anchor(cfg, tmp_path / "cut", on_step=kill_at_4, progress=False)
    assert not (tmp_path / "cut").exists() and (work_dir(tmp_path / "cut") / "tokenizer").is_dir()
    resumed = api.train_anchor(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.train.steps == 6 and resumed.fingerprint == full.fingerprint  # bit-identical weights


def test_package_holds_only_the_trained_tensors_and_a_card(train_inputs, tmp_path):
    from flexmoe.router.embed import embedder_identity

    spec = _spec(train_inputs, router=RouterInit(source=RouterSource.EMBEDDING, num_docs=10),
                 train=_cfg(max_steps=4))
    r = api.train_expert(spec, tmp_path / "code", progress=False)
    pkg = read_package(r.path)
    assert pkg.reader.keys() == sorted(package_keys(2))
    H, I, L = 64, 256, 2  # one FFN stack + a row and a bias per layer, nothing shared
    assert r.package_bytes == (tmp_path / "code" / PACKAGE_TENSORS).stat().st_size
    assert L * (3 * H * I + H + 1) * 4 < r.package_bytes < L * (3 * H * I + H + 1) * 4 + 4096
    assert sorted(p.name for p in r.path.iterdir()) == [PACKAGE_CARD, PACKAGE_TENSORS]
    card = pkg.card
    assert card.name == "code" and card.steps == 4 and math.isfinite(card.final_loss)
    assert card.anchor_fingerprint == read_anchor(train_inputs.anchor).meta.fingerprint
    assert card.embedder == embedder_identity(train_inputs.embedder).__dict__
    assert card.router_source == "embedding" and card.hparams["lr"] == 3e-3 and card.hparams["train_top_k"] == 2
    assert set(card.data) == {"files", "documents", "bytes", "tokens"} and card.data["documents"] == 60
    text = (r.path / PACKAGE_CARD).read_text()
    first_doc = json.loads(Path(train_inputs.code).read_text().splitlines()[0])["text"]
    assert str(train_inputs.code.name) not in text and first_doc[:20] not in text  # sizes only, never content


@pytest.mark.parametrize("source", ["row-file", "hidden-mean"])
def test_router_sources_are_recorded(train_inputs, tmp_path, source):
    from flexmoe.config import EmbedConfig

    row_file = None
    if source == "row-file":
        row_file = api.embed_domain(EmbedConfig(data=[train_inputs.code], embedder=train_inputs.embedder,
                                                num_docs=10, device=Device.CPU), tmp_path / "code.row",
                                    progress=False).path
    spec = _spec(train_inputs, router=RouterInit(source=RouterSource(source), row_file=row_file, num_docs=8),
                 train=_cfg(max_steps=2))
    r = api.train_expert(spec, tmp_path / "pkg", progress=False)
    card = read_package(r.path).card
    assert card.router_source == source
    assert (card.embedder is not None) == (source == "row-file")


def test_dense_mode_is_the_no_coordination_baseline(train_inputs, tmp_path):
    from flexmoe.config import ExpertMode

    spec = _spec(train_inputs, mode=ExpertMode.DENSE, train=_cfg(max_steps=3))
    r = api.train_expert(spec, tmp_path / "dense", progress=False)
    pkg = read_package(r.path)
    anchor = read_anchor(train_inputs.anchor)
    assert pkg.card.hparams["mode"] == "dense" and pkg.reader.keys() == sorted(package_keys(2))
    with LazyReader.from_dir(anchor.path) as a:
        assert not torch.equal(pkg.reader.get(dense_ffn_key(0, "up_proj")), a.get(dense_ffn_key(0, "up_proj")))
    assert torch.equal(pkg.reader.get("model.layers.1.mlp.router.weight"), random_row(anchor.public_row, 0))
    assert pkg.reader.get("model.layers.1.mlp.router.bias").item() == 0.0


def test_top1_bf16_and_grad_accum(train_inputs, tmp_path):
    spec = _spec(train_inputs, train_top_k=1, train=_cfg(max_steps=2, bf16=True, grad_accum=2))
    r = api.train_expert(spec, tmp_path / "k1", progress=False)
    assert r.train.steps == 2 and math.isfinite(r.train.final_loss) and r.train.tokens == 2 * 2 * 4 * 64
    assert read_package(r.path).card.hparams["train_top_k"] == 1


def test_trained_anchor_is_complete(train_inputs):
    from transformers import AutoConfig, AutoTokenizer

    res = train_inputs.anchor_result
    anchor = read_anchor(res.path)
    assert res.fingerprint == anchor.meta.fingerprint == anchor_fingerprint(res.path)
    assert AutoConfig.from_pretrained(str(res.path)).model_type == "olmo2"
    tok = AutoTokenizer.from_pretrained(str(res.path))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    # the embedder (32-d) is narrower than the model (64): a fixed projection was drawn and stored
    assert anchor.meta.projection.in_dim == 32 and anchor.projection.shape == (64, 32)
    assert anchor.public_row.shape == (64,) and anchor.meta.embedder.dim == 32
    assert res.train.steps == 12 and res.train.final_loss < math.log(1024)
    assert not work_dir(res.path).exists()
