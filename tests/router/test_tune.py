"""Router tuning: only the owners' router rows and biases change, the proxy loss falls, and the output stays a
merged checkpoint that remove / add / extract and stock transformers handle."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flexmoe import api
from flexmoe.config import AddConfig, Device, ExtractConfig, RemoveConfig, RouterTuneConfig, router_tuning_train
from flexmoe.errors import ConfigError, OutputExistsError
from flexmoe.io.merged import BIAS_FILE, MERGED_META
from flexmoe.io.package import package_keys, read_package
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import package_row_key, parse_router_key, router_bias_key, router_key
from flexmoe.train.state import latest_checkpoint, work_dir

LAYERS = 2


def _cfg(inputs, **train) -> RouterTuneConfig:
    settings = dict(max_steps=20, seq_len=64, batch_size=4, lr=1e-2, log_every=5, device=Device.CPU) | train
    return RouterTuneConfig(merged=inputs.merged, data=[inputs.code, inputs.public],
                            train=dataclasses.replace(router_tuning_train(), **settings))


@pytest.fixture(scope="module")
def tuned(tune_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "rt"
    result = api.tune_router(_cfg(tune_inputs), out, progress=False)
    return result


def _tensors(path) -> dict[str, bytes]:
    with LazyReader.from_dir(path) as r:
        return {k: r.read_bytes(k) for k in r.keys()}


def _biases(path) -> torch.Tensor:
    with LazyReader.from_file(path / BIAS_FILE) as r:
        return torch.stack([r.get(router_bias_key(layer)) for layer in range(LAYERS)])  # (L, E)


def _router(path, layer: int) -> torch.Tensor:
    with LazyReader.from_dir(path) as r:
        return r.get(router_key(layer))


def test_only_owner_rows_and_biases_change(tune_inputs, tuned):
    before, after = _tensors(tune_inputs.merged), _tensors(tuned.path)
    assert list(before) == list(after)  # same names in the same (canonical) order
    for key in before:
        if parse_router_key(key) is None:
            assert after[key] == before[key], key  # experts and shared layers: byte-identical
    for layer in range(LAYERS):
        old, new = _router(tune_inputs.merged, layer), _router(tuned.path, layer)
        assert torch.equal(new[0], old[0])  # r_pub frozen
        assert not torch.equal(new[1:], old[1:])
    old_b, new_b = _biases(tune_inputs.merged), _biases(tuned.path)
    assert (new_b[:, 0] == 0).all() and not torch.equal(new_b[:, 1:], old_b[:, 1:])
    src = tune_inputs.merged
    assert (tuned.path / "config.json").read_bytes() == (src / "config.json").read_bytes()
    for name in ("tokenizer.json", "flexmoe_anchor.json", "flexmoe_router.safetensors"):
        assert (tuned.path / name).read_bytes() == (src / name).read_bytes(), name


def test_flexmoe_json_records_the_tuning(tune_inputs, tuned):
    before = json.loads((tune_inputs.merged / MERGED_META).read_text())
    meta = json.loads((tuned.path / MERGED_META).read_text())
    assert tuned.experts == ["code", "news"] and tuned.train.steps == 20
    assert meta["experts"][0] == {"name": "public"}
    for old, new in zip(before["experts"][1:], meta["experts"][1:]):
        (record,) = new.pop("router_tuning")
        assert new == old  # the owner's card is kept verbatim
        assert record["steps"] == 20 and record["data"]["documents"] == 120  # 60 code + 60 public documents
        assert record["hparams"]["weight_decay"] == 0.1 and record["hparams"]["router_z_loss"] == 1e-3
        assert record["hparams"]["warmup_steps"] == 2  # min(100, max_steps // 10)
    rest = lambda m: {k: v for k, v in m.items() if k not in ("experts", "files")}  # noqa: E731 (files: new bytes)
    assert rest(meta) == rest(before)


def test_tuning_lowers_the_proxy_loss(tune_inputs, tuned):
    from transformers import AutoTokenizer

    from flexmoe.data import load_documents, pack
    from flexmoe.train.loop import mean_loss

    tokenizer = AutoTokenizer.from_pretrained(str(tune_inputs.merged))
    data, _ = pack(load_documents([tune_inputs.code, tune_inputs.public]), tokenizer, 64, seed=1, progress=False)
    before = mean_loss(api.load_model(tune_inputs.merged), data, num_seqs=32)
    after = mean_loss(api.load_model(tuned.path), data, num_seqs=32)
    assert after < before - 0.02, (before, after)


def test_remove_add_and_extract_after_tuning(tune_inputs, tuned, tmp_path):
    api.remove(RemoveConfig(tuned.path, "code"), tmp_path / "no_code", progress=False)
    for layer in range(LAYERS):  # the removed expert's tuned row goes, the others' tuned rows stay
        assert torch.equal(_router(tmp_path / "no_code", layer), _router(tuned.path, layer)[[0, 2]])
    assert torch.equal(_biases(tmp_path / "no_code"), _biases(tuned.path)[:, [0, 2]])
    meta = json.loads((tmp_path / "no_code" / MERGED_META).read_text())
    assert [e["name"] for e in meta["experts"]] == ["public", "news"] and "router_tuning" in meta["experts"][1]

    api.add(AddConfig(tmp_path / "no_code", tune_inputs.law_pkg), tmp_path / "plus_law", progress=False)  # a new, untuned expert
    law = read_package(tune_inputs.law_pkg)
    assert torch.equal(_router(tmp_path / "plus_law", 0)[2], law.reader.get(package_row_key(0)))

    api.extract(ExtractConfig(tuned.path, "news"), tmp_path / "news", progress=False)  # gives back the tuned row and bias
    news = read_package(tmp_path / "news")
    for layer in range(LAYERS):
        assert torch.equal(news.reader.get(package_row_key(layer)), _router(tuned.path, layer)[2])
    assert sorted(news.reader.keys()) == sorted(package_keys(LAYERS))
    entry = next(e for e in json.loads((tuned.path / MERGED_META).read_text())["experts"] if e["name"] == "news")
    assert news.card.router_tuning == entry["router_tuning"] and len(news.card.router_tuning) == 1
    card = {k: v for k, v in entry["card"].items() if k != "files"}  # the package's manifest is not a card field
    assert news.card.to_json() == {**card, "router_tuning": entry["router_tuning"]}  # the card, + records
    api.extract(ExtractConfig(tmp_path / "plus_law", "law"), tmp_path / "law", progress=False)  # untuned: the package's card, byte for byte
    assert (tmp_path / "law" / "expert.json").read_bytes() == (tune_inputs.law_pkg / "expert.json").read_bytes()


def test_loads_with_stock_transformers(tuned):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(tuned.path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.model.layers[1].mlp.gate.weight, _router(tuned.path, 1))


def test_tunable_router_routes_like_the_biased_router():
    """Same routing as `BiasedTopKRouter` with the same weight and bias, and shifting every row by one vector (the
    freedom a trainable r_pub would add) changes no probability: why r_pub can stay frozen."""
    from transformers import FlexOlmoConfig

    from flexmoe.router.biased import BiasedTopKRouter
    from flexmoe.router.tune import TunableRouter

    config = FlexOlmoConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
    g = torch.Generator().manual_seed(0)
    biased = BiasedTopKRouter(config)
    with torch.no_grad():
        biased.weight.copy_(torch.randn(4, 16, generator=g))
        biased.expert_bias.copy_(torch.tensor([0.0, -0.5, 0.3, -1.0]))
    h = torch.randn(10, 16, generator=g)
    tunable = TunableRouter(biased, config)
    assert [n for n, p in tunable.named_parameters() if p.requires_grad] == ["owner_rows", "owner_bias"]
    for a, b in zip(biased(h), tunable(h)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(tunable.logits(h), biased.logits(h))  # the one step TunableRouter overrides
    logits = tunable(h)[0]
    assert tunable.router_logits is logits and not hasattr(biased, "router_logits")  # kept for the z-loss
    from flexmoe.train.losses import router_z_loss

    model = torch.nn.ModuleList([tunable, biased])
    torch.testing.assert_close(router_z_loss(model), torch.logsumexp(logits, -1).square().mean())
    shift = torch.randn(16, generator=g)
    with torch.no_grad():
        biased.weight += shift
    torch.testing.assert_close(torch.softmax(biased(h)[0], -1), torch.softmax(tunable(h)[0], -1))


def test_resume_continues_where_it_stopped(tune_inputs, tmp_path):
    cfg = _cfg(tune_inputs, max_steps=4, checkpoint_every=2)
    api.tune_router(cfg, tmp_path / "full", progress=False)

    def cut(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.tune_router(cfg, tmp_path / "cut", on_step=cut, progress=False)
    assert latest_checkpoint(work_dir(tmp_path / "cut")).name == "step_00000002"
    resumed = api.tune_router(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.train.resumed_from == 2
    for layer in range(LAYERS):
        torch.testing.assert_close(_router(tmp_path / "cut", layer), _router(tmp_path / "full", layer))
    torch.testing.assert_close(_biases(tmp_path / "cut"), _biases(tmp_path / "full"))


def test_refusals(tune_inputs, tuned, tmp_path):
    with pytest.raises(ConfigError, match="being tuned"):
        api.tune_router(_cfg(tune_inputs), tune_inputs.merged, overwrite=True, progress=False)
    with pytest.raises(OutputExistsError):
        api.tune_router(_cfg(tune_inputs), tuned.path, progress=False)
    api.remove(RemoveConfig(tune_inputs.merged, "code"), tmp_path / "one", progress=False)
    api.remove(RemoveConfig(tmp_path / "one", "news"), tmp_path / "none", progress=False)
    with pytest.raises(ConfigError, match="no owner row"):
        api.tune_router(dataclasses.replace(_cfg(tune_inputs), merged=tmp_path / "none"), tmp_path / "x",
                        progress=False)
    assert not (tmp_path / "x").exists() and not work_dir(tmp_path / "x").exists()
