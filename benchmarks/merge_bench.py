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
    python benchmarks/merge_bench.py --shape 7b            # 7B shape, as many experts as the disk holds (~4 min)
    python benchmarks/merge_bench.py --shape 7b --toy      # its plan at toy size (the CPU test)

--shape 7b (issue 18): the FlexOlmo release's shape (benchmarks/shapes.py): anchor 7.30B = 14.6 GB bf16, one expert
package 8.66 GB, a merged checkpoint of E experts 5.94 + 8.66 E GB (7 experts: 66.5 GB). Inputs and outputs of
the 7x7B do not fit a 64 GiB disk together, so the plan is built around the largest merged checkpoint M_E the free
disk allows: merge anchor + E-1 packages -> M_E; remove expert E-1 from M_E -> M_(E-1); add the package of expert
E-1 (rebuilt: its inputs were deleted to make room) back to M_(E-1) -> M_E. Inputs no longer needed are deleted
between the steps, so the disk peak is twice M_E (inputs + output, or inputs + the cp copy): 46.5 GB at E = 2,
63.9 GB at E = 3. E is the largest in 7..2 whose peak fits the free disk less 3 GB (`plan_7b`); if even E = 2
does not, the layers are cut (the tensors keep their 7B shapes, so GB/s and peak RSS stay those of the 7B shape,
and the times scale with the layers). One run of each op and of cp (`--repeats 1`), in a budget (`--budget-s`).
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
from flexmoe.config import AddConfig, RemoveConfig

FULL = dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16)
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
SEVEN_B = dict(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32)
DISK_RESERVE = 3 * 10**9  # free disk left untouched by the 7b plan


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
    from flexmoe.checkpoint import surgery
    from flexmoe.config import MergeConfig

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    if op == "merge":
        surgery.merge(MergeConfig(args[0], args[1:-1]), args[-1], progress=False)
    elif op == "add":
        surgery.add(AddConfig(args[0], args[1]), args[2], progress=False)
    elif op == "remove":
        surgery.remove(RemoveConfig(args[0], args[1]), args[2], progress=False)
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


def _time_op(me: list[str], work: Path, op: str, args: list, out: Path, copied: list[Path], repeats: int) -> dict:
    """`repeats` alternating runs of `cp -r copied` and of the op (a child process) from the same start; the best
    of each counts."""
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
    return {"op": op, "bytes": nbytes, "op_s": op_s, "wall_s": wall, "cp_s": t_cp, "cp_sync_s": t_cp_sync,
            "ratio_cp": op_s / t_cp, "ratio_cp_sync": op_s / t_cp_sync,
            "peak_rss": max(r[2] for r in runs), "out_bytes": _size([out]),
            "runs_op_s": [r[0] for r in runs], "runs_cp_sync_s": [c[1] for c in cps]}


def _goals(rows: list[dict], largest: int) -> tuple[float, dict]:
    rss_goal = 3 * largest + 0.5 * 2**30
    done = [r for r in rows if "op_s" in r]
    return rss_goal, {"time_le_1.5x_cp_sync": all(r["ratio_cp_sync"] <= 1.5 for r in done),
                      "time_le_1.5x_cp": all(r["ratio_cp"] <= 1.5 for r in done),
                      "rss": all(r["peak_rss"] <= rss_goal for r in done)}


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
        rows.append(_time_op(me, work, op, args, out, copied, repeats))
    shutil.rmtree(work / "m3r")
    rss_goal, goals = _goals(rows, largest)
    return {"shape": shape, "dtype": "bfloat16", "anchor_bytes": _size([anchor]), "package_bytes": _size([pkgs[0]]),
            "largest_tensor_bytes": largest, "build_s": build_s, "idle_rss": idle_rss, "rss_goal": rss_goal,
            "ops": rows, "goals_met": goals}


def sizes(shape: dict) -> dict[str, int]:
    """Predicted bytes (bf16) of the anchor, one expert package and a merged checkpoint's parts, from the shape."""
    H, I, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    shared = 2 * (L * (4 * H * H + 4 * H) + 2 * V * H + H)  # attention, norms, embedding, LM head, final norm
    ffn = 2 * L * 3 * H * I
    return {"shared": shared, "ffn": ffn, "anchor": shared + ffn, "package": ffn + 2 * L * H + 4 * L,
            "router_per_expert": 2 * L * H}


def merged_bytes(shape: dict, experts: int) -> int:
    s = sizes(shape)
    return s["shared"] + experts * (s["ffn"] + s["router_per_expert"])


def plan_7b(shape: dict, free: int | None, experts: int | None = None, layers: int | None = None) -> dict:
    """The experts E of the largest merged checkpoint and the layers, so that the plan's disk peak (twice the
    E-expert merged checkpoint) fits `free` bytes less DISK_RESERVE: E as given or the largest in 7..2 that fits;
    if E = 2 does not fit either, the layers are cut in steps of 1/4 of the shape's. `free` None: no limit."""
    room = None if free is None else free - DISK_RESERVE
    full_layers = shape["num_layers"]
    choices = [layers] if layers else [full_layers * n // 4 for n in (4, 3, 2, 1) if full_layers * n // 4 >= 1]
    reason = "as asked" if experts or layers else None
    for n in choices:
        s = {**shape, "num_layers": n}
        for e in ([experts] if experts else range(7, 1, -1)):
            peak = 2 * merged_bytes(s, e)
            if room is None or peak <= room or (experts and layers):
                if reason is None:
                    reason = (f"the largest that fits {free / 1e9:.1f} GB free disk" if free is not None
                              else "no disk limit given")
                    if n < full_layers:
                        reason += f"; even 2 experts at {full_layers} layers need {2 * merged_bytes(shape, 2) / 1e9:.1f} GB"
                return {"experts": e, "layers": n, "peak_disk": peak, "merged_bytes": merged_bytes(s, e),
                        "free_disk": free, "reason": reason}
    raise SystemExit(f"no 7b merge plan fits {free / 1e9:.1f} GB of free disk (even 2 experts at "
                     f"{choices[-1]} layers need {2 * merged_bytes({**shape, 'num_layers': choices[-1]}, 2) / 1e9:.1f} GB)")


def _filesystem(path: Path) -> str:
    """'fstype at mountpoint' of the mount holding `path` (a tmpfs would measure RAM, not a disk)."""
    best = ("?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[1]):
                best = (fstype, mount)
    except OSError:
        pass
    return f"{best[0]} at {best[1] or '?'}"


def bench_7b(work: Path, shape: dict, plan: dict, repeats: int = 1, budget_s: float = 1e9) -> dict:
    """The 7b plan (module docstring): merge -> remove -> add around the E-expert merged checkpoint, deleting what
    the next steps do not read so the disk peak stays at twice that checkpoint."""
    import torch

    from flexmoe.io.anchor import read_anchor
    from flexmoe.io.reader import LazyReader
    from flexmoe.testing import build_synthetic_anchor

    me = [sys.executable, str(Path(__file__).resolve()), "--op"]
    t_start = time.perf_counter()
    E, shape = plan["experts"], {**shape, "num_layers": plan["layers"]}
    anchor = build_synthetic_anchor(work / "anchor", dtype=torch.bfloat16, **shape)
    t_anchor = time.perf_counter() - t_start
    fingerprint = read_anchor(anchor).meta.fingerprint
    pkgs = [write_package(work / f"pkg{i}", shape, fingerprint, f"expert{i}", i) for i in range(1, E)]
    build_s = time.perf_counter() - t_start
    anchor_bytes, package_bytes = _size([anchor]), _size([pkgs[0]])
    with LazyReader.from_dir(anchor) as r:
        largest = max(r.spec(k).nbytes for k in r.keys())
    written = anchor_bytes + (E - 1) * package_bytes
    print(f"[{time.perf_counter() - t_start:6.1f}s] built anchor {anchor_bytes / 1e9:.2f} GB ({t_anchor:.1f} s) and "
          f"{E - 1} package(s) of {package_bytes / 1e9:.2f} GB: {written / 1e9 / build_s:.2f} GB/s", flush=True)
    idle_rss = _child(me + ["idle"])[0]["peak_rss"]
    rows, last = [], f"expert{E - 1}"
    m_full, m_less, m_again = work / f"m{E}", work / f"m{E - 1}", work / f"m{E}b"
    steps = [("merge", [anchor, *pkgs], m_full, [anchor, *pkgs]),
             ("remove", [m_full, last], m_less, [m_full]),
             ("add", [m_less, work / f"pkg{E - 1}"], m_again, [m_less, work / f"pkg{E - 1}"])]
    rate = None  # bytes a second of the last cp + sync, to predict what the next op costs
    for op, args, out, copied in steps:
        if op == "remove" and m_full.is_dir():  # only the E-expert checkpoint is read from now on
            for path in [anchor, *pkgs]:
                shutil.rmtree(path)
        if op == "add":  # the package of the expert just removed, rebuilt (the same bytes as merged) to add back
            shutil.rmtree(m_full, ignore_errors=True)
            write_package(work / f"pkg{E - 1}", shape, fingerprint, last, E - 1)
        nbytes = _size(copied) if all(Path(c).exists() for c in copied) else 0
        spent = time.perf_counter() - t_start
        predicted = None if rate is None else 2.5 * nbytes / rate  # cp + sync, the op, two cache warm-ups
        if rows and "skipped" in rows[-1]:
            rows.append({"op": op, "bytes": nbytes, "skipped": f"its input was not made ({rows[-1]['op']} skipped)"})
            continue
        if predicted is not None and spent + predicted > budget_s:
            print(f"[{spent:6.1f}s] {op}: skipped (budget {budget_s:.0f} s, predicted {predicted:.0f} s)", flush=True)
            rows.append({"op": op, "bytes": nbytes, "skipped": f"budget ({predicted:.0f} s predicted)"})
            continue
        row = _time_op(me, work, op, args, out, copied, repeats)
        rate = nbytes / row["cp_sync_s"]
        rows.append(row)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {op}: {nbytes / 1e9:.2f} GB in {row['op_s']:.1f} s "
              f"(cp {row['cp_s']:.1f} s, cp+sync {row['cp_sync_s']:.1f} s), peak RSS {row['peak_rss'] / 1e9:.2f} GB",
              flush=True)
    for path in work.iterdir():
        shutil.rmtree(path)
    rss_goal, goals = _goals(rows, largest)
    return {"shape": shape, "shape_name": "7b", "dtype": "bfloat16", "plan": plan, "anchor_bytes": anchor_bytes,
            "package_bytes": package_bytes, "largest_tensor_bytes": largest, "build_s": build_s,
            "build_gb_s": written / 1e9 / build_s, "idle_rss": idle_rss, "rss_goal": rss_goal, "ops": rows,
            "goals_met": goals}


def write_package(out: Path, shape: dict, fingerprint: str, name: str, seed: int) -> Path:
    """A random bf16 expert package of `shape` for the anchor with `fingerprint`, as
    `flexmoe.testing.build_synthetic_package` writes one (the same keys, values, card and manifest), but from the
    shape instead of the anchor's files, so it can be rebuilt once the anchor is deleted."""
    import json

    import torch

    from flexmoe.io import manifest
    from flexmoe.io.package import PACKAGE_CARD, ExpertCard, package_keys
    from flexmoe.io.safetensors_format import TensorSpec
    from flexmoe.io.writer import ShardWriter
    from flexmoe.io.keys import parse_dense_ffn
    from flexmoe.testing import _RandomPool

    H, I = shape["hidden_size"], shape["intermediate_size"]
    out.mkdir(parents=True, exist_ok=True)
    pool, g = _RandomPool(torch.bfloat16, 1000 + seed), torch.Generator().manual_seed(seed)
    tensors: dict = {}
    for k in package_keys(shape["num_layers"]):
        ffn = parse_dense_ffn(k)
        if ffn:
            tensors[k] = (H, I) if ffn[1] == "down_proj" else (I, H)
        elif k.endswith("router.weight"):
            tensors[k] = torch.randn(H, generator=g).to(torch.bfloat16)
        else:
            tensors[k] = torch.tensor(float(torch.rand((), generator=g)) - 0.75, dtype=torch.float32)
    specs = [TensorSpec(k, TensorSpec.of(k, pool.pool[:1]).dtype, v) if isinstance(v, tuple) else TensorSpec.of(k, v)
             for k, v in tensors.items()]
    with ShardWriter(out, specs, prefix="expert", max_shard_bytes=2**62) as w:
        for k, v in tensors.items():
            w.write(k, pool.tensor(v) if isinstance(v, tuple) else v)
        w.finalize()
    card = ExpertCard(name=name, anchor_fingerprint=fingerprint, router_source="random", flexmoe_version="synthetic")
    (out / PACKAGE_CARD).write_text(json.dumps(card.to_json(), indent=2) + "\n")
    manifest.seal(out, PACKAGE_CARD)
    return out


def table(result: dict) -> str:
    gb = 1e9
    idle = "-" if result["idle_rss"] is None else f"{result['idle_rss'] / gb:.2f}"
    lines = []
    if "plan" in result:
        plan, shape = result["plan"], result["shape"]
        free = "-" if plan["free_disk"] is None else f"{plan['free_disk'] / gb:.1f}"
        lines.append(f"7b shape (hidden {shape['hidden_size']}, FFN {shape['intermediate_size']}, {shape['num_layers']} "
                     f"layers): largest merged checkpoint {plan['experts']} experts = {plan['merged_bytes'] / gb:.1f} GB; "
                     f"disk peak {plan['peak_disk'] / gb:.1f} GB of {free} GB free on {plan.get('filesystem', '?')} "
                     f"({plan['reason']}); "
                     f"inputs written at {result['build_gb_s']:.2f} GB/s")
    lines += [f"anchor {result['anchor_bytes'] / gb:.2f} GB, package {result['package_bytes'] / gb:.2f} GB, largest tensor "
              f"{result['largest_tensor_bytes'] / gb:.3f} GB; RSS goal {result['rss_goal'] / gb:.2f} GB; "
              f"idle python+torch RSS {idle} GB",
              f"{'op':<7} {'GB moved':>9} {'flexmoe s':>10} {'cp s':>7} {'cp+sync s':>10} {'x cp':>6} {'x cp+sync':>10} "
              f"{'peak RSS GB':>12} {'GB/s':>6}"]
    for r in result["ops"]:
        if "skipped" in r:
            lines.append(f"{r['op']:<7} {r['bytes'] / gb:9.2f}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['op']:<7} {r['bytes'] / gb:9.2f} {r['op_s']:10.2f} {r['cp_s']:7.2f} {r['cp_sync_s']:10.2f} "
                     f"{r['ratio_cp']:6.2f} {r['ratio_cp_sync']:10.2f} {r['peak_rss'] / gb:12.2f} "
                     f"{r['bytes'] / gb / r['op_s']:6.2f}")
    lines.append("goals met: " + ", ".join(f"{k}={v}" for k, v in result["goals_met"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="tiny shapes (seconds), for tests")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp folder in the cwd)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each op and of cp; the best counts "
                                                               "(default 2; 7b: 1)")
    ap.add_argument("--shape", default="1b", choices=("1b", "7b"), help="1b (default) or the 7b plan (docstring)")
    ap.add_argument("--experts", type=int, default=None, help="7b: experts of the largest merged checkpoint "
                                                               "(default: the most the free disk holds)")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers of the shape: 1b's tensors with fewer than 16 (a faster run); 7b: default 32, "
                         "fewer only if the disk is short")
    ap.add_argument("--budget-s", type=float, default=280.0, help="7b: start no op predicted to end after this")
    ap.add_argument("--op", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.op:
        run_op(a.op[0], a.op[1:])
        return None
    base = a.workdir or Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="merge_bench.", dir=base))
    try:
        if a.shape == "7b":
            shape = TOY if a.toy else SEVEN_B
            free = None if a.toy else shutil.disk_usage(work).free
            plan = {**plan_7b(shape, free, a.experts, a.layers), "filesystem": _filesystem(work)}
            print(f"7b plan: {json.dumps(plan)}", flush=True)
            result = bench_7b(work, shape, plan, repeats=a.repeats or 1, budget_s=a.budget_s)
        else:
            shape = TOY if a.toy else FULL if a.layers is None else {**FULL, "num_layers": a.layers}
            result = bench(work, shape, repeats=1 if a.toy else a.repeats or 2)
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
