"""`flexmoe eval` end to end on tiny model directories: table, JSON, PNGs, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flexmoe.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _run(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def _data_args(eval_data):
    return [a for d, p in eval_data.items() for a in ("--data", f"{d}={p}")]


def test_eval_merged_writes_json_and_plots(eval_models, eval_data, tmp_path):
    res = _run(eval_models.flex["flex3"], *_data_args(eval_data), "--json-out", "out.json", "--plots", "plots",
               "--no-bias", "--seq-len", 64, "--batch-size", 4, "--max-bytes", "1KB", "--top-k", "all")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["domain", "bpb", "tokens", "bytes"]
    assert [ln.split()[0] for ln in lines[1:5]] == ["public", "code", "speeches", "mean"]
    out = json.loads((tmp_path / "out.json").read_text())
    assert [d["domain"] for d in out["domains"]] == ["public", "code", "speeches"]
    assert all(d["bytes"] == 1000 for d in out["domains"])
    assert out["routing"]["top_k"] == 3 and out["routing"]["experts"] == ["public", "code", "speeches"]
    assert out["model"] == str(eval_models.flex["flex3"]) and out["versions"]["torch"] and out["wall_s"] > 0
    assert out["settings"]["bias"] is False
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["bpb.png", "routing_code.png", "routing_public.png", "routing_speeches.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_eval_dense_anchor(eval_models, eval_data):
    res = _run(eval_models.dense, "--data", f"code={eval_data['code']}", "--json-out", "d.json")
    assert res.exit_code == 0, res.output
    assert json.loads(Path("d.json").read_text())["settings"]["seq_len"] == 256  # the tiny model's context
    assert "routing" not in res.stdout and res.stdout.splitlines()[1].startswith("code")


@pytest.mark.parametrize("case,message", [
    ("missing-model", "no such model directory"),
    ("no-equals", "use DOMAIN=PATH"),
    ("empty-name", "use DOMAIN=PATH"),
    ("empty-data", "empty"),
    ("missing-data", "does not exist"),
    ("dense-top-k", "dense"),
    ("bad-top-k", "bad --top-k"),
    ("top-k-range", "top-k 4 is out of range: the model has 3 experts"),
    ("long-window", "exceeds the model's context of 256"),
])
def test_bad_input_is_one_line(eval_models, eval_data, tmp_path, case, message):
    (tmp_path / "empty.jsonl").write_text("")
    model, data, extra = eval_models.dense, [f"code={eval_data['code']}"], []
    if case == "missing-model":
        model = tmp_path / "nope"
    elif case == "no-equals":
        data = [str(eval_data["code"])]
    elif case == "empty-name":
        data = [f"={eval_data['code']}"]
    elif case == "empty-data":
        data = [f"e={tmp_path / 'empty.jsonl'}"]
    elif case == "missing-data":
        data = [f"m={tmp_path / 'missing.jsonl'}"]
    elif case == "dense-top-k":
        extra = ["--top-k", "1"]
    elif case == "bad-top-k":
        extra = ["--top-k", "two"]
    elif case == "top-k-range":
        model, extra = eval_models.flex["flex3"], ["--top-k", "4"]
    elif case == "long-window":
        extra = ["--seq-len", "257"]
    res = _run(model, *[a for d in data for a in ("--data", d)], *extra)
    assert res.exit_code != 0
    # stderr may also hold progress bars; the error itself is one line, with no traceback.
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert res.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in res.output
    if case == "top-k-range":  # refused before the model loads: no loading bar before the error
        assert res.stderr.strip().splitlines() == errors, res.stderr


def test_existing_json_is_refused_without_overwrite(eval_models, eval_data, tmp_path):
    (tmp_path / "out.json").write_text("{}")
    args = [eval_models.dense, "--data", f"code={eval_data['code']}", "--seq-len", 64, "--json-out", "out.json"]
    res = _run(*args)
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert _run(*args, "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "out.json").read_text())["domains"][0]["domain"] == "code"
