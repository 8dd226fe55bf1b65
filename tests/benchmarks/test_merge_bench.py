"""The merge benchmark's toy mode runs end to end (child processes, cp baseline, RSS, table + JSON)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("merge_bench", ROOT / "benchmarks" / "merge_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_benchmark(tmp_path, capsys):
    bench = _load()
    result = bench.main(["--toy", "--workdir", str(tmp_path), "--json-out", str(tmp_path / "r.json")])
    assert [r["op"] for r in result["ops"]] == ["merge", "add", "remove"]
    for r in result["ops"]:
        assert r["op_s"] > 0 and r["cp_s"] > 0 and r["peak_rss"] > 50 * 2**20 and r["out_bytes"] > r["bytes"] // 2
    assert result["goals_met"]["rss"]
    assert "x cp+sync" in capsys.readouterr().out and (tmp_path / "r.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # synthetic files deleted


def test_7b_plan_fits_the_disk():
    """Twice the largest merged checkpoint must fit the free disk: 2 experts (46.5 GB) on the 64 GiB machine,
    all 7 (133 GB) on a 235 GiB one, fewer layers only when even 2 experts do not fit."""
    bench = _load()
    seven = bench.SEVEN_B
    assert bench.merged_bytes(seven, 7) / 1e9 == pytest.approx(66.5, abs=0.1)
    assert bench.sizes(seven)["anchor"] / 1e9 == pytest.approx(14.6, abs=0.05)
    assert bench.sizes(seven)["package"] / 1e9 == pytest.approx(8.66, abs=0.01)
    plan = bench.plan_7b(seven, 55e9)
    assert (plan["experts"], plan["layers"]) == (2, 32) and plan["peak_disk"] / 1e9 == pytest.approx(46.5, abs=0.1)
    assert bench.plan_7b(seven, 70e9)["experts"] == 3
    assert bench.plan_7b(seven, 140e9)["experts"] == 7
    short = bench.plan_7b(seven, 30e9)
    assert (short["experts"], short["layers"]) == (2, 16) and "even 2 experts" in short["reason"]
    assert bench.plan_7b(seven, None, experts=4)["experts"] == 4
    with pytest.raises(SystemExit):
        bench.plan_7b(seven, 10e9)


def test_toy_7b_plan_end_to_end(tmp_path, capsys):
    """The 7b plan at toy size: merge -> remove -> add around the 7-expert checkpoint, the removed expert's package
    rebuilt to add it back; everything deleted at the end."""
    bench = _load()
    result = bench.main(["--shape", "7b", "--toy", "--workdir", str(tmp_path), "--json-out", str(tmp_path / "r.json")])
    assert result["plan"]["experts"] == 7 and result["shape_name"] == "7b"
    assert [r["op"] for r in result["ops"]] == ["merge", "remove", "add"]
    for r in result["ops"]:
        assert r["op_s"] > 0 and r["cp_s"] > 0 and r["peak_rss"] > 50 * 2**20
    merged, removed, added = (r["out_bytes"] for r in result["ops"])
    assert merged == added > removed  # the rebuilt package gives back the same checkpoint size
    predicted = bench.merged_bytes(bench.TOY, 7)
    assert predicted < merged < predicted + 200_000  # tensors as predicted, plus headers, JSON and tokenizer files
    assert "largest merged checkpoint 7 experts" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
