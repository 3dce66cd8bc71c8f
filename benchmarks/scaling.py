"""How the engine's threads scale against as many independent single-thread processes.

    .venv/bin/python benchmarks/scaling.py [--shape Z,Y,X] [--threads 2,4,8,16] [--block-mib 0,1,4] [--repeat 2]

For each N: the engine with ``threads=N`` (best wall of R, in this process) against N processes that each run
the engine with ``threads=1`` at the same moment (best of R each).  Speed-ups are against the engine with one
thread alone in this process; efficiency = (threads speed-up) / (processes speed-up), the issue's measure.
``--block-mib`` lists block sizes to compare (MiB of one block's transform buffer; 0 = the engine's own rule,
``tasks.dog._task_bytes``): a tuning experiment, also run at one thread (CPU time).
Run it on a quiet machine with at least max(N) cores; the wall times of a shared machine say little.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.engine import S_LARGE, S_SMALL, make_volume, side_by_side  # noqa: E402


def best(fn, repeat):
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="413,512,512")
    ap.add_argument("--threads", default="2,4,8,16")
    ap.add_argument("--block-mib", default="0")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from tasks import dog

    shape = tuple(int(x) for x in args.shape.split(","))
    ns = [int(x) for x in args.threads.split(",")]
    floors = [float(x) for x in args.block_mib.split(",")]
    rule = dog._task_bytes

    def blocks(mib):
        dog._task_bytes = rule if not mib else (lambda threads: int(mib * (1 << 20)))
    v = make_volume(shape)
    print(f"shape {shape} uint16, sigma ({S_SMALL:.3f}, {S_LARGE:.3f}), nearest; cpus "
          f"{len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.1f}", flush=True)
    run = lambda th: dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=th)  # noqa: E731
    run(1)
    one = {}
    for f in floors:
        blocks(f)
        one[f] = best(lambda: run(1), args.repeat)
    blocks(0)
    w1, c1 = best(lambda: run(1), args.repeat) if 0 not in one else one[0]
    print(f"engine 1 thread: {w1:.3f} s wall, {c1:.3f} s CPU (blocks " + ", ".join(
        f"{'rule' if not f else f'{f:g} MiB'}: {c:.3f} s CPU" for f, (_, c) in one.items()) + ")", flush=True)
    rows = []
    for n in ns:
        tn = side_by_side(shape, n, args.repeat)
        sp_proc = n * w1 / tn
        cells = []
        for f in floors:
            blocks(f)
            run(n)
            wn, cn = best(lambda: run(n), args.repeat)
            cells.append((f, wn, cn, w1 / wn, (w1 / wn) / sp_proc))
        blocks(0)
        rows.append((n, tn, sp_proc, cells))
        print(f"N={n}: {n} procs {tn:.3f} s each -> speed-up {sp_proc:.2f}; " + "; ".join(
            f"blocks {'rule' if not f else f'{f:g} MiB'}: {wn:.3f} s ({cn:.2f} s CPU) speed-up {sp:.2f} eff {eff:.2f}"
            for f, wn, cn, sp, eff in cells), flush=True)
    print()
    print("| N | N procs speed-up | " + " | ".join(f"threads, blocks {'rule' if not f else f'{f:g} MiB'}: speed-up (efficiency)" for f in floors) + " |")
    print("|---|---|" + "---|" * len(floors))
    for n, tn, sp_proc, cells in rows:
        print(f"| {n} | {sp_proc:.2f} | " + " | ".join(f"{sp:.2f} ({eff:.2f})" for _, _, _, sp, eff in cells) + " |")
    print(f"\nengine 1 thread {w1:.3f} s; load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
