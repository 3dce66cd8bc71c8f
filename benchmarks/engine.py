"""Benchmark of the exact DoG engine (tasks.dog) against single-thread scipy.

    .venv/bin/python benchmarks/engine.py [--quick] [--full] [--threads N] [--repeat R]

Per shape (seed sigmas 50/2.35 and 200/2.35, mode 'nearest', uint16 input, float32 result):
  * scipy      : single-thread scipy.ndimage.gaussian_filter DoG in float64 (also the exactness reference)
  * reference  : benchmarks/reference_engine.py, the engine before issue 20 (compiled loops, FFT backends),
                 threads=1: the "vs reference" column is its CPU time over this engine's
  * engine     : threads=1 (its own FFT pick, and each installed backend forced) and threads=N,
                 interleaved with the reference, best of R (wall and process CPU time)
  * N procs    : N independent processes, each running the engine with threads=1 at the same time;
                 speed-up = N * (one process alone) / (each process while N run), best of R
  * efficiency : (engine speed-up with N threads) / (N-process speed-up)
  * first/warm : first call on a new shape in a fresh process vs the next call
  * nanny env  : engine threads=1 in a fresh process with Dask's nanny environment
                 (MALLOC_TRIM_THRESHOLD_=65536, OMP/MKL/OPENBLAS_NUM_THREADS=1) vs without (CPU time)
  * peak       : VmHWM growth in a fresh process (input + engine), multiple of the float32 volume,
                 next to tasks.dog.peak_memory_bytes
--quick: only (112, 288, 320).  --full adds the full position (413, 2048, 2048) with N threads, the
reference and this engine alternating in fresh processes, --full-rounds times (time and peak; ~15 GB each,
one at a time, many minutes).  Wall-clock figures depend on the machine's
other load; the CPU-time ratios much less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

S_SMALL, S_LARGE = 50 / 2.35, 200 / 2.35
SHAPES_QUICK = [(112, 288, 320)]
SHAPES = [(112, 288, 320), (413, 512, 512)]
FULL = (413, 2048, 2048)
NANNY_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1"}


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


def clocked(f, *a, **kw):
    t, c = time.perf_counter(), time.process_time()
    r = f(*a, **kw)
    return r, time.perf_counter() - t, time.process_time() - c


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


# --------------------------------------------------------------------------- child processes

def engine_call(engine=None, fft=None):
    """(difference_of_gaussians, backend name) of ``engine``: None = tasks.dog (FFT backend ``fft``, or its
    own measured pick), "reference" = benchmarks/reference_engine.py (the engine before issue 20)."""
    if engine == "reference":
        import reference_engine
        return reference_engine.difference_of_gaussians, lambda: "pocketfft (reference)"
    from tasks import dog
    if fft is None:
        return dog.difference_of_gaussians, dog.fft_backend

    def call(*a, **kw):
        with dog.tuned(fft=fft):
            return dog.difference_of_gaussians(*a, **kw)
    return call, dog.fft_backend


def child(spec):
    """Runs in a fresh process; prints one JSON line."""
    from tasks import dog
    shape, threads, repeat = tuple(spec["shape"]), spec["threads"], spec.get("repeat", 1)
    call, backend = engine_call(spec.get("engine"), spec.get("fft"))
    base = reset_peak()
    v = make_volume(shape)
    res = {"walls": [], "cpus": []}
    if spec.get("start_at"):
        time.sleep(max(0.0, spec["start_at"] - time.time()))
    for _ in range(repeat):
        out, w, c = clocked(call, v, S_SMALL, S_LARGE, threads=threads)
        del out
        res["walls"].append(w)
        res["cpus"].append(c)
    res["peak"] = _status("VmHWM") - base
    res["bound"] = dog.peak_memory_bytes(shape, v.dtype, threads=threads)
    res["backend"] = backend()
    print(json.dumps(res), flush=True)


def spawn(spec, env=None, start_at=None):
    spec = dict(spec, start_at=start_at)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    full_env = dict(os.environ, **(env or {}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=full_env)


def collect(proc):
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def side_by_side(shape, n, repeat, threads=1):
    """n processes, each running the engine with ``threads`` threads, started together: the best wall time
    of the slowest one (each process's best of repeat)."""
    start = time.time() + 1.5 + 0.004 * np.prod(shape) / 1e6    # after every child built its volume
    procs = [spawn({"shape": shape, "threads": threads, "repeat": repeat}, start_at=start) for _ in range(n)]
    return max(min(collect(p)["walls"]) for p in procs)


def n_process_speedup(shape, n, repeat):
    """N processes with threads=1 at once vs one alone: throughput speed-up, best of repeat."""
    alone = collect(spawn({"shape": shape, "threads": 1, "repeat": repeat}))
    t1 = min(alone["walls"])
    tn = side_by_side(shape, n, repeat)
    return t1, tn, n * t1 / tn


# --------------------------------------------------------------------------- rows

def shape_row(shape, threads, repeat):
    from tasks import dog, fft
    v = make_volume(shape)
    ref, t_sp, c_sp = clocked(scipy_dog, v)
    print(f"{shape}: scipy 1 thread {t_sp:.1f} s wall, {c_sp:.1f} s CPU", flush=True)
    # first call on this shape in a fresh process, then warm
    fw = collect(spawn({"shape": shape, "threads": 1, "repeat": 2}))
    # threads=1: the reference engine, this engine (its own pick) and this engine per forced backend,
    # then this engine with N threads; interleaved, so that all see the same load
    variants = [("reference", 1, "reference", None), ("engine", 1, None, None)]
    variants += [(f"engine[{b}]", 1, None, b) for b in fft.available()]
    variants += [("engine NT", threads, None, None)]
    calls = {name: engine_call(eng, be) for name, _, eng, be in variants}
    best = {name: [np.inf, np.inf] for name, *_ in variants}     # best wall, best CPU
    err, backend = {}, None
    for _ in range(repeat):
        for name, th, _, _ in variants:
            call, used = calls[name]
            e, w, c = clocked(call, v, S_SMALL, S_LARGE, threads=th)
            if name not in err:
                err[name] = float(np.max(np.abs(e - ref)))
            if name == "engine":
                backend = used()
            del e
            best[name] = [min(best[name][0], w), min(best[name][1], c)]
    e64 = dog.difference_of_gaussians(v, S_SMALL, S_LARGE, threads=threads, precision="float64")
    err64 = float(np.max(np.abs(e64 - ref)) / np.max(np.abs(v)))
    del e64, ref
    p1, pn, sp_proc = n_process_speedup(shape, threads, repeat)
    nanny = [collect(spawn({"shape": shape, "threads": 1, "repeat": repeat}, env=env))
             for env in (None, NANNY_ENV)]
    mem = collect(spawn({"shape": shape, "threads": threads, "repeat": 1}))
    (wr, cr), (w1, c1), (wn, cn) = best["reference"], best["engine"], best["engine NT"]
    sp_eng = w1 / wn
    row = dict(shape=shape, scipy_wall=t_sp, scipy_cpu=c_sp, wr=wr, cr=cr, w1=w1, c1=c1, wn=wn, cn=cn,
               backend=backend, ratio_ref=cr / c1, ratio_cpu=c_sp / c1, ratio_ref_cpu=c_sp / cr,
               per_backend={b: cr / best[f"engine[{b}]"][1] for b in fft.available()},
               ration=t_sp / wn, sp_eng=sp_eng, p1=p1, pn=pn, sp_proc=sp_proc, eff=sp_eng / sp_proc,
               first=fw["walls"][0], warm=fw["walls"][1], first_cpu=fw["cpus"][0], warm_cpu=fw["cpus"][1],
               plain_cpu=min(nanny[0]["cpus"]), nanny_cpu=min(nanny[1]["cpus"]),
               err=max(x for k, x in err.items() if k != "reference"), tol=1e-3 + 1e-6 * float(v.max()),
               err64=err64, peak=mem["peak"] / (np.prod(shape) * 4), bound=mem["bound"] / (np.prod(shape) * 4))
    print(f"  reference 1T {cr:.3f} s CPU ({row['ratio_ref_cpu']:.1f}x scipy); engine 1T {w1:.3f} s ({c1:.3f} s CPU: "
          f"{row['ratio_ref']:.2f}x the reference, {row['ratio_cpu']:.1f}x scipy, FFT {backend}); per backend vs "
          f"reference: {', '.join(f'{b} {x:.2f}x' for b, x in row['per_backend'].items())}; {threads}T {wn:.3f} s "
          f"({cn:.3f} s CPU): speed-up {sp_eng:.2f}; {threads} procs {sp_proc:.2f} -> efficiency "
          f"{row['eff']:.2f}; first {row['first']:.3f} s / warm {row['warm']:.3f} s; nanny CPU "
          f"{row['nanny_cpu']:.3f} vs {row['plain_cpu']:.3f} s; peak {row['peak']:.2f}x", flush=True)
    return row


def full_rows(threads, rounds):
    """The full position in fresh processes, the reference engine and this engine (its own pick, then
    pocketfft forced) alternating, ``rounds`` times: best wall and CPU of each."""
    shape = FULL
    vol32 = np.prod(shape) * 4
    out = {}
    for _ in range(rounds):
        for name, eng, be in (("reference", "reference", None), ("engine", None, None),
                              ("engine[pocketfft]", None, "pocketfft")):
            r = collect(spawn({"shape": shape, "threads": threads, "repeat": 1, "engine": eng, "fft": be}))
            print(f"  full {name}: {r['walls'][0]:.1f} s wall, {r['cpus'][0]:.1f} s CPU, peak "
                  f"{r['peak'] / vol32:.2f}x ({r['backend']})", flush=True)
            o = out.setdefault(name, dict(wall=np.inf, cpu=np.inf, peak=0.0, bound=r["bound"] / vol32))
            o.update(wall=min(o["wall"], r["walls"][0]), cpu=min(o["cpu"], r["cpus"][0]),
                     peak=max(o["peak"], r["peak"] / vol32), backend=r["backend"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--full-rounds", type=int, default=2)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from tasks import dog
    n = args.threads or dog.default_threads()
    shapes = SHAPES_QUICK if args.quick else SHAPES
    print(f"N={n} threads  sigma=({S_SMALL:.3f}, {S_LARGE:.3f})  mode=nearest  uint16 input  "
          f"cpus={len(os.sched_getaffinity(0))}  load={os.getloadavg()[0]:.1f}", flush=True)
    dog.difference_of_gaussians(make_volume((8, 40, 40)), S_SMALL, S_LARGE, threads=n)  # imports, pools
    rows = [shape_row(s, n, args.repeat) for s in shapes]
    print()
    print(f"| shape | scipy 1T CPU | reference 1T CPU (x scipy) | engine 1T CPU | vs reference | vs scipy | FFT backend | "
          f"per backend vs reference | engine {n}T wall | speed-up {n}T | {n} procs speed-up | efficiency | "
          f"first / warm | nanny env CPU (plain) | max err (tol) | float64 rel err | peak (bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = ", ".join(f"{b} {x:.2f}x" for b, x in r["per_backend"].items())
        print(f"| {r['shape']} | {r['scipy_cpu']:.1f} s | {r['cr']:.3f} s ({r['ratio_ref_cpu']:.1f}x) | {r['c1']:.3f} s | "
              f"**{r['ratio_ref']:.2f}x** | {r['ratio_cpu']:.1f}x | {r['backend']} | {per} | {r['wn']:.3f} s | "
              f"{r['sp_eng']:.2f} | {r['sp_proc']:.2f} | {r['eff']:.2f} | {r['first']:.3f} / {r['warm']:.3f} s "
              f"({r['first'] / r['warm']:.2f}; CPU {r['first_cpu'] / r['warm_cpu']:.2f}) | "
              f"{r['nanny_cpu']:.3f} ({r['plain_cpu']:.3f}) s | {r['err']:.2e} ({r['tol']:.2e}) | {r['err64']:.1e} | "
              f"{r['peak']:.2f}x ({r['bound']:.2f}x) |")
    if args.full:
        full = full_rows(n, args.full_rounds)
        ref = full["reference"]
        print(f"\nfull position {FULL}, {n} threads, best of {args.full_rounds} (fresh processes, alternating):")
        print("| engine | wall | CPU | wall vs reference | CPU vs reference | peak (bound) | FFT backend |")
        print("|---|---|---|---|---|---|---|")
        for name, f in full.items():
            print(f"| {name} | {f['wall']:.1f} s | {f['cpu']:.1f} s | {f['wall'] / ref['wall']:.2f} | "
                  f"{ref['cpu'] / f['cpu']:.2f}x | {f['peak']:.2f}x ({f['bound']:.2f}x) | {f['backend']} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. Ratios: scipy "
          "single-thread / engine (wall), CPU-time ratio: process CPU seconds (less sensitive to other "
          "load). Efficiency = (engine 1T wall / engine NT wall) / (N-process throughput speed-up).")


if __name__ == "__main__":
    main()
