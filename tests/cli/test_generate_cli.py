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


def test_top_k_routes_every_token_to_k_experts(eval_models):
    """--top-k K: the fast path and stock generate both decode with K experts a token, as a model whose routers
    were set to K by hand does; `all` is every expert."""
    import torch
    from transformers import AutoTokenizer

    from flexmoe import api
    from flexmoe.router.biased import routers

    model = eval_models.flex["flex3"]
    prompts = ["--prompt", "the lord god said", "--max-new-tokens", 12, "--json"]
    one = json.loads(_run(model, *prompts, "--top-k", 1))
    assert one["top_k"] == 1 and one["texts"] == json.loads(_run(model, *prompts, "--top-k", 1, "--no-fast"))["texts"]
    ref = api.load_model(model)
    for _, r in routers(ref):
        r.top_k = 1
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(["the lord god said"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        new = ref.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    eos = ref.generation_config.eos_token_id
    ended = [i for i, t in enumerate(new.tolist()) if t == eos]
    assert one["texts"][0] == tok.decode(new[: ended[0] + 1 if ended else None], skip_special_tokens=True)
    assert json.loads(_run(model, *prompts))["top_k"] == 2  # the checkpoint's k
    assert "top-3)" in _run(model, "--prompt", "x", "--max-new-tokens", 2, "--top-k", "all")


@pytest.mark.parametrize("args,message", [
    (["--top-k", "two"], "bad --top-k 'two': use a number or 'all'"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--top-k", "4"], "top-k 4 is out of range: the model has 3 experts"),
])
def test_bad_top_k_is_one_line(eval_models, args, message):
    """Refused before any weights load: the error is the only line (no loading bar before it)."""
    res = CliRunner().invoke(main, ["generate", str(eval_models.flex["flex3"]), "--prompt", "x", *args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], \
        res.output


def test_top_k_of_a_dense_model_is_refused(eval_models):
    res = CliRunner().invoke(main, ["generate", str(eval_models.dense), "--prompt", "x", "--top-k", "1"])
    assert res.exit_code == 1 and "--top-k needs a mixture-of-experts model" in res.output
