"""flexmoe.config: the Config base, overrides, enum coercion, sizes."""

from __future__ import annotations

import pytest

from flexmoe.config import (Device, DType, EvalConfig, ExpertSpec, MergeConfig, TrainConfig, parse_size,
                            with_overrides)
from flexmoe.errors import ConfigError


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5MB") == 1_500_000
    assert parse_size(" 500 kb ") == 500_000 and parse_size(1234) == 1234 and parse_size("100") == 100
    for bad in ("lots", "5XB", "0", "-1GB"):
        with pytest.raises(ConfigError, match="bad size"):
            parse_size(bad)




def test_load_applies_yaml_then_dotted_then_typed_values(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: code\ntrain:\n  lr: 0.1\n  max_steps: 5\n")
    s = ExpertSpec.load(spec, {"train.max_steps": 7, "train.seed": None}, ["train.lr=0.2", "train.seed=3"])
    assert (s.name, s.train.lr, s.train.max_steps, s.train.seed) == ("code", 0.2, 7, 3)
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        ExpertSpec.load(None, dotted=["train.lrr=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        with_overrides({}, ["train.lr"])


def test_enum_fields_accept_their_values_and_refuse_others():
    assert TrainConfig(device="cpu").device is Device.CPU
    assert EvalConfig(data={"a": "b"}, device="cuda").device is Device.CUDA
    with pytest.raises(ConfigError, match="'tpu' is not one of auto, cpu, cuda"):
        TrainConfig(device="tpu")
    assert DType.of_safetensors("BF16") is DType.BFLOAT16 and DType.FLOAT16.safetensors == "F16"


def test_checks_run_on_construction():
    with pytest.raises(ConfigError, match="no evaluation data"):
        EvalConfig()
    assert EvalConfig(data={"a": "b"}, max_bytes="2KB").max_bytes == 2000
    with pytest.raises(ConfigError, match="bad size"):
        MergeConfig("anchor", ["pkg"], shard_size="lots")
    assert TrainConfig(seq_len=None).for_context(4096).seq_len == 2048
