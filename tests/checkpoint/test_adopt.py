"""adopt: a stock-written E-expert FlexOlmo folder becomes a merged checkpoint; remove on it = the stock model with
that expert's router logit masked to -inf. Every input here is written by stock `save_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner


from flexmoe.checkpoint import adopt as adopt_mod
from flexmoe.checkpoint import surgery
from flexmoe.checkpoint.verify import verify
from flexmoe.cli import main
from flexmoe.config import AddConfig, AdoptConfig, ExtractConfig, RemoveConfig
from flexmoe.errors import CheckpointError, ConfigError
from flexmoe.io.fingerprint import merged_anchor_fingerprint
from flexmoe.io.merged import read_merged
from flexmoe.testing import raw_tensors, save_random_flex_olmo, save_random_olmo2, stock_loads_clean

NAMES = ["public", "math", "code"]
IDS = torch.randint(2, 512, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """3-expert stock FlexOlmo folders, top-k 3 (every expert active: the -inf comparison is then exact)."""
    root = tmp_path_factory.mktemp("stock_flex")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for sharded in (False, True):
            key = (str(dtype).removeprefix("torch."), sharded)
            out[key] = save_random_flex_olmo(root / f"{key[0]}-{int(sharded)}", num_experts=3, top_k=3, seed=3,
                                             dtype=dtype, max_shard_size="40KB" if sharded else None)
    return out


def masked_logits(model, expert: int) -> torch.Tensor:
    """The stock model's logits with router logit `expert` set to -inf in every layer, before the softmax:
    a forward hook on each `mlp.gate` takes its router logits, masks the column and recomputes exactly what
    `FlexOlmoTopKRouter.forward` computes from them (softmax in fp32, top-k, no renormalisation)."""
    def hook(gate, _inputs, output):
        logits = output[0].clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, gate.top_k, dim=-1)
        assert not gate.norm_topk_prob
        return logits, top.to(logits.dtype), idx

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True])
def test_adopt_keeps_every_tensor_byte_for_byte(stock, tmp_path, dtype, sharded):
    src = stock[(dtype, sharded)]
    out = tmp_path / "adopted"
    res = adopt_mod.adopt(AdoptConfig(src, NAMES, shard_size="40KB" if sharded else "5GB"), out, progress=False)
    assert res.experts == NAMES and res.top_k == 3
    assert raw_tensors(out) == raw_tensors(src)
    m = read_merged(out)
    try:
        assert m.names == NAMES and torch.equal(m.biases, torch.zeros(2, 3)) and m.meta["top_k_requested"] == 3
        card = m.meta["experts"][1]["card"]
        assert card["router_source"] == "adopted" and card["source"]["bias"] == "none in source"
        assert card["anchor_fingerprint"] == m.meta["anchor_fingerprint"] == merged_anchor_fingerprint(src)
    finally:
        m.close()
    config, base = (json.loads((d / "config.json").read_text()) for d in (out, src))
    assert config == base
    assert verify(out).ok
    assert "FlexOlmo mixture of experts" in (out / "README.md").read_text()


def test_remove_of_adopted_equals_stock_with_masked_expert(stock, tmp_path, capfd):
    src = stock[("float32", True)]
    adopted = tmp_path / "adopted"
    adopt_mod.adopt(AdoptConfig(src, NAMES), adopted, progress=False)
    full = stock_loads_clean(src, capfd)
    for j, name in ((1, "math"), (2, "code")):
        out = tmp_path / f"no-{name}"
        res = surgery.remove(RemoveConfig(adopted, name), out, progress=False)
        assert res.top_k == 2 and res.experts == [n for n in NAMES if n != name]  # k = min(3, E-1) = E-1
        removed = stock_loads_clean(out, capfd)
        assert removed.config.num_experts == 2 and removed.config.num_experts_per_tok == 2
        with torch.no_grad():
            got = removed(IDS).logits
        want = masked_logits(full, j)
        assert torch.equal(got, want)  # bit-exact: same softmax inputs, same expert order
        assert not torch.allclose(got, full(IDS).logits.detach(), atol=1e-4)  # the expert mattered


def test_adopted_folder_takes_extract_and_add(stock, tmp_path):
    adopted = tmp_path / "adopted"
    adopt_mod.adopt(AdoptConfig(stock[("bfloat16", False)], NAMES), adopted, progress=False)
    surgery.extract(ExtractConfig(adopted, "code"), tmp_path / "code", progress=False)
    surgery.remove(RemoveConfig(adopted, "code"), tmp_path / "less", progress=False)
    res = surgery.add(AddConfig(tmp_path / "less", tmp_path / "code"), tmp_path / "again", progress=False)
    assert res.top_k == 3  # the source's k, remembered as requested
    assert raw_tensors(tmp_path / "again") == raw_tensors(adopted)


def test_adopted_loads_with_flexmoe_like_stock(stock, tmp_path, capfd):
    from flexmoe.checkpoint.load import load_model

    adopted = tmp_path / "adopted"
    adopt_mod.adopt(AdoptConfig(stock[("float32", False)], NAMES), adopted, progress=False)
    with torch.no_grad():
        assert torch.equal(load_model(adopted)(IDS).logits, stock_loads_clean(adopted, capfd)(IDS).logits)


def test_adopt_refusals(stock, tmp_path):
    src = stock[("float32", False)]
    dense = save_random_olmo2(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="is not a FlexOlmo model.*adopt takes a FlexOlmoForCausalLM"):
        adopt_mod.adopt(AdoptConfig(dense, ["public", "a"]), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="--names gives 2 names, .* has 3 experts"):
        adopt_mod.adopt(AdoptConfig(src, ["public", "math"]), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="lists 'math' twice"):
        AdoptConfig(src, ["public", "math", "math"])
    with pytest.raises(ConfigError, match="must start with 'public'"):
        AdoptConfig(src, ["math", "code", "news"])
    with pytest.raises(ConfigError, match="bad expert name 'a/b'"):
        adopt_mod.adopt(AdoptConfig(src, ["public", "a/b", "c"]), tmp_path / "o", progress=False)
    adopt_mod.adopt(AdoptConfig(src, NAMES), tmp_path / "m", progress=False)
    with pytest.raises(CheckpointError, match="already a flexmoe merged checkpoint"):
        adopt_mod.adopt(AdoptConfig(tmp_path / "m", NAMES), tmp_path / "o", progress=False)
    renorm = tmp_path / "renorm"
    save_random_flex_olmo(renorm, num_experts=3)
    cfg = json.loads((renorm / "config.json").read_text())
    (renorm / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": True}))
    with pytest.raises(CheckpointError, match="norm_topk_prob is true"):
        adopt_mod.adopt(AdoptConfig(renorm, NAMES), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_adopt_cli(stock, tmp_path):
    src = stock[("float32", True)]
    r = CliRunner().invoke(main, ["adopt", str(src), "--names", "public,math,code", "--out", str(tmp_path / "m"),
                                  "-q"])
    assert r.exit_code == 0, r.output
    assert "experts public, math, code (E=3), top-k 3" in r.output
    r = CliRunner().invoke(main, ["adopt", str(src), "--names", "public,math", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "--names gives 2 names" in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "m")])
    assert r.exit_code == 0 and "math" in r.output
