"""The reproduction recipe end to end at tiny scale on CPU (the GPU run is the same code at `--scale small`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "flexolmo_small"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"flexolmo_{name}", RECIPE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_opt_out_recovery_seed_summary_and_routing_from_hand_numbers():
    report = _module("report")
    row = lambda a, b: {"bpb": {"public": 1.0, "x": a, "y": b, "mixed": 2.0}, "mean": (1.0 + a + b) / 3}  # noqa: E731
    rows = {"anchor": row(3.0, 3.0), "m (s0)": row(2.0, 2.0), "m (s1)": row(2.2, 2.0), "opt-out: -x": row(2.8, 2.0),
            "opt-out: -y": row(2.0, 2.5)}
    r = report.opt_out_report(rows, ("x", "y"), "m (s0)")
    assert r["x"]["recovery"] == pytest.approx(0.8)  # 0.8 of the gain on x is taken back
    assert r["y"]["recovery"] == pytest.approx(0.5)
    assert r["x"]["relative_delta_other"] == {"public": 0.0, "y": 0.0}  # mixed windows are not a domain
    s = report.seed_summary(rows)
    assert set(s) == {"m"} and s["m"]["seeds"] == 2
    assert s["m"]["bpb"]["x"][0] == pytest.approx(2.1) and s["m"]["bpb"]["x"][1] == pytest.approx(0.1414, abs=1e-4)
    routing = {"experts": ["public", "x", "y"], "domains": {
        "public": {"mean_prob": [[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]], "fraction": [[1.0, 0.7, 0.3], [1.0, 0.2, 0.8]]},
        "x": {"mean_prob": [[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], "fraction": [[0.5, 1.0, 0.5], [0.6, 0.6, 0.8]]}}}
    rs = report.routing_summary(routing)
    assert rs["public"]["public_prob"] == pytest.approx(0.55) and rs["public"]["public_in_topk"] == 1.0
    assert rs["x"]["top_owner_per_layer"] == ["x", "y"] and rs["x"]["own_top_layers"] == 1


def test_mixed_windows_are_reproducible_segments_of_the_domains(train_inputs, tmp_path):
    from flexmoe.data import load_tokenizer

    run = _module("run")
    files = {d: ROOT / "fixtures" / d / "eval.jsonl" for d in ("public", "code", "speeches")}
    tok = load_tokenizer(train_inputs.anchor)
    out = run.mixed_windows(files, tok, tmp_path / "mixed.jsonl", segment=16, count=5, seed=0)
    docs = [json.loads(x)["text"] for x in out.read_text().splitlines()]
    assert len(docs) == 5 and all(len(tok(d, add_special_tokens=False)["input_ids"]) >= 2 * 16 for d in docs)
    assert out.read_text() == run.mixed_windows(files, tok, tmp_path / "again.jsonl", segment=16, count=5,
                                                seed=0).read_text()


def test_tiny_recipe_runs_end_to_end(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(RECIPE / "run.py"), "--scale", "tiny", "--out", str(out),
                           "--work", str(work), "--extraction", "code"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    expected = {"anchor", "experts alone, own domain (s0)", "experts alone, own domain (s1)", "paper top-2 (s0)",
                "opt-out: -code", "opt-out: -speeches"}
    for s in (0, 1):
        expected |= {f"default top-2 (s{s})", f"default top-all (s{s})", f"default top-2, no bias (s{s})",
                     f"random top-2 (s{s})", f"BTM, whole-window prefix (s{s})", f"BTM, 16-token prefix (s{s})"}
    assert set(results["rows"]) == expected
    for name, row in results["rows"].items():
        cols = {"code", "speeches"} if name.startswith("experts alone") else {"public", "code", "speeches", "mixed"}
        assert set(row["bpb"]) == cols, name
        assert all(0 < v < 20 for v in row["bpb"].values())
    # Opting out of `code` leaves exactly the speeches owner's 2-expert model: the same numbers on its domain.
    assert results["rows"]["opt-out: -code"]["bpb"]["speeches"] == pytest.approx(
        results["rows"]["experts alone, own domain (s0)"]["bpb"]["speeches"], rel=1e-6)
    assert {"seed", "versions", "timings_s", "anchor", "experts", "seeds", "routing_summary", "targets"} <= set(results)
    # The default router training leaves a negative bias; the paper's owner-only, clamped one does not.
    ex = results["experts"]
    assert min(ex["default-s0/code"]["bias"]) < 0 and ex["default-s0/code"]["router_training"]["bias"] == "project"
    assert ex["paper-s0/code"]["router_training"]["public_ratio"] == 0.0
    assert all(e["epochs"] >= 1.0 for label, e in ex.items() if not label.startswith("paper"))
    md = (out / "results.md").read_text()
    assert md.startswith("# FlexOlmo small-scale reproduction") and "## Targets" in md and "## Routing" in md
    # The extraction table (issue 19): five models, each on the owner's training and held-out text.
    ext = results["extraction"]
    assert ext["owner"] == "code" and list(ext["rows"]) == [
        "anchor (public model)", "code expert alone (2-expert)", "merged (default top-2)",
        "merged minus code (opt-out)", "no coordination: dense fine-tune's FFN + anchor (2-expert)"]
    for r in ext["rows"].values():
        assert r["train"]["n"] == r["train"]["documents"] == 11 and 0 <= r["train"]["exact_match"]["rate"] <= 1
        assert r["eval"]["n"] >= 1 and r["train"]["lcp_half"]["low"] <= r["train"]["lcp_half"]["rate"]
    assert (work / "experts" / "dense-s0" / "code" / "expert.json").is_file()  # trained for the table
    assert "## Extraction of code's training text" in md and md.count("| merged minus code (opt-out) |") == 1
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "bpb.png", "routing_code.png", "routing_mixed.png", "routing_public.png", "routing_speeches.png"]
