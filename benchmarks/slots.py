"""Several positions at once on one node: task slots in one worker process vs one process per slot.

    .venv/bin/python benchmarks/slots.py [--shape Z,Y,X] [--layouts 4x4,8x2] [--repeat 2]

For each layout KxT (K positions at once, T engine threads each): the wall time of K threads of one process
each running ``difference_of_gaussians(threads=T)`` at the same moment (what a Dask worker with K task slots
does), against K processes doing the same (a worker process per slot, ``processes: K``). Best of R.
Throughput ratio > 1 means the processes are faster. Run it on a quiet machine with K*T cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.engine import S_LARGE, S_SMALL, make_volume  # noqa: E402


def _together(k, threads, v):
    from tasks import dog

    barrier = threading.Barrier(k)
    ends = []

    def one():
        barrier.wait()
        dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=threads)
        ends.append(time.perf_counter())

    ts = [threading.Thread(target=one) for _ in range(k)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return max(ends) - t0


def child(shape, threads, start_at, repeat):
    from tasks import dog

    v = make_volume(shape)
    dog.difference_of_gaussians(v[:8, :64, :64], S_SMALL, S_LARGE, threads=threads)
    walls = []
    for r in range(repeat):
        time.sleep(max(0.0, start_at + r * 0 - time.time()))
        t = time.perf_counter()
        dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=threads)
        walls.append(time.perf_counter() - t)
        start_at = time.time() + 0.5
    print(json.dumps(walls), flush=True)


def procs(k, threads, shape, repeat):
    start = time.time() + 2.0 + 0.004 * (shape[0] * shape[1] * shape[2]) / 1e6
    cmd = lambda: [sys.executable, os.path.abspath(__file__), "--child",  # noqa: E731
                   json.dumps([list(shape), threads, start, repeat])]
    ps = [subprocess.Popen(cmd(), stdout=subprocess.PIPE, text=True) for _ in range(k)]
    res = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
    return max(min(r) for r in res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="206,512,512")
    ap.add_argument("--layouts", default="4x4,8x2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        shape, threads, start, repeat = json.loads(args.child)
        child(tuple(shape), threads, start, repeat)
        return
    from tasks import dog

    shape = tuple(int(x) for x in args.shape.split(","))
    v = make_volume(shape)
    dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=1)
    print(f"shape {shape}; cpus {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}", flush=True)
    print("| K positions x T threads | K slots in one process (wall) | K processes (wall) | processes' throughput / one process's |")
    print("|---|---|---|---|")
    for lay in args.layouts.split(","):
        k, t = (int(x) for x in lay.split("x"))
        one = min(_together(k, t, v) for _ in range(args.repeat))
        many = procs(k, t, shape, args.repeat)
        print(f"| {k} x {t} | {one:.2f} s | {many:.2f} s | {one / many:.2f} |", flush=True)


if __name__ == "__main__":
    main()
