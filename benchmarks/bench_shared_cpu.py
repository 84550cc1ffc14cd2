"""The embed rate on a shared CPU: idle, beside one busy process, and beside it with OMP_NUM_THREADS=1, for the code
before the issue 26 item 5 fix and after it, side by side in one run.

Usage:
    python benchmarks/bench_shared_cpu.py [--images 100] [--repeats 2] [--cpus 0,1] [--before-tree DIR]
                                          [--json OUT.json]

Each cell is ``embedpipe embed`` of one fresh shard of real JPEGs (``pipeline.bench.make_bench_shards``: 500x375
photos of 40-120 KB) with the default options, in a fresh process, its rate as the run's summary reports it
(setup excluded). The compile cache and the micro-batch measurements are filled first, on the idle machine, by
runs the table leaves out. The busy process is a Python busy loop, pinned nowhere, started before the cells of
its condition and killed after them. Conditions and code paths alternate, ``--repeats`` times, so that a burst
of other load hits all alike; each cell shows the range of its runs, ratios use their medians.

"Before" is this checkout with ``EMBEDPIPE_OPENMP_DEFAULTS=0`` (OpenMP's own spin-waiting, its own thread count),
or, with ``--before-tree``, another checkout (e.g. ``git worktree add /tmp/before 753549e``). ``--cpus 0,1``
runs everything, the busy loop included, on those CPUs: the 2-core case on a larger machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# The environment as given, before embedpipe's import below sets its OpenMP defaults in this process: each run
# starts from it less every thread and wait setting, so that it sees embedpipe's own defaults, or the one asked.
STRIPPED = ("OMP_", "GOMP_", "KMP_", "MKL_NUM_THREADS", "EMBEDPIPE_THREADS", "EMBEDPIPE_OPENMP_DEFAULTS")
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED)}
sys.path.insert(0, str(HERE))

from pipeline.bench import make_bench_shards  # noqa: E402

CHILD = """
import json, sys
from pipeline.embedding.runner import embed
s = embed([sys.argv[1]], sys.argv[2], quiet=True, cache_dir=sys.argv[3])
import torch
print(json.dumps({"images_per_s": s.images_per_s, "embedded": s.embedded, "threads": torch.get_num_threads()}))
"""
CONDITIONS = [("idle", False, {}), ("one busy process", True, {}),
              ("one busy process, OMP_NUM_THREADS=1", True, {"OMP_NUM_THREADS": "1"})]


def embed_rate(tree: Path, shard: Path, out: Path, cache: Path, env: dict[str, str]) -> dict:
    """One ``embed`` of ``shard`` by the code in ``tree`` in a fresh process: its summary's rate and threads."""
    run = subprocess.run([sys.executable, "-c", CHILD, str(shard), str(out), str(cache)], capture_output=True,
                         text=True, timeout=600, env={**BASE_ENV, "PYTHONPATH": str(tree), **env})
    if run.returncode != 0:
        raise SystemExit(f"embed failed ({tree}, {env}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], env=BASE_ENV)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100, help="JPEGs in the shard (default 100).")
    ap.add_argument("--repeats", type=int, default=2, help="Runs of each cell (default 2).")
    ap.add_argument("--cpus", default=None, help="Run on these CPUs only, e.g. 0,1 (default: as started).")
    ap.add_argument("--before-tree", default=None, help="A checkout of the code before (default: this one with "
                                                        "EMBEDPIPE_OPENMP_DEFAULTS=0).")
    ap.add_argument("--json", default=None, help="Also write the result here.")
    a = ap.parse_args(argv)
    if a.cpus:  # inherited by every process started from here, the busy loop too
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="embedpipe-shared-cpu-"))
    (shard,) = make_bench_shards(tmp / "shards", a.images, shard_size=a.images)
    paths = {"before": (Path(a.before_tree).resolve() if a.before_tree else HERE,
                        {} if a.before_tree else {"EMBEDPIPE_OPENMP_DEFAULTS": "0"}),
             "after": (HERE, {})}
    runs = 0

    def rate(path: str, env: dict[str, str]) -> dict:
        nonlocal runs
        runs += 1
        tree, own = paths[path]
        return embed_rate(tree, shard, tmp / f"out-{runs}", tmp / f"cache-{path}", {**own, **env})

    cells: dict[tuple[str, str], list[dict]] = {}
    try:
        for path in paths:  # the compile cache and both thread counts' micro-batch, measured on the idle machine
            for env in ({}, {"OMP_NUM_THREADS": "1"}):
                rate(path, env)
        for _ in range(a.repeats):
            for name, busy, env in CONDITIONS:
                other = busy_loop() if busy else None
                try:
                    time.sleep(0.5 if busy else 0)
                    for path in paths:
                        cells.setdefault((name, path), []).append(rate(path, env))
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in cells.items()}
    result = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "cpu": cpu_name(), "python": sys.version.split()[0]},
        "images": a.images, "repeats": a.repeats, "before": str(paths["before"][0]) + (
            "" if a.before_tree else " with EMBEDPIPE_OPENMP_DEFAULTS=0"),
        "cells": [{"condition": n, "code": p, "runs": v} for (n, p), v in cells.items()],
        "median_images_per_s": {f"{n} / {p}": r for (n, p), r in med.items()},
        "default_vs_one_thread_under_load": {p: med[CONDITIONS[1][0], p] / med[CONDITIONS[2][0], p] for p in paths},
        "after_vs_before_idle": med["idle", "after"] / med["idle", "before"],
        "wall_s": time.perf_counter() - t0,
    }
    print(table(result, cells, med))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def threads(run: dict) -> str:
    return f"{run['threads']} thread" + ("s" if run["threads"] != 1 else "")


def table(result: dict, cells: dict, med: dict) -> str:
    def cell(name: str, path: str) -> str:
        rates = sorted(r["images_per_s"] for r in cells[name, path])
        spread = f"{rates[0]:.1f}" if len(rates) == 1 else f"{rates[0]:.1f}–{rates[-1]:.1f}"
        return f"{spread} ({threads(cells[name, path][0])})"

    m = result["machine"]
    lines = [f"embed rate (img/s) of {result['images']} JPEGs, default options, {m['cpus']} CPUs ({m['cpu']}), "
             f"{result['repeats']} runs per cell, {result['wall_s']:.0f} s in all; before = {result['before']}",
             "", "| condition | before | after | after / before |", "| --- | --- | --- | --- |"]
    for name, _, _ in CONDITIONS:
        lines.append(f"| {name} | {cell(name, 'before')} | {cell(name, 'after')} | "
                     f"{med[name, 'after'] / med[name, 'before']:.2f}× |")
    ratio = result["default_vs_one_thread_under_load"]
    lines.append(f"| default ÷ OMP_NUM_THREADS=1, one busy process (target ≥ 0.8) | {ratio['before']:.2f} | "
                 f"{ratio['after']:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
