"""The decode-variants benchmark's switches are triton_decode's, and its defaults are the module's own (a renamed
switch or a changed default would otherwise make a variant measure something else, silently)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_variants_set_real_switches_and_restore_the_defaults():
    pytest.importorskip("triton")
    from flexmoe.infer import triton_decode

    spec = importlib.util.spec_from_file_location("decode_variants_under_test",
                                                  ROOT / "benchmarks" / "decode_variants_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert all(getattr(triton_decode, name) == value for name, value in bench.DEFAULTS.items())
    assert all(set(switches) <= set(bench.DEFAULTS) for switches in bench.VARIANTS.values())
    try:
        bench.configure(bench.VARIANTS["fused-block32"])
        assert triton_decode.FUSED_ATTENTION and triton_decode.ATTEND_BLOCK == 32
        bench.configure(bench.VARIANTS["sdpa"])
        assert not triton_decode.FUSED_ATTENTION and triton_decode.ATTEND_BLOCK is None
    finally:
        bench.configure({})
    assert all(getattr(triton_decode, name) == value for name, value in bench.DEFAULTS.items())
