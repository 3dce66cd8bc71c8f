"""Benchmark of what the flow adds around the engine (issue: throughput per node).

    .venv/bin/python benchmarks/flow.py [--shape Z,Y,X] [--positions N] [--cluster local] [--full]

In one run, on one dataset of uint16 positions (seed σ 50/2.35 and 200/2.35, mode nearest):
  * engine    : tasks.dog.difference_of_gaussians alone, warm, in a plain process, with the threads one
                task gets on the profile (best of 2 after a warm-up)
  * plain     : tasks.position.process_position on one position in a plain process (read, filter, write,
                mark), warm (mean of 2 after a warm-up), same threads; also under the Dask nanny's environment
  * flow 2 / N: `dogflow run` (the real console script, its own temporary Prefect API, the embedded default)
                on 2 and on N positions: wall time; marginal cost = (t_N - t_2) / (N - 2), fixed cost =
                t_2 - 2 * marginal; the rerun with nothing to do; the task time inside the Dask worker
                (from the markers) against the plain process: warm tasks (each worker process's first task,
                which also pays the first call's costs, left out) like the plain figure, and every task
  * orchestration CPU: CPU seconds of the flow process and of the temporary Prefect server per wall
                second, while tasks run (between the first and the last completion marker)
  * --full    : one full seed position (413, 2048, 2048): engine alone vs the task in the flow, with its
                read and write seconds (needs ~15 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOGFLOW = Path(sys.executable).parent / "dogflow"

from benchmarks.engine import NANNY_ENV  # noqa: E402


def make_dataset(path: Path, positions: int, shape: tuple[int, int, int]) -> None:
    import zarr

    import numpy as np

    chunks = (1, 1, min(shape[0], 64), min(shape[1], 256), min(shape[2], 256))
    arr = zarr.create_array(str(path), shape=(positions, 1, *shape), chunks=chunks, dtype="uint16", overwrite=True)
    for p in range(positions):
        arr[p, 0] = np.random.default_rng(p).integers(100, 4000, size=shape, dtype=np.uint16)


def _child(kind: str, inp: str, threads: int, out: str) -> None:
    """Runs in a fresh process: the mean and the best seconds of 2 warm runs (after a warm-up; one run for a
    full position) of the engine alone or of process_position."""
    from tasks import defaults, dog, position
    from tasks.inputs import open_dataset

    vol = open_dataset(inp).read(0, 0)
    times = []
    for rep in range(3 if vol.size < 1 << 28 else 1):  # the first one warms up (not for a full position)
        t = time.perf_counter()
        if kind == "engine":
            dog.difference_of_gaussians(vol, defaults.SEED_SIGMA_SMALL, defaults.SEED_SIGMA_LARGE, threads=threads)
            row = {}
        else:
            row = position.process_position(inp, out, 0, _params(inp), threads=threads)
        times.append(time.perf_counter() - t)
    warm = times[1:] or times
    print(json.dumps({"seconds": sum(warm) / len(warm), "best": min(warm),
                      **{k: v for k, v in row.items() if k.endswith("seconds")}}))


def _params(inp: str) -> dict:
    from flows.request import RunRequest

    return RunRequest(inp, "/nonexistent-output").validate().params.as_dict()


def plain(kind: str, inp: Path, threads: int, env: dict | None = None, side_by_side: int = 1) -> dict:
    """The child's figures from fresh processes; with ``side_by_side`` > 1, that many run at the
    same time (as the flow's workers do) and the mean of their figures is returned."""
    outs = [Path(tempfile.mkdtemp(prefix="dogflow-bench-plain-")) / "out.zarr" for _ in range(side_by_side)]
    try:
        procs = []
        for out in outs:
            if kind == "plain":
                from flows.request import RunRequest
                from tasks.output import Output

                spec = RunRequest(str(inp), str(out)).validate()
                Output(out).prepare(spec.output, channels=spec.channels)
            cmd = [sys.executable, __file__, "--child", kind, str(inp), str(threads), str(out)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}))
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    finally:
        for out in outs:
            shutil.rmtree(out.parent, ignore_errors=True)


class CpuWatch(threading.Thread):
    """Samples the CPU seconds of the flow process and of its temporary Prefect server every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.main = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []  # (time, flow cpu, server cpu)
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        server = None
        while not self.stop.is_set():
            try:
                if server is None:
                    server = next((c for c in self.main.children(recursive=True)
                                   if "uvicorn" in " ".join(c.cmdline())), None)
                flow_cpu = sum(self.main.cpu_times()[:2])
                srv_cpu = sum(server.cpu_times()[:2]) if server is not None else 0.0
                self.samples.append((time.time(), flow_cpu, srv_cpu))
            except psutil.Error:
                pass
            self.stop.wait(0.2)

    def rate(self, t0: float, t1: float) -> tuple[float, float]:
        """CPU seconds per wall second of (flow, server) between t0 and t1."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return float("nan"), float("nan")
        (ta, fa, sa), (tb, fb, sb) = inside[0], inside[-1]
        return (fb - fa) / (tb - ta), (sb - sa) / (tb - ta)


def flow_run(inp: Path, out: Path, positions: str, cluster: str) -> dict:
    from tasks.output import Output

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    t = time.time()
    proc = subprocess.Popen([str(DOGFLOW), "run", str(inp), str(out), "--positions", positions, "--cluster", cluster,
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watch = CpuWatch(proc.pid)
    watch.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - t
    watch.stop.set()
    watch.join()
    if proc.returncode != 0:
        raise SystemExit(f"dogflow run failed ({proc.returncode}):\n{stderr[-3000:]}")
    marks = Output(out).markers
    markers = [marks.read(p, c) for p, c in marks.marked()]
    fresh = [m for m in markers if m["finished"] >= t]
    row = {"wall": wall, "tasks": len(fresh), "stdout": stdout.strip(), "stderr_lines": len(stderr.splitlines())}
    if stderr.strip():
        print(f"  stderr of `dogflow run --positions {positions}`:\n    " + "\n    ".join(stderr.splitlines()[:12]))
    if fresh:
        row["task_seconds"] = [m["seconds"] for m in fresh]
        # warm tasks: each worker process's first task also pays the first call's costs (imports, plans)
        started, warm = set(), []
        for m in sorted(fresh, key=lambda m: m["finished"]):
            if m.get("pid") in started:
                warm.append(m["seconds"])
            started.add(m.get("pid"))
        row["warm_task_seconds"] = warm or row["task_seconds"]
        row["task_breakdown"] = {k: max(m.get(k, 0.0) for m in fresh) for k in fresh[0] if k.endswith("_seconds")}
        first = min(m["finished"] for m in fresh)
        last = max(m["finished"] for m in fresh)
        if len(fresh) > 2:
            row["orchestration"] = watch.rate(first, last)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="208,512,512")
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--cluster", default="local")
    ap.add_argument("--full", action="store_true", help="add one full seed position (413, 2048, 2048)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "INPUT", "THREADS", "OUTPUT"))
    args = ap.parse_args()
    if args.child:
        kind, inp, threads, out = args.child
        _child(kind, inp, int(threads), out)
        return
    from flows.request import RunRequest

    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="dogflow-bench-flow-"))
    try:
        inp = work / "in.zarr"
        make_dataset(inp, args.positions, shape)
        spec = RunRequest(str(inp), str(work / "probe.zarr"), cluster=args.cluster).validate()
        threads = spec.profile.threads_per_task() or 1
        cores = len(os.sched_getaffinity(0))
        print(f"shape {shape} uint16, {args.positions} positions, profile {args.cluster}: "
              f"{threads} thread(s) per task, {cores} cores", flush=True)
        engine = plain("engine", inp, threads)["best"]
        pl = plain("plain", inp, threads)
        pl_nanny = plain("plain", inp, threads, NANNY_ENV)
        workers = spec.profile.runner_arguments()["cluster_kwargs"].get("n_workers") or 1
        pl_side = plain("plain", inp, threads, side_by_side=workers) if workers > 1 else pl
        print(f"engine alone {engine:.2f} s; plain process_position {pl['seconds']:.2f} s "
              f"({pl_nanny['seconds']:.2f} s with the nanny's environment)", flush=True)
        two = flow_run(inp, work / "out2.zarr", "0-1", args.cluster)
        many = flow_run(inp, work / "outN.zarr", f"0-{args.positions - 1}", args.cluster)
        again = flow_run(inp, work / "outN.zarr", f"0-{args.positions - 1}", args.cluster)
        marginal = (many["wall"] - two["wall"]) / (args.positions - 2)
        fixed = two["wall"] - 2 * marginal
        ideal = engine * threads / cores  # the engine's CPU-seconds per position, spread over every core
        task_mean = sum(many["task_seconds"]) / len(many["task_seconds"])
        warm_mean = sum(many["warm_task_seconds"]) / len(many["warm_task_seconds"])
        flow_cpu, server_cpu = many.get("orchestration", (float("nan"), float("nan")))
        rows = [
            ("engine alone, per position", f"{engine:.2f} s ({threads} thread(s))"),
            ("process_position, plain process", f"{pl['seconds']:.2f} s"),
            ("process_position, plain process, nanny environment", f"{pl_nanny['seconds']:.2f} s"),
            (f"process_position, {workers} plain processes side by side (as the workers run)",
             f"{pl_side['seconds']:.2f} s"),
            ("task inside the Dask worker, warm (mean of markers, each worker's first task left out)",
             f"{warm_mean:.2f} s = {warm_mean / pl['seconds']:.2f}x plain alone, "
             f"{warm_mean / pl_side['seconds']:.2f}x side by side"),
            ("task inside the Dask worker, every task (mean of markers)",
             f"{task_mean:.2f} s = {task_mean / pl['seconds']:.2f}x plain alone"),
            ("flow, 2 positions (wall)", f"{two['wall']:.1f} s"),
            (f"flow, {args.positions} positions (wall)", f"{many['wall']:.1f} s"),
            ("marginal cost per position", f"{marginal:.2f} s = {marginal / ideal:.2f}x (engine / cores = {ideal:.2f} s)"),
            ("fixed cost per run", f"{fixed:.1f} s"),
            ("rerun with nothing to do (wall)", f"{again['wall']:.1f} s"),
            ("orchestration CPU while tasks run", f"flow {100 * flow_cpu:.1f} % + server {100 * server_cpu:.1f} % "
                                                  f"= {100 * (flow_cpu + server_cpu):.1f} % of one core"),
            ("terminal: stdout / stderr lines", f"{len(many['stdout'].splitlines())} / {many['stderr_lines']}"),
        ]
        if args.full:
            rows += full_position(work, args.cluster)
        print()
        print("| measurement | result |")
        print("|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def full_position(work: Path, cluster: str) -> list[tuple[str, str]]:
    from flows.request import RunRequest

    inp = work / "full.zarr"
    shutil.rmtree(work / "in.zarr", ignore_errors=True)
    make_dataset(inp, 1, (413, 2048, 2048))
    spec = RunRequest(str(inp), str(work / "probe.zarr"), cluster=cluster).validate()
    threads = spec.profile.threads_per_task() or 1
    engine = plain("engine", inp, threads)["seconds"]
    row = flow_run(inp, work / "full-out.zarr", "0", cluster)
    task = row["task_seconds"][0]
    b = row.get("task_breakdown", {})
    io = b.get("read_seconds", 0.0) + b.get("write_seconds", 0.0)
    return [
        ("full position: engine alone", f"{engine:.1f} s ({threads} threads)"),
        ("full position: task in the flow", f"{task:.1f} s = {task / engine:.2f}x engine alone "
                                             f"(its own filter step: {b.get('filter_seconds', 0):.1f} s)"),
        ("full position: read + write", f"{b.get('read_seconds', 0):.1f} + {b.get('write_seconds', 0):.1f} s "
                                         f"= {100 * io / engine:.0f} % of the engine alone"),
        ("full position: flow wall", f"{row['wall']:.1f} s"),
    ]


if __name__ == "__main__":
    main()
