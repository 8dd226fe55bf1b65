"""`flexmoe audit-extraction` end to end on a tiny anchor: table, --json, --json-out, one-line errors."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from flexmoe.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from flexmoe.testing import build_random_anchor

    root = tmp_path_factory.mktemp("audit_cli")
    rng = random.Random(0)
    docs = root / "owner.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(400)}" for _ in range(n))}) + "\n"
                            for n in (30, 40, 10, 50)))
    return {"anchor": build_random_anchor(root / "anchor", seed=0), "docs": docs, "root": root}


def _run(*args):
    return CliRunner().invoke(main, ["audit-extraction", *map(str, args)])


def test_table_and_json_out(inputs, tmp_path):
    res = _run(inputs["anchor"], "--data", inputs["docs"], "--prefix-len", 8, "--gen-len", 16, "--seed", 2,
               "--json-out", "r.json")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "3 samples (one per document) of 4 documents, 1 shorter than 24 tokens skipped" in lines[0]
    assert lines[0].endswith("(generate, cpu), seed 2")
    assert [ln.split()[0] for ln in lines[2:6]] == ["exact", "LCP", "mean", "similarity"]
    assert lines[-1] == "wrote r.json"
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["n"] == 3 and out["seed"] == 2 and out["skipped_short"] == 1 and out["gen_len"] == 16
    assert out["settings"]["model"] == str(inputs["anchor"]) and out["exact_match"]["rate"] == 0.0


def test_json_to_stdout(inputs):
    res = _run(inputs["anchor"], "--data", inputs["docs"], "--prefix-len", 8, "--gen-len", 16, "--prefixes", 2,
               "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["format"] == "flexmoe-extraction/1" and out["n"] == 2 and out["requested"] == 2
    assert out["settings"]["deterministic"] is False
    res = _run(inputs["anchor"], "--data", inputs["docs"], "--prefix-len", 8, "--gen-len", 16, "--prefixes", 2,
               "--json", "--deterministic")
    assert res.exit_code == 0, res.output
    det = json.loads(res.stdout)
    assert det["settings"]["deterministic"] is True and det["exact_match"] == out["exact_match"]


@pytest.mark.parametrize("case,message", [
    ("missing-data", "does not exist"),
    ("too-short", "has the 200 tokens a sample needs (longest: 50): lower --prefix-len/--gen-len"),
    ("missing-model", "no such model directory"),
    ("package", "is an expert package"),
    ("zero-prefixes", "prefixes must be at least 1"),
    ("existing-out", "--overwrite"),
])
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, case, message):
    model, data, extra = inputs["anchor"], inputs["docs"], ["--prefix-len", 8, "--gen-len", 16]
    if case == "missing-data":
        data = tmp_path / "missing.jsonl"
    elif case == "too-short":
        extra = ["--prefix-len", 100, "--gen-len", 100]
    elif case == "missing-model":
        model = tmp_path / "nope"
    elif case == "package":
        from flexmoe.testing import build_random_package

        model = build_random_package(tmp_path / "pkg", inputs["anchor"], "math", 1)
    elif case == "zero-prefixes":
        extra += ["--prefixes", 0]
    elif case == "existing-out":
        (tmp_path / "r.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _run(model, "--data", data, *extra, "--json-out", "r.json")
    assert res.exit_code == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert res.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (r.json only where it was)
