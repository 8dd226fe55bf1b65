"""The training benchmark at toy size on CPU: its FLOP count against torch's counter, and an end-to-end run
(child processes, the vendored baseline, profile, table + JSON)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "benchmarks" / "train_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.mark.parametrize("mode", ["expert", "full", "dense", "mlp-only"])
def test_flop_count_is_what_a_training_step_executes(bench, tmp_path, mode):
    """The documented count (minus the attention core, which torch's CPU attention kernel does not report) equals
    torch.utils.flop_counter on a real step: weight gradients only where trained, layer 0 without attention backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from flexmoe.io.anchor import read_anchor
    from flexmoe.expert.upcycle import load_dense, upcycle
    from flexmoe.router.rows import random_row
    from flexmoe.testing import build_synthetic_anchor
    from flexmoe.train.losses import CausalLMLoss

    anchor = read_anchor(build_synthetic_anchor(tmp_path / "a", dtype=torch.float32, **bench.TINY_SHAPE))
    if mode == "dense":
        model = load_dense(anchor)
    else:
        model = upcycle(anchor, random_row(anchor.public_row, 0), top_k=2)
        for name, p in model.named_parameters():
            p.requires_grad_({"full": True, "mlp-only": ".mlp." in name}.get(mode, p.requires_grad))
    B, S = 2, 16
    ids = torch.randint(0, 900, (B, S))
    with FlopCounterMode(display=False) as counter:
        loss, _ = CausalLMLoss(model, 1e-5, 1e-3)(ids, ids)
        loss.backward()
    count = bench.flops_per_token(bench.TINY_SHAPE, S, mode)
    assert counter.get_total_flops() == (count["total"] - count["attn_core"]) * B * S


def test_full_shape_counts_are_the_documented_ones(bench):
    got = {m: round(bench.flops_per_token(bench.FULL_SHAPE, 4096, m)["total"] / 1e9, 2)
           for m in ("expert", "full", "dense", "mlp-only")}
    assert got == {"expert": 10.52, "full": 13.31, "dense": 8.48, "mlp-only": 12.16}


def _toy_run(bench, tmp_path, monkeypatch, rows: list[str]) -> dict:
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    report = bench.main(["--tiny", "--rows", ",".join(rows), "--workdir", str(tmp_path)])
    assert [r["row"] for r in report["rows"]] == rows
    for r in report["rows"]:
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["gflop_per_token"] > 0 and r["mfu"] > 0
        assert r["row"].startswith("hf:") or r["trainable_b"] > 0  # the baseline rounds to 3 decimals
    assert not (tmp_path / "out" / "train_bench_errors.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the synthetic anchor is deleted
    return report


def test_toy_run_end_to_end(bench, tmp_path, monkeypatch, capsys):
    report = _toy_run(bench, tmp_path, monkeypatch, ["expert", "hf:full-eager"])
    assert report["goals"]["row"] == "expert" and "speed_goal_1.8x" in report["goals"]
    saved = json.loads((tmp_path / "out" / "train_bench.json").read_text())
    assert saved["rows"][0]["row"] == "expert" and saved["device"]["torch"] == torch.__version__
    assert "==== expert" in (tmp_path / "out" / "train_profile.txt").read_text()
    assert "x hf tok/s" in capsys.readouterr().out


@pytest.mark.slow
def test_toy_run_of_every_flexmoe_row(bench, tmp_path, monkeypatch):
    names = [n for n in bench.ROWS if not n.startswith("hf:")]
    rows = {r["row"]: r for r in _toy_run(bench, tmp_path, monkeypatch, names)["rows"]}
    assert rows["expert"]["trainable_b"] < rows["full"]["trainable_b"] / 2
    assert rows["expert"]["loss"] == pytest.approx(rows["expert+compile"]["loss"], rel=1e-3)


def test_vendored_baseline_is_a_verbatim_copy():
    shared = ROOT.parent / "shared" / "bench" / "hf_baseline_train.py"
    if not shared.is_file():
        pytest.skip("no ../shared/bench beside the checkout")
    vendored = (ROOT / "benchmarks" / "hf_baseline_train.py").read_text().splitlines(keepends=True)
    header = [line for line in vendored if line.startswith("#")][:3]
    assert "".join(vendored[len(header):]) == shared.read_text()


def test_make_bench_entry_point_builds_each_command(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.command("train", True, True, tmp_path)[1:] == [str(ROOT / "benchmarks" / "train_bench.py"), "--quick", "--tiny"]
    assert run.command("merge", False, True, tmp_path)[-1] == "--toy"
    assert all(Path(run.command(n, False, False, tmp_path)[1]).is_file() for n in run.BENCHES)
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])
