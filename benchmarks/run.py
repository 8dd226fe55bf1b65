"""`make bench`: the training, inference and merge benchmarks in one go, each in its own process, tables last.

    PYTHONPATH=. python3 benchmarks/run.py                      # all three (~10 min on one H100: train ~4, infer ~4, merge ~2)
    PYTHONPATH=. python3 benchmarks/run.py --only train         # one of them (comma-separated: train,infer,merge)
    PYTHONPATH=. python3 benchmarks/run.py --quick              # train and infer --quick, merge as is
    PYTHONPATH=. python  benchmarks/run.py --tiny               # toy sizes on CPU (seconds)
    PYTHONPATH=. python3 benchmarks/run.py --shape 7b           # the 7B shape (~4 + 3.5 + 4 min on one H200)

Each benchmark writes its JSON under $OUT (default runs/bench): train_bench.json, infer_bench.json, merge_bench.json.
Output streams as it comes; the closing lines of each benchmark (its table) are printed again at the end, so the
tail of the log holds all three tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHES = ("train", "infer", "merge")


def command(name: str, quick: bool, tiny: bool, out: Path, shape: str = "1b") -> list[str]:
    py = [sys.executable]
    shaped = ["--shape", shape] if shape != "1b" else []
    if name == "train":
        return (py + [str(HERE / "train_bench.py")] + shaped + (["--quick"] if quick else [])
                + (["--tiny"] if tiny else []))
    if name == "infer":
        return py + [str(HERE / "infer_bench.py")] + shaped + (["--quick"] if quick or tiny else [])
    return (py + [str(HERE / "merge_bench.py"), "--json-out", str(out / "merge_bench.json")] + shaped
            + (["--toy"] if tiny else []))


def run(name: str, cmd: list[str], env: dict, keep: int = 30) -> tuple[int, list[str], float]:
    """Stream a benchmark's output through, keeping its last `keep` lines."""
    t = time.perf_counter()
    tail: deque[str] = deque(maxlen=keep)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        tail.append(line.rstrip("\n"))
    return proc.wait(), list(tail), time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of train,infer,merge")
    ap.add_argument("--quick", action="store_true", help="the --quick variants of train and infer")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on CPU")
    ap.add_argument("--shape", default="1b", choices=("1b", "7b"), help="model shape of all three (benchmarks/shapes.py)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHES]
    if bad:
        ap.error(f"unknown benchmark {bad[0]!r}: choose from {', '.join(BENCHES)}")
    out = Path(os.environ.get("OUT", "runs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if args.tiny:
        env["TINY"] = "1"
    results = []
    for name in names:
        print(f"\n======== {name} bench ========", flush=True)
        results.append((name, *run(name, command(name, args.quick, args.tiny, out, args.shape), env)))
    print("\n======== summary ========")
    for name, rc, tail, wall in results:
        print(f"\n---- {name}: exit {rc}, {wall:.0f} s ----")
        print("\n".join(tail))
    return max((rc for _, rc, _, _ in results), default=0)


if __name__ == "__main__":
    sys.exit(main())
