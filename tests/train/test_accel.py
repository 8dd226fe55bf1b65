"""flexmoe/train/accel.py: the end of a multi-process command."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from accelerate import PartialState
from click.testing import CliRunner

from flexmoe.cli import main
from flexmoe.testing import free_port


@pytest.fixture
def process_group():
    """A real one-process gloo group, as `accelerate launch` leaves each rank with one; torn down in any case."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    PartialState(cpu=True)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()


def test_a_command_that_succeeded_tears_down_the_process_group(process_group, ckpt):
    """Left to interpreter exit, gloo's threads can abort a rank whose work is done (pytorch#190489)."""
    r = CliRunner().invoke(main, ["inspect", str(ckpt.pkg["code"])])
    assert r.exit_code == 0, r.output
    assert not dist.is_initialized()
    assert PartialState._shared_state == {}  # a later command in this process sets accelerate up afresh


def test_a_command_that_failed_leaves_the_group_to_the_exit(process_group, tmp_path):
    """The other ranks may still be inside a collective: a teardown here could hang them."""
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "missing" in r.output
    assert dist.is_initialized()
