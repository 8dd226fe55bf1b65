"""The checkpoint commands driven for real: happy path, one-line refusals that leave nothing behind, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flexmoe.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".flexmoe-" in p.name]


def test_merge_inspect_remove_add_extract(ckpt, tmp_path):
    r = run("merge", "--anchor", ckpt.anchor, "--expert", ckpt.pkg["code"], "--expert", ckpt.pkg["news"],
            "--out", "m", "-q")
    assert r.exit_code == 0, r.output
    assert "experts public, code, news (E=3), top-k 3" in r.output
    r = run("inspect", "m", "--json", "--verify")
    info = json.loads(r.output)
    assert info["kind"] == "merged" and info["top_k"] == 3 and info["fingerprint_verified"] is True
    assert [e["name"] for e in info["experts"]] == ["public", "code", "news"] and info["shards"]
    r = run("inspect", "m")
    assert r.exit_code == 0 and "(verified)" not in r.output and "[2] news" in r.output
    r = run("remove", "m", "--expert", "news", "--out", "m2", "-q")
    assert r.exit_code == 0 and "top-k 3 -> 2" in r.output
    r = run("add", "m2", "--expert", ckpt.pkg["law"], "--in-place", "-q", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["experts"] == ["public", "code", "law"]
    r = run("extract", "m2", "--expert", "law", "--out", "law", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "law" / "expert.safetensors").read_bytes() == (ckpt.pkg["law"] / "expert.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["law", "m", "m2"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(pkg: Path) -> None:
    f = pkg / "expert.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_header(pkg: Path) -> None:
    f = pkg / "expert.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe\x00!"
    f.write_bytes(bytes(data))


def _forge_fingerprint(pkg: Path) -> None:
    card = json.loads((pkg / "expert.json").read_text())
    card["anchor_fingerprint"] = "sha256:" + "0" * 64
    (pkg / "expert.json").write_text(json.dumps(card))


BAD = {
    # name: (setup(ckpt, tmp) -> argv, expected message)
    "fingerprint": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert",
                                  _mutate(_copy(c.pkg["code"], t / "p"), _forge_fingerprint), "--out", "out"],
                    "expert 'code'"),
    "other_anchor": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert", c.foreign, "--out", "out"],
                     "trained on anchor"),
    "duplicate": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert", c.pkg["code"], "--expert",
                                c.zero_bias["code"], "--out", "out"], "duplicate expert name 'code'"),
    "hidden_size": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert", c.narrow, "--out", "out"],
                    "expert 'narrow': tensor model.layers.0.mlp.gate_proj.weight"),
    "truncated": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert",
                                _mutate(_copy(c.pkg["code"], t / "p"), _truncate), "--out", "out"],
                   "bytes, the manifest says"),
    "corrupt": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert",
                              _mutate(_copy(c.pkg["code"], t / "p"), _corrupt_header), "--out", "out"],
                 "the manifest says"),
    "not_a_package": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert", c.anchor, "--out", "out"],
                      "not an expert package"),
    "out_exists": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert", c.pkg["code"], "--out",
                                 _mkdir(t / "out")], "already exists"),
    "bad_shard_size": (lambda c, t: ["merge", "--anchor", c.anchor, "--expert", c.pkg["code"], "--out", "out",
                                     "--shard-size", "lots"], "bad size"),
    "remove_unknown": (lambda c, t: ["remove", _merged(c, t), "--expert", "math", "--out", "out"], "no expert 'math'"),
    "remove_public": (lambda c, t: ["remove", _merged(c, t), "--expert", "public", "--out", "out"],
                      "anchor's own FFN"),
    "missing_shard": (lambda c, t: ["remove", _mutate(_merged(c, t, "1KB"), _drop_shard), "--expert", "code",
                                    "--out", "out"], "is missing"),
    "add_foreign": (lambda c, t: ["add", _merged(c, t), "--expert", c.foreign, "--out", "out"], "trained on anchor"),
    "out_and_in_place": (lambda c, t: ["add", _merged(c, t), "--expert", c.pkg["law"], "--out", "out", "--in-place"],
                         "exactly one of --out DIR or --in-place"),
    "extract_unknown": (lambda c, t: ["extract", _merged(c, t), "--expert", "math", "--out", "out"], "no expert"),
}


def _mutate(path: Path, fn) -> Path:
    fn(path)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _merged(c, t: Path, shard_size: str = "5GB") -> Path:
    from flexmoe.checkpoint import surgery
    from flexmoe.config import MergeConfig

    surgery.merge(MergeConfig(c.anchor, [c.pkg["code"], c.pkg["news"]], shard_size=shard_size), t / "m", progress=False)
    return t / "m"


def _drop_shard(merged: Path) -> None:
    shards = sorted(merged.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(ckpt, tmp_path, case, digest):
    setup, message = BAD[case]
    argv = setup(ckpt, tmp_path)
    inputs = [Path(a) for a in argv if isinstance(a, Path) and Path(a).name != "out"]
    before = digest(ckpt.root, *[p for p in inputs if ckpt.root not in p.parents])
    existed = (tmp_path / "out").exists()
    r = run(*argv)
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output
    assert digest(ckpt.root, *[p for p in inputs if ckpt.root not in p.parents]) == before
    assert (tmp_path / "out").exists() == existed
    assert not leftovers(tmp_path)


KILL_SCRIPT = """
import sys
from flexmoe.checkpoint import surgery
from flexmoe.config import MergeConfig
surgery.merge(MergeConfig(sys.argv[1], [sys.argv[2]], shard_size="32MB"), sys.argv[3], progress=False)
"""


def test_kill_9_during_merge_leaves_no_output(tmp_path, digest):
    """A real merge of a ~180 MB checkpoint, killed once its first shard is being written."""
    import torch

    from flexmoe.testing import build_synthetic_anchor, build_synthetic_package

    anchor = build_synthetic_anchor(tmp_path / "anchor", vocab_size=16000, hidden_size=512, intermediate_size=2048,
                                    num_layers=4, num_heads=8, dtype=torch.float32, shard_size="100MB")
    pkg = build_synthetic_package(tmp_path / "pkg", anchor, "big", 1)
    before = digest(anchor, pkg)
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(anchor), str(pkg), str(out)])
    deadline = time.time() + 60
    killed = False
    while time.time() < deadline and proc.poll() is None:
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.flexmoe-tmp.")]
        if tmp and any(f.stat().st_size > 0 for f in tmp[0].glob("*.safetensors")):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the merge finished before it could be killed; make the synthetic input larger"
    assert not out.exists()
    assert digest(anchor, pkg) == before
    # The next run cleans up the dead run's temp folder and succeeds.
    r = run("merge", "--anchor", anchor, "--expert", pkg, "--out", out, "-q", "--shard-size", "32MB")
    assert r.exit_code == 0, r.output
    assert not leftovers(tmp_path)
