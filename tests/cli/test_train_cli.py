from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flexmoe.cli import main
from flexmoe.io.fingerprint import anchor_fingerprint
from flexmoe.io.package import read_package


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _expert_yaml(path: Path, data: Path) -> Path:
    path.write_text(f"name: code\ndata: [{data}]\nrouter:\n  source: embedding\n  num_docs: 5\n"
                    "train:\n  max_steps: 50\n  batch_size: 4\n  seq_len: 64\n  lr: 3.0e-3\n  device: cpu\n")
    return path


def test_help_has_examples():
    for cmd in ("train-anchor", "init-anchor", "embed-domain", "train-expert"):
        r = _run(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd


def test_whole_flow_through_the_cli(train_inputs, tmp_path):
    r = _run("train-anchor", "--data", train_inputs.public, "--embedder", train_inputs.embedder, "--out", "anchor",
             "--preset", "tiny", "--max-steps", 3, "--seq-len", 64, "--batch-size", 4, "--num-docs", 5,
             "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "anchor written to anchor" in r.output and json.loads((tmp_path / "anchor" / "flexmoe_anchor.json").read_text())
    r = _run("embed-domain", "--data", train_inputs.code, "--embedder", train_inputs.embedder, "--out", "code.row",
             "--num-docs", 5, "--device", "cpu")
    assert r.exit_code == 0 and "written to code.row" in r.output, r.output
    spec = _expert_yaml(tmp_path / "code.yaml", train_inputs.code)
    r = _run("train-expert", "--config", spec, "--anchor", "anchor", "--out", "code", "--router-row", "code.row",
             "--max-steps", 3, "--set", "train_top_k=1", "--set", "train.warmup_steps=1",  # flags override the spec
             "--public-data", train_inputs.public)
    assert r.exit_code == 0, r.output
    card = read_package(tmp_path / "code").card
    assert (card.name, card.steps, card.router_source, card.hparams["train_top_k"]) == ("code", 3, "row-file", 1)
    assert card.hparams["warmup_steps"] == 1 and card.hparams["mode"] == "flexolmo"
    assert "expert 'code' written to code" in r.output


def test_anchor_from_a_public_row_file(train_inputs, tmp_path):
    """Where the embedder cannot go (a GPU box): embed the public data elsewhere, carry the row file."""
    from flexmoe.router.embed import embedder_identity
    from flexmoe.io.anchor import read_anchor

    r = _run("embed-domain", "--data", train_inputs.public, "--embedder", train_inputs.embedder, "--out", "pub.row",
             "--num-docs", 5, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = _run("train-anchor", "--data", train_inputs.public, "--public-row", "pub.row", "--out", "anchor",
             "--max-steps", 2, "--seq-len", 64, "--batch-size", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    anchor = read_anchor(tmp_path / "anchor")
    assert anchor.meta.embedder == embedder_identity(train_inputs.embedder) and anchor.projection.shape == (64, 32)


def test_init_anchor_adopts_an_olmo2_directory(train_inputs, tmp_path):
    from flexmoe.testing import save_random_olmo2, save_tiny_tokenizer

    src = save_random_olmo2(tmp_path / "hf")
    save_tiny_tokenizer(src)
    r = _run("init-anchor", "--model", src, "--public-data", train_inputs.public, "--embedder",
             train_inputs.embedder, "--out", "adopted", "--num-docs", 5, "--device", "cpu")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "adopted" / "flexmoe_anchor.json").read_text())
    assert meta["fingerprint"] == anchor_fingerprint(src) and meta["dtype"] == "float32"
    assert (tmp_path / "adopted" / "tokenizer.json").is_file()


def _not_olmo2(tmp: Path) -> Path:
    d = tmp / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return d


def _existing(tmp: Path) -> Path:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine")
    return tmp / "taken"


ERRORS = {
    "missing data": (lambda t, i: ["train-anchor", "--data", "nope.jsonl", "--embedder", i.embedder, "--out", "a"],
                     "does not exist"),
    "empty data": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", (t / "e.jsonl").write_text("")
                                 or t / "e.jsonl", "--name", "x", "--embedder", i.embedder, "--out", "a"], "empty"),
    "unknown preset": (lambda t, i: ["train-anchor", "--data", i.public, "--embedder", i.embedder, "--out", "a",
                                     "--preset", "huge"], "unknown preset 'huge'"),
    "anchor not olmo2": (lambda t, i: ["train-expert", "--anchor", _not_olmo2(t), "--data", i.code, "--name", "x",
                                       "--embedder", i.embedder, "--out", "a"], "not an OLMo-2"),
    "init non-olmo2": (lambda t, i: ["init-anchor", "--model", _not_olmo2(t), "--public-data", i.public,
                                     "--embedder", i.embedder, "--out", "a"], "not an OLMo-2 model"),
    "embedder dim": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", i.code, "--name", "x",
                                   "--embedder", i.embedder48, "--out", "a"], "dimension 48"),
    "out exists": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", i.code, "--name", "x",
                                 "--embedder", i.embedder, "--out", _existing(t)], "already exists"),
    "name with slash": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", i.code, "--name", "../evil",
                                      "--embedder", i.embedder, "--out", "a"], "bad expert name"),
    "row of another embedder": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", i.code, "--name", "x",
                                              "--router-row", _row48(t, i), "--out", "a"], "dimension 48"),
    "no public text": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", i.code, "--name", "x",
                                     "--embedder", i.embedder, "--out", "a"], "or --paper-router"),
    "paper with a ratio": (lambda t, i: ["train-expert", "--anchor", i.anchor, "--data", i.code, "--name", "x",
                                         "--embedder", i.embedder, "--out", "a", "--paper-router",
                                         "--set", "router_training.public_ratio=0.5"], "leave out router_training.public_ratio"),
    "anchor without embedder": (lambda t, i: ["train-anchor", "--data", i.public, "--out", "a"],
                                "give the router embedder"),
    "embed-domain no embedder": (lambda t, i: ["embed-domain", "--data", i.code, "--embedder", t, "--out", "a"],
                                 "not a local sentence-transformers folder"),
}


def _row48(tmp: Path, inputs) -> Path:
    r = _run("embed-domain", "--data", inputs.code, "--embedder", inputs.embedder48, "--out", tmp / "r48",
             "--num-docs", 3, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return tmp / "r48"


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_and_leaves_nothing(case, train_inputs, tmp_path):
    make_args, message = ERRORS[case]
    args = make_args(tmp_path, train_inputs)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _run(*args)
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no temp or work dir
    if case == "out exists":
        assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_paper_router_flag_trains_on_owner_text_with_the_clamped_bias(train_inputs, tmp_path):
    r = _run("train-expert", "--anchor", train_inputs.anchor, "--data", train_inputs.code, "--name", "code",
             "--set", "router.source=random", "--out", "code", "--max-steps", 2, "--set", "train.seq_len=64", "--batch-size", 4,
             "--device", "cpu", "--paper-router")
    assert r.exit_code == 0, r.output
    rec = read_package(tmp_path / "code").card.hparams["router_training"]
    assert (rec["public_ratio"], rec["bias"], rec["public_data"]) == (0.0, "clamp", None)
