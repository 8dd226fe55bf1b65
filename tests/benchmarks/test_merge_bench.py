"""The merge benchmark's toy mode runs end to end (child processes, cp baseline, RSS, table + JSON)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
