"""Input read, engine, and output write (every pyramid level) of one position, as the task does them.

    .venv/bin/python benchmarks/output_write.py [--shape 413,512,512] [--max-plane 256] [--codecs]

Prints the seconds of each step, the write's share of the engine time, the on-disk ratio of the output,
and the peak memory of the step sequence (tracemalloc, numpy buffers included) in units of the float32
volume. ``--codecs`` also compares candidate codecs on the same DoG volume (write/read seconds, ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.sample import sample_volume  # noqa: E402
from tasks import defaults, preview  # noqa: E402
from tasks.filters import DoG, FilterParams  # noqa: E402
from tasks.inputs import open_dataset  # noqa: E402
from tasks.output import CODEC, Output, OutputSpec  # noqa: E402
from tasks.testing import traced_peak  # noqa: E402

SEED = DoG((defaults.SEED_SIGMA_SMALL,) * 3, (defaults.SEED_SIGMA_LARGE,) * 3)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "dogflow" not in f.parts)


def one_position(inp: Path, out: Path, dtype: str = "float32") -> dict[str, float]:
    """The task's sequence for one channel: read, DoG, preview, free the input, write every level."""
    t = {}
    t0 = time.perf_counter()
    ds = open_dataset(inp)
    volume = ds.read(0, 0)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = SEED.apply(volume, threads=defaults.threads_per_task())
    t["engine"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preview.preview_png(volume, result)
    t["preview"] = time.perf_counter() - t0
    del volume
    t0 = time.perf_counter()
    Output(out).write_levels(0, 0, result, dtype)
    t["write"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="413,512,512")
    ap.add_argument("--max-plane", type=int, default=256, help="pyramid: levels until y,x <= this (default: 1 level)")
    ap.add_argument("--codecs", action="store_true")
    ap.add_argument("--s3", action="store_true", help="also read and write the position through a local S3 server")
    a = ap.parse_args()
    shape = tuple(int(s) for s in a.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="dogflow-bench-"))
    try:
        inp, out = work / "in.zarr", work / "out.zarr"
        arr = zarr.create_array(str(inp), shape=(1, 1, *shape), chunks=(1, 1, 64, 256, 256), dtype="uint16")
        arr[0, 0] = sample_volume(shape, 400, np.random.default_rng(0))
        ds = open_dataset(inp)
        spec = OutputSpec.for_dataset(FilterParams(str(inp), SEED, "float32"), ds, max_plane=a.max_plane)
        Output(out).prepare(spec, channels=[0])
        print(f"shape {shape}, levels {spec.levels}, codec {CODEC}, cpus {os.cpu_count()}")
        t = one_position(inp, out)
        vol_bytes = 4 * int(np.prod(shape))
        written = sum(4 * int(np.prod(s)) for s in spec.levels)
        print(f"read {t['read']:.2f} s, engine {t['engine']:.2f} s, preview {t['preview']:.2f} s, "
              f"write (all levels) {t['write']:.2f} s; read + write = {100 * (t['read'] + t['write']) / t['engine']:.0f} % "
              f"of the engine; output ratio {written / du(out):.2f}")
        _, peak = traced_peak(lambda: one_position(inp, out))   # large arrays from numpy, which tracemalloc sees
        print(f"peak traced memory of read+engine+preview+write: {peak / vol_bytes:.2f}x the float32 volume")
        if a.codecs:
            compare_codecs(work, ds.read(0, 0))
        if a.s3:
            compare_s3(work, inp, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare_codecs(work: Path, volume: np.ndarray) -> None:
    from zarr.codecs import BloscCodec

    result = SEED.apply(volume, threads=defaults.threads_per_task())
    cands = {
        "zstd (zarr default)": "auto",
        "none": None,
        "blosc lz4 shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
        "blosc lz4 bitshuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
        "blosc zstd-1 shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
    }
    for name, comp in cands.items():
        p = work / f"codec-{len(name)}-{abs(hash(name))}.zarr"
        z = zarr.create_array(str(p), shape=(1, *result.shape), chunks=(1, 64, 256, 256), dtype="float32",
                              compressors=comp)
        t0 = time.perf_counter()
        z[0] = result
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        zarr.open_array(str(p))[0]
        r = time.perf_counter() - t0
        print(f"  {name:22s} write {w:5.2f} s  read {r:5.2f} s  ratio {result.nbytes / du(p):.2f}")
        shutil.rmtree(p)



def compare_s3(work: Path, inp: Path, spec: OutputSpec, repeats: int = 3) -> None:
    """Read the input volume and write every level of its result, on local disk and through a local S3-protocol
    server (moto's server mode on 127.0.0.1), side by side; best of ``repeats`` wall seconds each."""
    import socket
    import subprocess
    import urllib.request

    from tasks.s3 import S3Storage

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except Exception:
                time.sleep(0.2)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=url,
                          AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1")
        urllib.request.urlopen(urllib.request.Request(f"{url}/bench", method="PUT")).read()
        st = S3Storage("s3://bench/in.zarr")
        for f in sorted(inp.rglob("*")):
            if f.is_file():
                st.write_atomic(f.relative_to(inp).as_posix(), f.read_bytes())
        result = SEED.apply(open_dataset(inp).read(0, 0), threads=defaults.threads_per_task())
        rows = {}
        for name, src, dst in (("local disk", str(inp), str(work / "s3cmp.zarr")),
                               ("S3 (moto, loopback)", "s3://bench/in.zarr", "s3://bench/out.zarr")):
            o = Output(dst)
            o.prepare(dataclasses.replace(spec, params=FilterParams(src, SEED, "float32")), overwrite=True, channels=[0])
            reads, writes = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                open_dataset(src).read(0, 0)
                reads.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                o.write_levels(0, 0, result, "float32")
                writes.append(time.perf_counter() - t0)
            rows[name] = (min(reads), min(writes))
        base = rows["local disk"]
        for name, (r, w) in rows.items():
            print(f"  {name:20s} read {r:5.2f} s  write (all levels) {w:5.2f} s  "
                  f"read+write {(r + w) / (base[0] + base[1]):.2f}x local disk")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
