"""Benchmark of the exact DoG engine (tasks.dog) against scipy and the seed's dask method.

    .venv/bin/python benchmarks/engine.py [--quick] [--threads N]

For each shape (seed sigmas 50/2.35 and 200/2.35, mode 'nearest', uint16 input), in one process:
  * scipy  : single-thread scipy.ndimage.gaussian_filter DoG in float64 (also the exactness reference)
  * engine : tasks.dog.difference_of_gaussians, float32, threads=1 and threads=N (best of 3)
  * dask   : seed method, dask.array.map_overlap(gaussian_filter, depth=40, boundary='nearest'),
             chunks (96,160,176), N threads: ratio, max error, fraction of voxels off by > tolerance
  * peak   : engine peak memory (VmHWM in a fresh subprocess per measurement, input included),
             as a multiple of the float32 volume size, next to tasks.dog.peak_memory_bytes.
Tolerance: 1e-3 + 1e-6 * max|v|.  --quick: only (96, 320, 352).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

S_SMALL, S_LARGE = 50 / 2.35, 200 / 2.35
SHAPES_QUICK = [(96, 320, 352)]
SHAPES_FULL = [(96, 320, 352), (413, 512, 512)]


def make_volume(shape, seed=0):
    """uint16 volume built plane by plane (no whole-volume int64 temporary)."""
    rng = np.random.default_rng(seed)
    v = np.empty(shape, np.uint16)
    for z in range(shape[0]):
        v[z] = rng.integers(100, 4000, size=shape[1:], dtype=np.uint16)
    return v


def scipy_dog(v):
    import scipy.ndimage as ndi
    f = v.astype(np.float64)
    a = ndi.gaussian_filter(f, S_SMALL, mode="nearest")
    a -= ndi.gaussian_filter(f, S_LARGE, mode="nearest")
    return a


def dask_dog(v, threads):
    import dask
    import dask.array as da
    import scipy.ndimage as ndi
    x = da.from_array(v, chunks=(96, 160, 176)).astype(np.float32)
    kw = dict(depth=40, boundary="nearest", dtype=np.float32)
    g1 = x.map_overlap(ndi.gaussian_filter, sigma=S_SMALL, mode="nearest", **kw)
    g2 = x.map_overlap(ndi.gaussian_filter, sigma=S_LARGE, mode="nearest", **kw)
    with dask.config.set(scheduler="threads", num_workers=threads):
        return (g1 - g2).compute()


CPU = {}


def timed(f, *a, repeat=1, **kw):
    """Result and best wall time of `repeat` runs (the machine is shared: min filters out others' load).
    The process CPU time of the best run is kept in CPU[f] (robust to other processes' load)."""
    best = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        r = f(*a, **kw)
        t, c = time.perf_counter() - t, time.process_time() - c
        if t < best:
            best, CPU[f] = t, c
    return r, best


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak():
    """Reset VmHWM to the current RSS (ru_maxrss would be inherited from the parent across exec)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def mem_child(shape, dtype, threads):
    """Runs in a fresh process: peak RSS growth (input + engine) over the warmed-up baseline."""
    from tasks import dog
    dog.difference_of_gaussians(make_volume((8, 40, 40)), S_SMALL, S_LARGE, threads=threads)  # warm-up
    base = reset_peak()
    v = np.empty(shape, dtype)
    for z in range(shape[0]):   # build in place, plane by plane
        v[z] = np.random.default_rng(z).integers(100, 4000, size=shape[1:]).astype(dtype)
    dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=threads)
    peak = _status("VmHWM") - base
    print(json.dumps({"peak": peak, "bound": dog.peak_memory_bytes(shape, dtype)}))


def mem_measure(shape, dtype, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", ",".join(map(str, shape)), dtype, str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mem-child", nargs=3, metavar=("SHAPE", "DTYPE", "THREADS"))
    args = ap.parse_args()
    if args.mem_child:
        s, dt, th = args.mem_child
        mem_child(tuple(int(x) for x in s.split(",")), dt, int(th))
        return
    from tasks import dog
    threads = args.threads or dog.default_threads()
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    print(f"threads={threads}  sigma=({S_SMALL:.3f}, {S_LARGE:.3f})  mode=nearest  uint16 input  "
          f"cpus={len(os.sched_getaffinity(0))}", flush=True)
    dog.difference_of_gaussians(make_volume((8, 40, 40)), S_SMALL, S_LARGE, threads=threads)  # warm-up
    rows = []
    for shape in shapes:
        v = make_volume(shape)
        tol = 1e-3 + 1e-6 * float(v.max())
        ref, t_sp = timed(scipy_dog, v)
        c_sp = CPU[scipy_dog]
        print(f"{shape}: scipy 1 thread {t_sp:.1f} s", flush=True)
        _, t_e1 = timed(dog.difference_of_gaussians, v, S_SMALL, S_LARGE, threads=1, repeat=3)
        c_e1 = CPU[dog.difference_of_gaussians]
        e, t_en = timed(dog.difference_of_gaussians, v, S_SMALL, S_LARGE, threads=threads, repeat=3)
        err = float(np.max(np.abs(e - ref)))
        del e
        e64 = dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=threads, precision="float64")
        err64 = float(np.max(np.abs(e64 - ref)) / np.max(np.abs(v)))
        del e64
        d, t_dk = timed(dask_dog, v, threads)
        dd = np.abs(d - ref)
        derr, dfrac = float(dd.max()), float((dd > tol).mean())
        del d, dd, ref
        mem = {dt: mem_measure(shape, dt, threads) for dt in ("uint16", "float32")}
        vol32 = int(np.prod(shape)) * 4
        rows.append(dict(shape=shape, scipy_s=t_sp, engine1_s=t_e1, engineN_s=t_en, dask_s=t_dk,
                         r1=t_sp / t_e1, r1cpu=c_sp / c_e1, rN=t_sp / t_en, r_dask=t_dk / t_en,
                         err=err, tol=tol, err64_rel=err64, dask_err=derr, dask_frac=dfrac,
                         mem={k: (m["peak"] / vol32, m["bound"] / vol32) for k, m in mem.items()}))
        r = rows[-1]
        print(f"  engine 1 thread {t_e1:.2f} s ({r['r1']:.1f}x), {threads} threads {t_en:.2f} s "
              f"({r['rN']:.1f}x); dask seed {t_dk:.1f} s", flush=True)

    print()
    print(f"| shape | scipy 1T s | engine 1T | 1T CPU-time ratio | engine {threads}T | vs dask seed ({threads}T) | "
          f"engine max err (tol) | float64 rel err | dask max err / frac > tol | "
          f"peak uint16 in (bound) | peak float32 in (bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mu, mf = r["mem"]["uint16"], r["mem"]["float32"]
        print(f"| {r['shape']} | {r['scipy_s']:.1f} | {r['engine1_s']:.2f} s = {r['r1']:.1f}x | {r['r1cpu']:.1f}x | "
              f"{r['engineN_s']:.2f} s = {r['rN']:.1f}x | {r['r_dask']:.1f}x faster | "
              f"{r['err']:.2e} ({r['tol']:.2e}) | {r['err64_rel']:.1e} | "
              f"{r['dask_err']:.1f} / {100 * r['dask_frac']:.1f}% | "
              f"{mu[0]:.2f}x ({mu[1]:.2f}x) | {mf[0]:.2f}x ({mf[1]:.2f}x) |")
    print("\nratios = scipy single-thread wall time / engine wall time (CPU-time ratio: process CPU "
          "seconds, insensitive to other load on a shared machine); peak = input + engine, "
          "multiple of the float32 volume (VmHWM growth, fresh subprocess).")


if __name__ == "__main__":
    main()
