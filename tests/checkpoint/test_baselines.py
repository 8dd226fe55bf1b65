"""Model soup and router-row replacement, written by streaming from a merged checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexmoe.checkpoint.baselines import soup, with_router_rows
from flexmoe.errors import ConfigError, OutputExistsError
from flexmoe.io.reader import LazyReader
from flexmoe.io.keys import FFN_PROJS, expert_key, router_bias_key, router_key

BIAS = "flexmoe_router_bias.safetensors"


def _tensors(path, file=None):
    with (LazyReader.from_file(path / file) if file else LazyReader.from_dir(path)) as r:
        return {k: r.get(k) for k in r.keys()}


def test_soup_of_the_only_owner_is_that_owners_model(eval_models, tmp_path):
    src = eval_models.flex["flex2"]  # public + code
    out = soup(src, tmp_path / "soup")
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(src, BIAS).values(), _tensors(out, BIAS).values()))
    assert (out / "tokenizer.json").is_file()


def test_soup_of_one_of_several_owners(eval_models, tmp_path):
    src = eval_models.flex["flex3"]  # public, code, speeches
    a, b = _tensors(src), _tensors(soup(src, tmp_path / "soup", experts=["speeches"]))
    for L in range(2):
        for p in FFN_PROJS:
            assert torch.equal(b[expert_key(L, 0, p)], a[expert_key(L, 0, p)])
            assert torch.equal(b[expert_key(L, 1, p)], a[expert_key(L, 2, p)])
        assert torch.equal(b[router_key(L)], a[router_key(L)][[0, 2]])


def test_soup_averages_owners_and_loads_stock(eval_models, tmp_path):
    src = eval_models.flex["flex3"]
    out = soup(src, tmp_path / "soup")
    a, b = _tensors(src), _tensors(out)
    assert not any(".experts.2." in k for k in b)
    for L in range(2):
        for p in FFN_PROJS:
            mean = (a[expert_key(L, 1, p)] + a[expert_key(L, 2, p)]) / 2
            assert torch.allclose(b[expert_key(L, 1, p)], mean)
        w = a[router_key(L)]
        assert torch.allclose(b[router_key(L)], torch.stack([w[0], (w[1] + w[2]) / 2]))
        bias_in, bias_out = _tensors(src, BIAS)[router_bias_key(L)], _tensors(out, BIAS)[router_bias_key(L)]
        assert torch.allclose(bias_out, torch.stack([bias_in[0], bias_in[1:].mean()]))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (2, 2)
    meta = json.loads((out / "flexmoe.json").read_text())
    assert [e["name"] for e in meta["experts"]] == ["public", "soup"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    model(torch.tensor([[3, 4, 5]]))


def test_soup_refuses_bad_input(eval_models, tmp_path):
    src = eval_models.flex["flex3"]
    with pytest.raises(ConfigError, match="unknown expert 'legal'"):
        soup(src, tmp_path / "a", experts=["legal"])
    with pytest.raises(ConfigError, match="unknown expert 'public'"):
        soup(src, tmp_path / "a", experts=["public"])
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        soup(src, tmp_path / "exists")
    assert not (tmp_path / "a").exists()


def test_with_router_rows(eval_models, tmp_path):
    src = eval_models.flex["flex3"]
    rows = torch.randn(3, 64)
    a, b = _tensors(src), _tensors(with_router_rows(src, rows, tmp_path / "rows"))
    for k in a:
        assert torch.equal(b[k], rows if k.endswith("mlp.gate.weight") else a[k])
    per_layer = torch.randn(2, 3, 64)
    c = _tensors(with_router_rows(src, per_layer, tmp_path / "rows2"))
    assert torch.equal(c[router_key(1)], per_layer[1])
    with pytest.raises(ConfigError, match="do not fit"):
        with_router_rows(src, torch.randn(2, 64), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
