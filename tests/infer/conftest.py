"""Fixtures of the inference tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run_interpreted(code: str, timeout: int = 300) -> None:
    """Run `code` in a fresh Python with Triton's CPU interpreter and assert that it printed "ok".

    A subprocess, because TRITON_INTERPRET must be set before Triton is imported.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.fixture
def triton_interpreter():
    """`_run_interpreted`, skipping the test where Triton is not installed (the GPU tests cover the compiled
    kernels)."""
    pytest.importorskip("triton")
    return _run_interpreted
