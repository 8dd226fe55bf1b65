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
    assert all(run.command(n, False, False, tmp_path, "7b")[2:4] == ["--shape", "7b"] for n in ("train", "infer"))
    assert run.command("merge", False, False, tmp_path, "7b")[-2:] == ["--shape", "7b"]
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])


def test_7b_shape_counts(bench):
    """The 7B figures benchmarks/NOTES.md uses (GFLOP a token at S 4096)."""
    got = {m: round(bench.flops_per_token(bench.SHAPE_7B, 4096, m)["total"] / 1e9, 2)
           for m in ("expert", "full", "dense", "mlp-only")}
    assert got == {"expert": 56.09, "full": 70.52, "dense": 44.54, "mlp-only": 64.84}
    assert bench.SHAPE_7B == dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                  num_heads=32)


def test_hf_memory_prediction(bench):
    """The baseline's predicted peak reproduces the H100 measurement of the 1b hf:full-eager row (70.9 GiB at
    B2 x 4096), and at 7b says: the 2x7B full fine-tune and the naive freeze cannot fit one H200, 14 layers of the
    2-expert model can, and the dense 7B fits with gradient checkpointing."""
    G = 2**30
    one_b = bench.predict_hf_peak(bench.FULL_SHAPE, "full", 8192)["total"] / G
    assert abs(one_b - 70.9) / 70.9 < 0.05
    mlp_only = bench.predict_hf_peak(bench.FULL_SHAPE, "mlp-only", 8192)["total"] / G
    assert 0.85 * 72.9 < mlp_only < 72.9  # a lower bound: the grouped_mm experts keep more
    h200 = 139.5 * G  # torch.cuda.mem_get_info()[1] of an H200: 143771 MiB
    tokens = bench.RUN_7B["batch"] * bench.RUN_7B["seq"]
    full = bench.predict_hf_peak(bench.SHAPE_7B, "full", tokens, grad_accum=2)
    assert full["params"] + full["adam"] + full["grads_kept"] == pytest.approx(16 * 11.627e9, rel=1e-3)  # 186 GB
    assert full["total"] > h200
    assert bench.predict_hf_peak(bench.SHAPE_7B, "mlp-only", tokens, grad_accum=2)["total"] > h200
    assert bench.fit_layers(bench.SHAPE_7B, "full", tokens, 2, h200)[:2] == [14, 12]
    assert bench.predict_hf_peak(bench.SHAPE_7B, "dense", tokens, grad_accum=2, ckpt=True)["total"] < 0.93 * h200


def test_7b_code_path_on_cpu(bench, tmp_path, monkeypatch):
    """--shape 7b at the toy size: the flexmoe row with grad_accum 2, the full fine-tune reported as a predicted OOM
    without being run, and the largest baseline that fits (1 of 2 layers here) run and scaled to the full depth."""
    G = 2**30
    tokens = bench.TINY_RUN_7B["batch"] * bench.TINY_RUN_7B["seq"]
    one = bench.predict_hf_peak({**bench.TINY_SHAPE, "num_layers": 1}, "full", tokens, grad_accum=2)["total"]
    two = bench.predict_hf_peak(bench.TINY_SHAPE, "full", tokens, grad_accum=2)["total"]
    limit = (one / bench.FIT_FRACTION + two) / 2  # 1 layer fits, 2 do not
    assert one / bench.FIT_FRACTION < limit < two
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    report = bench.main(["--shape", "7b", "--tiny", "--mem-gib", str(limit / G), "--workdir", str(tmp_path),
                         "--rows", "expert,hf:full-eager,hf:full-eager@fit", "--no-profile"])
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["expert", "hf:full-eager", "hf:full-eager@1L"]
    assert rows["expert"]["grad_accum"] == 2 and rows["expert"]["tok_s"] > 0
    assert rows["hf:full-eager"]["error"].startswith("oom (predicted") and "tok_s" not in rows["hf:full-eager"]
    fit = rows["hf:full-eager@1L"]
    assert fit["layers"] == 1 and 0 < fit["tok_s_scaled_32l"] < fit["tok_s"]
    assert report["goals"]["baseline"] == "hf:full-eager@1L" and report["goals"]["hf_full_finetune"].startswith("oom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hf_row_with_gradient_checkpointing(bench):
    """`_run_hf_row` (the baseline recipe built on the device) trains the dense model with checkpointing."""
    row = {"kind": "hf", "hf": "dense", "ckpt": True, "shape": bench.TINY_SHAPE, "layers": 2, "batch": 2, "seq": 32,
           "grad_accum": 2, "warmup": 1, "steps": 1}
    out = bench._run_hf_row(row)
    assert out["tok_s"] > 0 and out["trainable_b"] == out["params_b"] and out["layers"] == 2


def test_fit_row_retries_with_fewer_layers_on_oom(bench, tmp_path, monkeypatch):
    """An out-of-memory fit row is run again with the next layer count down, with that count's prediction."""
    calls = []

    def fake_run_row(name, batch, seq, args, run, anchor, env, timeout, *, shape, shape_name, layers):
        calls.append(layers)
        return ({"error": "oom"} if layers == 2 else {"tok_s": 100, "step_ms": 1.0, "layers": layers}), ""

    monkeypatch.setattr(bench, "run_row", fake_run_row)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    report = bench.main(["--shape", "7b", "--tiny", "--mem-gib", "1", "--workdir", str(tmp_path),
                         "--rows", "hf:full-eager@fit"])
    (row,) = report["rows"]
    assert calls == [2, 1] and row["row"] == "hf:full-eager@1L" and row["tok_s"] == 100
    one = bench.predict_hf_peak({**bench.TINY_SHAPE, "num_layers": 1}, "full", 128, grad_accum=2)["total"]
    assert row["predicted_gib"] == bench._sig(one / 2**30) and 0 < row["tok_s_scaled_32l"] < 100


def test_profile_counts_each_kernel_once(bench):
    """The optimizer's record_function range shows on the GPU as an annotation over its own kernels (its key
    "Optimizer.step#AdamW.step"): it is not a kernel, and counting it doubled the optimizer's time."""
    from types import SimpleNamespace

    def avg(key, us, count=1, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, device_type="DeviceType.CUDA",
                               is_user_annotation=annotation)

    events = [avg("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 110_000.0, 40),
              avg("Optimizer.step#AdamW.step", 6_500.0, annotation=True),
              avg("multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor>", 6_500.0, 20)]
    summary, table = bench._profile_summary(SimpleNamespace(key_averages=lambda: events), wall_s=0.125, steps=1)
    assert summary["ms_per_step"] == {"matmul": 110.0, "optimizer": 6.5}
    assert summary["gpu_ms_per_step"] == 116.5 and summary["gpu_busy"] == 0.932
    assert "Optimizer.step#AdamW.step" not in table
