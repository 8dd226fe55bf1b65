"""`flexmoe generate`: fast path and stock generate give the same greedy text (fp32, CPU, tiny models)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flexmoe.cli import main


def _run(*args):
    res = CliRunner().invoke(main, ["generate", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.parametrize("which", ["flex3", "dense"])
def test_fast_equals_stock(eval_models, which):
    model = eval_models.flex[which] if which in eval_models.flex else eval_models.dense
    prompts = ["--prompt", "the lord god said", "--prompt", "def f(x):"]
    fast = json.loads(_run(model, *prompts, "--max-new-tokens", 12, "--json"))
    stock = json.loads(_run(model, *prompts, "--max-new-tokens", 12, "--json", "--no-fast"))
    assert fast["fast"] and not stock["fast"]
    assert fast["texts"] == stock["texts"]
    assert fast["new_tokens"] == stock["new_tokens"]


def test_plain_output_and_errors(eval_models, tmp_path):
    out = _run(eval_models.flex["flex3"], "--prompt", "the lord", "--max-new-tokens", 4)
    assert out.startswith("the lord") and "tok/s, fast path, cpu" in out
    det = _run(eval_models.flex["flex3"], "--prompt", "the lord", "--max-new-tokens", 4, "--deterministic")
    assert "tok/s, fast path, deterministic, cpu" in det and det.splitlines()[0] == out.splitlines()[0]
    res = CliRunner().invoke(main, ["generate", str(tmp_path / "missing"), "--prompt", "x"])
    assert res.exit_code == 1 and "no such model directory" in res.output
    res = CliRunner().invoke(main, ["generate", str(eval_models.flex["flex3"]), "--prompt", "x",
                                    "--max-new-tokens", "0"])
    assert res.exit_code == 1 and "max_new_tokens" in res.output
