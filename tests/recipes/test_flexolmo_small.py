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


def _report():
    spec = importlib.util.spec_from_file_location("flexolmo_report", RECIPE / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_opt_out_recovery_and_targets_from_hand_numbers():
    report = _report()
    row = lambda a, b: {"bpb": {"public": 1.0, "x": a, "y": b}, "mean": (1.0 + a + b) / 3}  # noqa: E731
    rows = {"anchor": row(3.0, 3.0), "FlexOlmo top-all": row(2.0, 2.0), "opt-out: -x": row(2.8, 2.0),
            "opt-out: -y": row(2.0, 2.5)}
    r = report.opt_out_report(rows, ("x", "y"))
    assert r["x"]["recovery"] == pytest.approx(0.8)  # 0.8 of the gain on x is taken back
    assert r["y"]["recovery"] == pytest.approx(0.5)
    assert r["x"]["relative_delta_other"] == {"public": 0.0, "y": 0.0}


def test_tiny_recipe_runs_end_to_end(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(RECIPE / "run.py"), "--scale", "tiny", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    expected = {"anchor", "expert alone: code", "expert alone: speeches", "FlexOlmo top-1", "FlexOlmo top-2",
                "FlexOlmo top-all", "FlexOlmo, no bias", "random router rows", "rows from anchor hidden states",
                "model soup", "BTM ensemble (all)", "BTM ensemble (top-2)", "no coordination",
                "opt-out: -code", "opt-out: -speeches", "FlexOlmo + router tuning, top-2",
                "FlexOlmo + router tuning, top-all", "RT opt-out: -code", "RT opt-out: -speeches",
                "router tuning with owners' text (oracle), top-2", "router tuning with owners' text (oracle), top-all"}
    assert set(results["rows"]) == expected
    for row in results["rows"].values():
        assert set(row["bpb"]) == {"public", "code", "speeches"}
        assert all(0 < v < 20 for v in row["bpb"].values())
    # Opting out of `code` leaves exactly the speeches owner's 2-expert model: the same numbers.
    assert results["rows"]["opt-out: -code"]["bpb"] == results["rows"]["expert alone: speeches"]["bpb"]
    assert {"seed", "versions", "timings_s", "anchor", "experts", "opt_out_after_router_tuning"} <= set(results)
    # Router tuning changed the merged model, and opting out after it leaves the same expert alone as before.
    assert results["rows"]["FlexOlmo + router tuning, top-all"] != results["rows"]["FlexOlmo top-all"]
    oracle = "router tuning with owners' text (oracle), top-all"
    assert results["rows"][oracle] != results["rows"]["FlexOlmo + router tuning, top-all"]
    assert (out / "results.md").read_text().startswith("# FlexOlmo small-scale reproduction")
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "bpb.png", "routing_code.png", "routing_public.png", "routing_speeches.png"]
