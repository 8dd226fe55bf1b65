"""Merge / add / remove of a synthetic checkpoint in the real layout, against `cp -r` of the same bytes.

Builds a random bf16 anchor of the 1B class (16 layers, hidden 2048, FFN 8192, vocab 100352: ~3 GB) and three
expert packages (~1.6 GB each), then times, each in a fresh child process that reports its own peak RSS (VmHWM):
  merge  anchor + 2 experts           vs  cp -r anchor pkg1 pkg2
  add    merged + expert 3            vs  cp -r merged pkg3
  remove expert 2 from the 3-expert   vs  cp -r merged3
Each run starts with only its inputs in the page cache and no dirty pages (`sync`); op and `cp` alternate
`--repeats` times and the best of each counts. flexmoe fsyncs its output, so `cp` is shown with and without a
closing `sync`; `x cp+sync` is the like-for-like ratio. Goals (issue 5): time <= 1.5x cp, peak RSS <= 3x the largest tensor + 0.5 GB.

    python benchmarks/merge_bench.py                       # full size (needs ~35 GB free disk, ~2 min build)
    python benchmarks/merge_bench.py --toy                 # seconds; what the CPU test runs
    python benchmarks/merge_bench.py --layers 4            # the 1B-class tensors, 4 layers (~1 min on 2 cores)
    python benchmarks/merge_bench.py --workdir /big/disk --json-out bench.json --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16)
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM belongs to the address space exec created, so unlike the
    rusage of a child it does not include the (large) parent's RSS at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(argv: list[str]) -> tuple[dict, float]:
    """Run argv; return (its last stdout line as JSON, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed:\n{proc.stderr.decode()[-2000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]), wall


def _sync() -> None:
    subprocess.run(["sync"], check=True)


def _size(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())


def _time_cp(srcs: list[Path], dst: Path) -> tuple[float, float]:
    """Seconds of `cp -r srcs dst/` and of the same plus `sync` (durable, like flexmoe's fsync)."""
    dst.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", *map(str, srcs), str(dst)], check=True)
    t_cp = time.perf_counter() - t0
    _sync()
    t_sync = time.perf_counter() - t0
    shutil.rmtree(dst)
    return t_cp, t_sync


def run_op(op: str, args: list[str]) -> None:
    """Child side: one surgery verb, timed without interpreter start-up; prints one JSON line."""
    t0 = time.perf_counter()
    from flexmoe import surgery
    from flexmoe.config import MergeConfig

    t_import = time.perf_counter() - t0
    cfg = MergeConfig(progress=False)
    t0 = time.perf_counter()
    if op == "merge":
        surgery.merge(args[0], args[1:-1], args[-1], cfg)
    elif op == "add":
        surgery.add(args[0], args[1], args[2], cfg)
    elif op == "remove":
        surgery.remove(args[0], args[1], args[2], cfg)
    elif op != "idle":
        raise SystemExit(f"unknown op {op}")
    print(json.dumps({"op_s": time.perf_counter() - t0, "import_s": t_import, "peak_rss": _peak_rss()}))


def build(work: Path, shape: dict, n_packages: int = 3) -> tuple[Path, list[Path], int]:
    """The synthetic anchor and packages; returns them and the largest tensor's byte size."""
    import torch

    from flexmoe.io.reader import LazyReader
    from flexmoe.testing import build_synthetic_anchor, build_synthetic_package

    anchor = build_synthetic_anchor(work / "anchor", dtype=torch.bfloat16, **shape)
    pkgs = [build_synthetic_package(work / f"pkg{i}", anchor, f"expert{i}", i) for i in range(1, n_packages + 1)]
    with LazyReader.from_dir(anchor) as r:
        largest = max(r.spec(k).nbytes for k in r.keys())
    return anchor, pkgs, largest


def _files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in Path(p).rglob("*") if f.is_file()]


def _start(work: Path, inputs: list[Path]) -> None:
    """The same start for every timed run: no dirty pages, only `inputs` in the page cache.

    Without this the runs inherit each other's cache (this benchmark's data is larger than RAM) and the figures
    measure the machine's memory pressure rather than the copy.
    """
    import os

    _sync()
    keep = set(_files(inputs))
    for f in _files([work]):
        if f not in keep:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    for f in keep:
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def bench(work: Path, shape: dict, repeats: int = 2) -> dict:
    me = [sys.executable, str(Path(__file__).resolve()), "--op"]
    t0 = time.perf_counter()
    anchor, pkgs, largest = build(work, shape)
    build_s = time.perf_counter() - t0
    idle_rss = None if shape is TOY else _child(me + ["idle"])[0]["peak_rss"]  # python + torch + flexmoe, idle
    rows = []
    plan = [("merge", [anchor, pkgs[0], pkgs[1]], work / "m2", [anchor, pkgs[0], pkgs[1]]),
            ("add", [work / "m2", pkgs[2]], work / "m3", [work / "m2", pkgs[2]]),
            ("remove", [work / "m3", "expert2"], work / "m3r", [work / "m3"])]
    for op, args, out, copied in plan:
        nbytes = _size(copied)
        cps, runs = [], []
        for rep in range(repeats):
            _start(work, copied)
            cps.append(_time_cp(copied, work / "cp"))
            if rep:
                shutil.rmtree(out)
            _start(work, copied)
            res, wall = _child(me + [op, *map(str, args), str(out)])
            runs.append((res["op_s"], wall, res["peak_rss"]))
        (op_s, wall, _), (t_cp, t_cp_sync) = min(runs), min(cps)  # best of each: neighbours on the machine vary
        rows.append({"op": op, "bytes": nbytes, "op_s": op_s, "wall_s": wall, "cp_s": t_cp, "cp_sync_s": t_cp_sync,
                     "ratio_cp": op_s / t_cp, "ratio_cp_sync": op_s / t_cp_sync,
                     "peak_rss": max(r[2] for r in runs), "out_bytes": _size([out]),
                     "runs_op_s": [r[0] for r in runs], "runs_cp_sync_s": [c[1] for c in cps]})
    shutil.rmtree(work / "m3r")
    rss_goal = 3 * largest + 0.5 * 2**30
    return {"shape": shape, "dtype": "bfloat16", "anchor_bytes": _size([anchor]), "package_bytes": _size([pkgs[0]]),
            "largest_tensor_bytes": largest, "build_s": build_s, "idle_rss": idle_rss, "rss_goal": rss_goal,
            "ops": rows,
            "goals_met": {"time_le_1.5x_cp_sync": all(r["ratio_cp_sync"] <= 1.5 for r in rows),
                          "time_le_1.5x_cp": all(r["ratio_cp"] <= 1.5 for r in rows),
                          "rss": all(r["peak_rss"] <= rss_goal for r in rows)}}


def table(result: dict) -> str:
    gb = 1e9
    idle = "-" if result["idle_rss"] is None else f"{result['idle_rss'] / gb:.2f}"
    lines = [f"anchor {result['anchor_bytes'] / gb:.2f} GB, package {result['package_bytes'] / gb:.2f} GB, largest tensor "
             f"{result['largest_tensor_bytes'] / gb:.3f} GB; RSS goal {result['rss_goal'] / gb:.2f} GB; "
             f"idle python+torch RSS {idle} GB",
             f"{'op':<7} {'GB moved':>9} {'flexmoe s':>10} {'cp s':>7} {'cp+sync s':>10} {'x cp':>6} {'x cp+sync':>10} "
             f"{'peak RSS GB':>12} {'GB/s':>6}"]
    for r in result["ops"]:
        lines.append(f"{r['op']:<7} {r['bytes'] / gb:9.2f} {r['op_s']:10.2f} {r['cp_s']:7.2f} {r['cp_sync_s']:10.2f} "
                     f"{r['ratio_cp']:6.2f} {r['ratio_cp_sync']:10.2f} {r['peak_rss'] / gb:12.2f} "
                     f"{r['bytes'] / gb / r['op_s']:6.2f}")
    lines.append("goals met: " + ", ".join(f"{k}={v}" for k, v in result["goals_met"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="tiny shapes (seconds), for tests")
    ap.add_argument("--layers", type=int, default=None,
                    help="the full shape's tensors with this many layers instead of 16 (a smaller, faster run)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp folder in the cwd)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each op and of cp; the best counts")
    ap.add_argument("--op", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.op:
        run_op(a.op[0], a.op[1:])
        return None
    base = a.workdir or Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="merge_bench.", dir=base))
    try:
        shape = TOY if a.toy else FULL if a.layers is None else {**FULL, "num_layers": a.layers}
        result = bench(work, shape, repeats=1 if a.toy else a.repeats)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    print(json.dumps(result))
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
