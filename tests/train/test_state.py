from __future__ import annotations

import pytest
import torch

from flexmoe.errors import CheckpointError
from flexmoe.train.state import (OPTIMIZER, TrainState, latest_checkpoint, list_checkpoints, load_state,
                                 save_state)


def _optimizer_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95))
    p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def test_round_trip_is_weights_only(tmp_path):
    tensors = {"model.layers.0.mlp.owner_down": torch.randn(4, 5), "model.layers.0.mlp.bias": torch.tensor(-0.5)}
    state = TrainState(step=7, position=56, seed=3, loss=2.5, identity={"anchor": "sha256:x", "train": {"lr": 1e-3}})
    opt = _optimizer_state()
    ckpt = save_state(tmp_path, state, tensors, opt)
    torch.load(ckpt / OPTIMIZER, weights_only=True)  # no pickled code objects
    got_state, got_tensors, got_opt = load_state(ckpt)
    assert got_state == state
    assert got_tensors.keys() == tensors.keys() and all(torch.equal(got_tensors[k], v) for k, v in tensors.items())
    assert torch.equal(got_opt["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    assert got_opt["param_groups"][0]["betas"] == (0.9, 0.95)


def test_keeps_only_the_newest_and_leaves_no_temp_dirs(tmp_path):
    for step in (2, 4, 6):
        save_state(tmp_path, TrainState(step=step, position=step, seed=0), {"w": torch.zeros(2)}, {"state": {}})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006"]
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006"]
    assert latest_checkpoint(tmp_path / "none") is None


def test_refuses_objects_that_need_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="cannot save a object"):
        save_state(tmp_path, TrainState(step=1, position=0, seed=0), {}, {"state": {0: object()}})
    assert list_checkpoints(tmp_path) == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ckpt = save_state(tmp_path, TrainState(step=1, position=0, seed=0), {"w": torch.zeros(2)}, {"state": {}})
    (ckpt / OPTIMIZER).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable training checkpoint"):
        load_state(ckpt)
