"""FSDP2 on CPU (gloo): `flexmoe train-expert` under `accelerate launch` with recipes/accelerate/fsdp2.yaml on two
processes, cut after 2 steps and resumed, gives the expert that one process trains with the same global batch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexmoe import api, presets
from flexmoe.config import Device, ExpertSpec, TrainAnchorConfig, TrainConfig
from flexmoe.errors import ConfigError
from flexmoe.io.package import package_keys, read_package
from flexmoe.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")
FSDP2_YAML = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"


def launch(config: Path, nproc: int, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """`accelerate launch --config_file CONFIG --num_processes N fsdp_worker.py ARGS`, FSDP2's debug log on."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
           str(nproc), "--main_process_port", str(free_port()), str(WORKER), *map(str, args)]
    env = {**os.environ, "TORCH_LOGS": "+fsdp", **(env or {})}
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_two_processes_cut_and_resumed_match_one_process(train_inputs, tmp_path):
    common = ["train-expert", "--anchor", train_inputs.anchor, "--data", train_inputs.code, "--name", "code",
              "--set", "router.source=random", "--max-steps", 4, "--set", "train.seq_len=32", "--device", "cpu",
              "--checkpoint-every", 2, "--set", "train.warmup_steps=1",
              # half of each batch public: 1 + 1 sequences per process give the one-process batch of 2 + 2
              "--public-data", train_inputs.public, "--set", "router_training.public_ratio=0.5"]
    r = launch(FSDP2_YAML, 2, 2, *common, "--batch-size", 2, "--out", tmp_path / "fsdp", cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "FSDP::pre_forward" in r.stderr  # the layers really were sharded
    assert r.stdout.count("expert 'code' written") == 1  # one report, from the main process
    assert "resumed from step 2" in r.stdout

    spec = ExpertSpec.load(None, {"name": "code", "anchor": train_inputs.anchor, "data": [train_inputs.code],
                                   "router.source": "random", "train.max_steps": 4, "train.seq_len": 32,
                                   "train.batch_size": 4, "train.warmup_steps": 1, "train.device": "cpu",
                                   "router_training.public_data": [train_inputs.public],
                                   "router_training.public_ratio": 0.5})
    api.train_expert(spec, tmp_path / "one", progress=False)
    a, b = read_package(tmp_path / "fsdp"), read_package(tmp_path / "one")
    assert (a.card.steps, a.card.hparams["batch_size"]) == (4, 2)
    assert sorted(a.reader.keys()) == sorted(b.reader.keys()) == sorted(package_keys(2))
    for key in package_keys(2):
        torch.testing.assert_close(a.reader.get(key), b.reader.get(key), atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp", "one"]  # no work dir or temp dir left


def test_train_anchor_under_fsdp2_matches_one_process(train_inputs, tmp_path):
    """Every anchor tensor is trained and sharded: the main process saves a plain Olmo2 model of them all."""
    from safetensors.torch import load_file

    common = ["train-anchor", "--data", train_inputs.public, "--embedder", train_inputs.embedder, "--preset", "tiny",
              "--max-steps", 3, "--seq-len", 32, "--device", "cpu", "--num-docs", 20]
    r = launch(FSDP2_YAML, 2, 0, *common, "--batch-size", 2, "--out", tmp_path / "fsdp", cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "FSDP::pre_forward" in r.stderr and r.stdout.count("anchor written") == 1
    cfg = TrainAnchorConfig(data=[train_inputs.public], embedder=train_inputs.embedder, preset="tiny", num_docs=20,
                            train=presets.training("tiny", max_steps=3, seq_len=32, batch_size=4, device=Device.CPU))
    api.train_anchor(cfg, tmp_path / "one", progress=False)
    config = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert config["architectures"] == ["Olmo2ForCausalLM"]
    a, b = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp", "one"]


def test_tune_router_under_fsdp2_matches_one_process(tune_inputs, tmp_path):
    """Router tuning runs the same loop: under FSDP2 its tuned rows and biases equal a one-process run's."""
    from flexmoe.config import RouterTuneConfig, router_tuning_train
    from flexmoe.io.merged import BIAS_FILE
    from flexmoe.io.reader import LazyReader

    common = ["tune-router", tune_inputs.merged, "--data", tune_inputs.code, "--data", tune_inputs.public,
              "--max-steps", 4, "--warmup-steps", 1, "--seq-len", 64, "--lr", 1e-2, "--device", "cpu"]
    r = launch(FSDP2_YAML, 2, 0, *common, "--batch-size", 2, "--out", tmp_path / "fsdp", cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "FSDP::pre_forward" in r.stderr
    train = dataclasses.replace(router_tuning_train(), max_steps=4, warmup_steps=1, seq_len=64, batch_size=4,
                                lr=1e-2, device=Device.CPU)
    api.tune_router(RouterTuneConfig(merged=tune_inputs.merged, data=[tune_inputs.code, tune_inputs.public],
                                     train=train), tmp_path / "one", progress=False)
    for name in ("model.safetensors", BIAS_FILE):
        with LazyReader.from_file(tmp_path / "fsdp" / name) as a, LazyReader.from_file(tmp_path / "one" / name) as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                torch.testing.assert_close(a.get(key), b.get(key), atol=1e-5, rtol=1e-4)
    with LazyReader.from_dir(tune_inputs.merged) as before, LazyReader.from_dir(tmp_path / "one") as after:
        assert not torch.equal(before.get("model.layers.0.mlp.gate.weight"), after.get("model.layers.0.mlp.gate.weight"))

@pytest.mark.parametrize("env, message", [
    ({"FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading"),
    ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "grad_checkpointing"),
])
def test_fsdp_options_flexmoe_cannot_honour_are_refused(monkeypatch, env, message):
    from flexmoe.train import fsdp
    from flexmoe.train.accel import make_accelerator

    accelerator = make_accelerator(TrainConfig(device=Device.CPU))
    assert fsdp.settings(accelerator) is None  # no FSDP launch: DDP or one process
    for key, value in {"ACCELERATE_USE_FSDP": "true", **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        fsdp.settings(accelerator)


def test_fsdp2_recipe_is_read_as_flexmoe_expects(monkeypatch):
    """The settings `accelerate launch` derives from recipes/accelerate/fsdp2.yaml pass flexmoe's checks."""
    import yaml

    from flexmoe.train import fsdp
    from flexmoe.train.accel import make_accelerator

    cfg = yaml.safe_load(FSDP2_YAML.read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in cfg["fsdp_config"].items():
        monkeypatch.setenv(key.upper(), str(value).lower())
    assert fsdp.settings(make_accelerator(TrainConfig(device=Device.CPU))) is None  # accepted; one process: no sharding


@pytest.mark.parametrize("name, processes", [("fsdp2.yaml", 2), ("hsdp_multinode.yaml", 16)])
def test_recipes_are_valid_accelerate_configs(name, processes):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(FSDP2_YAML.with_name(name)))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == processes
    assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
    if name.startswith("hsdp"):
        sizes = cfg.parallelism_config
        assert sizes["parallelism_config_dp_replicate_size"] * sizes["parallelism_config_dp_shard_size"] == processes
