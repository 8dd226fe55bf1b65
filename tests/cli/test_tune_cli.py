from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flexmoe.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_has_examples():
    for cmd in ("tune-router", "select-proxy"):
        r = _run(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd


def test_select_proxy_then_tune_then_opt_out(tune_inputs, bow_embedder, tmp_path):
    r = _run("select-proxy", "--public", tune_inputs.public, "--public", tune_inputs.code, "--domain", tune_inputs.code,
             "--embedder", bow_embedder, "--out", "proxy/code.jsonl", "--fraction", 0.25, "--num-domain-docs", 20,
             "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "30 of 120 public documents written to proxy/code.jsonl" in r.output
    r = _run("tune-router", tune_inputs.merged, "--data", "proxy/code.jsonl", "--out", "rt", "--max-steps", 4,
             "--seq-len", 64, "--batch-size", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "tuned router rows of code, news written to rt (4 steps" in r.output
    meta = json.loads((tmp_path / "rt" / "flexmoe.json").read_text())
    assert meta["experts"][1]["router_tuning"][0]["hparams"]["lr"] == 2e-3  # the paper's default
    r = _run("remove", "rt", "--expert", "code", "--out", "rt-no-code")
    assert r.exit_code == 0, r.output
    r = _run("inspect", "rt-no-code", "--json")
    assert [e["name"] for e in json.loads(r.output)["experts"]] == ["public", "news"]


def test_errors_are_one_line(tune_inputs, tmp_path):
    (tmp_path / "taken").mkdir()
    r = CliRunner().invoke(main, ["tune-router", str(tune_inputs.merged), "--data", str(tune_inputs.public),
                                  "--out", "taken"])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["select-proxy", "--public", str(tune_inputs.public), "--domain",
                                  str(tune_inputs.code), "--embedder", "nowhere", "--out", "p.jsonl"])
    assert r.exit_code == 1 and "sentence-transformers" in r.output
