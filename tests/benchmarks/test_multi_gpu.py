"""benchmarks/multi_gpu.sh on CPU processes (gloo), toy shape: the 1-process baseline, HSDP as 2 "machines" x 2
processes through recipes/accelerate/hsdp_multinode.yaml (two `accelerate launch --machine_rank R` meeting on
127.0.0.1: the multi-machine launch path on one host), and FSDP2 over 4 processes with reshard_after_forward
false; every package equals the 1-process one up to float rounding (fp32 here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flexmoe.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_hsdp_mesh_and_fsdp2_keep_gathered_on_cpu(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "BF16": "0", "NPROCS": "4", "ROWS": "one hsdp fsdp2keep", "SEQ": "32",
           "BATCH": "2", "MULTI_GPU_WARMUP": "1", "OMP_NUM_THREADS": "1", "PORT": str(free_port()),
           "WORK": str(tmp_path / "work"), "PY": sys.executable,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "multi_gpu.sh"), "tiny", "3"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "failed" not in r.stdout, r.stdout[-3000:]
    rows = json.loads((tmp_path / "work" / "report.json").read_text())
    assert list(rows) == ["one", "fsdp2keep-4", "hsdp-4"]
    assert rows["hsdp-4"]["mesh"] == {"shape": [2, 2], "dims": ["dp_replicate", "dp_shard_cp"]}  # HSDP, not 4 shards
    assert rows["fsdp2keep-4"]["mesh"]["shape"] == [4]
    assert rows["fsdp2keep-4"]["fsdp"] == {"reshard_after_forward": False}
    assert rows["hsdp-4"]["fsdp"] == {"reshard_after_forward": True}
    assert rows["one"]["fsdp"] is None
    for name in ("hsdp-4", "fsdp2keep-4"):
        assert rows[name]["world"] == 4 and rows[name]["tokens_per_step"] == rows["one"]["tokens_per_step"]
        assert rows[name]["max_diff"] < 1e-5, (name, rows[name]["max_diff"])
    assert "hsdp-4" in r.stdout and "2x2" in r.stdout
