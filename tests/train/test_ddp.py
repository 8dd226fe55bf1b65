"""Data-parallel training: the same loop under torchrun on 2 CPU processes (gloo) equals one process with the
same global batch, and only the main process writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexmoe.io.package import read_package
from flexmoe.testing import free_port

pytestmark = pytest.mark.slow


def test_two_processes_match_one_with_the_same_global_batch(train_inputs, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    flexmoe = shutil.which("flexmoe", path=str(Path(sys.executable).parent))
    if torchrun is None or flexmoe is None:
        pytest.skip("torchrun / flexmoe console scripts not installed")
    common = ["train-expert", "--anchor", str(train_inputs.anchor), "--data", str(train_inputs.code), "--name", "code",
              "--embedder", str(train_inputs.embedder), "--max-steps", "6", "--set", "train.seq_len=64", "--device", "cpu",
              "--checkpoint-every", "3", "--public-data", str(train_inputs.public), "--set", "router_training.public_ratio=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), flexmoe, *common,
                    "--batch-size", "2", "--out", str(tmp_path / "ddp")], check=True, env=env, cwd=tmp_path, capture_output=True)
    subprocess.run([flexmoe, *common, "--batch-size", "4", "--out", str(tmp_path / "one")], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    a, b = read_package(tmp_path / "ddp"), read_package(tmp_path / "one")
    assert a.card.hparams["batch_size"] == 2 and a.card.steps == 6
    for key in a.reader.keys():
        torch.testing.assert_close(a.reader.get(key), b.reader.get(key), atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]  # no stray work or temp dirs
