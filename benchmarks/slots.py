"""Several positions at once on one node: task slots in one worker process vs one process per slot.

    .venv/bin/python benchmarks/slots.py [--shape Z,Y,X] [--layouts 4x4,8x2] [--repeat 2]

For each layout KxT (K positions at once, T engine threads each): the wall time of K threads of one process
each running ``difference_of_gaussians(threads=T)`` at the same moment (what a Dask worker with K task slots
does), against K processes doing the same (a worker process per slot, ``processes: K``). Best of R.
Throughput ratio > 1 means the processes are faster. Run it on a quiet machine with K*T cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.engine import S_LARGE, S_SMALL, make_volume, side_by_side  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="206,512,512")
    ap.add_argument("--layouts", default="4x4,8x2")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
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
        many = side_by_side(shape, k, args.repeat, threads=t)
        print(f"| {k} x {t} | {one:.2f} s | {many:.2f} s | {one / many:.2f} |", flush=True)


if __name__ == "__main__":
    main()
