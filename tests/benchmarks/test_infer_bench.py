"""The inference benchmark's 7b settings: its bound and memory plan at the real shape (pure arithmetic), and its
code path end to end at the toy size on CPU (stock rows, flexmoe rows, bounds, table + JSON)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(monkeypatch, tiny: bool):
    if tiny:
        monkeypatch.setenv("TINY", "1")
    else:
        monkeypatch.delenv("TINY", raising=False)
    spec = importlib.util.spec_from_file_location("infer_bench_under_test", ROOT / "benchmarks" / "infer_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_7b_bound_and_memory_plan(monkeypatch):
    bench = _load(monkeypatch, tiny=False)
    bench.use_shape("7b")
    assert bench.COMBOS == "7:7,8:4" and bench.SHAPE["hidden_size"] == 4096 and bench.SHAPE["num_hidden_layers"] == 32
    plan = bench.memory_plan(7, 7)
    assert plan["params_b"] == pytest.approx(33.27, abs=0.01) and plan["weights_gb"] == pytest.approx(66.5, abs=0.1)
    assert plan["kv_gb"] == pytest.approx(3.22, abs=0.01) and plan["total_gb"] < 80
    assert bench.memory_plan(8, 4)["weights_gb"] == pytest.approx(75.2, abs=0.1)
    gb = 1e9
    assert bench.step_bytes(7, 7, 1, 7) / gb == pytest.approx(65.8, abs=0.05)  # -> 72.9 tok/s at 4.8 TB/s
    assert bench.step_bytes(7, 7, 32, 7) / gb == pytest.approx(68.4, abs=0.05)
    assert bench.step_bytes(8, 4, 1, 4) / gb == pytest.approx(39.8, abs=0.05)
    assert bench.step_bytes(8, 4, 32, 8) / gb == pytest.approx(77.1, abs=0.05)


def test_7b_code_path_on_cpu(monkeypatch, tmp_path, capsys):
    bench = _load(monkeypatch, tiny=True)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["infer_bench.py"])
    assert bench.main(["--shape", "7b", "--quick", "--budget-s", "120"]) == 0
    result = json.loads((tmp_path / "infer_bench.json").read_text())
    assert result["shape_name"] == "7b" and result["info"]["memory_plan"]["E7k7"]["fits"]
    rows = {r["impl"]: r for r in result["rows"]}
    assert list(rows) == ["eager", "grouped_mm", "flexmoe", "flexmoe_sdpa", "flexmoe_determ", "flexmoe_unfused",
                          "flexmoe_grouped"]
    assert rows["flexmoe_unfused"]["fused"] is False and "pct_bw_gen_b1" in rows["flexmoe"]
    assert rows["flexmoe_determ"]["same_tokens_b2"] == 1.0 and not torch.are_deterministic_algorithms_enabled()
    for r in rows.values():
        assert (r["E"], r["k"]) == (7, 7) and isinstance(r["gen_b1"], float) and r["active_experts_b1"] == 7
    assert isinstance(rows["flexmoe"]["step_b2"], float) and rows["flexmoe"]["bound_tok_s_b1"] > 0
    assert result["info"]["correctness"]["graph_equals_eager_tokens"]
    assert "bytes/step" in capsys.readouterr().out


def test_decode_profile_leaves_the_prompts_kernels_out(monkeypatch):
    """The top kernels a step: a kernel the prompt also ran (the expert kernels of a short prompt) counts for the
    steps only, and one only the prompt ran (its grouped GEMM) is not listed at all."""
    bench = _load(monkeypatch, tiny=True)
    prompt = [("grouped_gemm", 500.0), ("gate_up", 40.0), ("argmax", 3.0)]
    steps = 4
    run = prompt + [("gate_up", 38.0), ("down", 23.0), ("argmax", 3.0)] * steps
    res = bench.decode_kernels(run, prompt, steps, top=3)
    assert res["kernels_per_step"] == 3 and res["kernel_ms_per_step"] == pytest.approx(0.064)
    assert res["top"] == ["gate_up 0.038ms x1", "down 0.023ms x1", "argmax 0.003ms x1"]
