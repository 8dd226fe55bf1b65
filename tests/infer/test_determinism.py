"""`flexmoe.infer.deterministic`: torch's switch on inside the block only, a cuBLAS setting torch accepts, one-line
errors. (What the decoder does in that mode: tests/infer/test_decode.py and the GPU tests.)"""

from __future__ import annotations

import os

import pytest
import torch


def test_deterministic_block_sets_and_restores_the_switch(monkeypatch):
    """`deterministic()` turns torch's switch on (and asks cuBLAS for a fixed workspace) only inside the block, and
    puts back whatever was set before, also when the block raises."""
    from flexmoe.infer import deterministic
    from flexmoe.infer.determinism import CUBLAS_WORKSPACE

    monkeypatch.delenv(CUBLAS_WORKSPACE, raising=False)
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ[CUBLAS_WORKSPACE] == ":4096:8"
        assert not torch.utils.deterministic.fill_uninitialized_memory  # no NaN fill kernel per allocation
    assert not torch.are_deterministic_algorithms_enabled() and CUBLAS_WORKSPACE not in os.environ
    assert torch.utils.deterministic.fill_uninitialized_memory
    with deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv(CUBLAS_WORKSPACE, ":16:8")  # the user's own setting is kept
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(KeyError), deterministic():
            assert os.environ[CUBLAS_WORKSPACE] == ":16:8"
            raise KeyError("inside")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ[CUBLAS_WORKSPACE] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_block_refuses_a_cublas_setting_torch_would_reject(monkeypatch):
    from flexmoe.errors import ConfigError
    from flexmoe.infer import deterministic
    from flexmoe.infer.determinism import CUBLAS_WORKSPACE

    monkeypatch.setenv(CUBLAS_WORKSPACE, ":0:0")
    with pytest.raises(ConfigError, match=r"needs CUBLAS_WORKSPACE_CONFIG :4096:8 or :16:8, this environment sets "
                                          r"':0:0': unset it"):
        with deterministic():
            pass
    assert not torch.are_deterministic_algorithms_enabled() and os.environ[CUBLAS_WORKSPACE] == ":0:0"


def test_deterministic_block_names_an_operation_without_a_deterministic_kernel():
    from flexmoe.errors import ConfigError
    from flexmoe.infer import deterministic

    with pytest.raises(ConfigError, match=r"^put_ does not have a deterministic implementation: run without "):
        with deterministic():
            torch.zeros(4).put_(torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="unrelated"), deterministic():  # other errors pass through as they are
        raise RuntimeError("unrelated")
    assert not torch.are_deterministic_algorithms_enabled()
