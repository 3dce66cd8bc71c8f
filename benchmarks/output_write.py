"""Input read, engine, and output write (every pyramid level) of one position, as the task does them.

    .venv/bin/python benchmarks/output_write.py [--shape 413,512,512] [--max-plane 256] [--codecs]
    .venv/bin/python benchmarks/output_write.py --full --layouts --shards --codecs --reps 3

Prints the seconds of each step, the write's share of the engine time, the on-disk ratio of the output,
and the peak memory of the step sequence (tracemalloc, numpy buffers included) in units of the float32
volume. ``--full`` is the full seed position (413, 2048, 2048) with its two levels; there the sequence is not
run a second time for its peak (the engine's own is benchmarks/engine.py's); the write phase's is printed by
``--shards``.

On the same DoG result:

- ``--layouts`` writes every level into layout 2 (unsharded arrays, zarr's write) and layout 3 (sharded, the
  whole-shard writer) side by side, alternating, ``--reps`` times: wall and CPU seconds (the process, every
  thread), best and median;
- ``--shards`` compares shard budgets (and unsharded): write seconds, the write phase's peak memory, files,
  and what a napari-style reader (``dask.array.from_zarr``, as ome-zarr's reader) takes for one z-plane and
  for one inner chunk of level 0 (from the page cache);
- ``--codecs`` compares blosc variants on the sharded layout: level-0 write seconds, read seconds, ratio.
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
from tasks import buffers, defaults, dog, output, preview, pyramid, sharding  # noqa: E402
from tasks.filters import DoG, FilterParams  # noqa: E402
from tasks.inputs import open_dataset  # noqa: E402
from tasks.output import Output, OutputSpec, level_path  # noqa: E402
from tasks.testing import traced_peak  # noqa: E402

SIGMA_SMALL, SIGMA_LARGE = defaults.SEED_SIGMA_SMALL, defaults.SEED_SIGMA_LARGE
SEED = DoG((SIGMA_SMALL,) * 3, (SIGMA_LARGE,) * 3)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "dogflow" not in f.parts)


def write_sample(arr: zarr.Array, shape: tuple[int, int, int], rng: np.random.Generator, tile: int = 512) -> None:
    """flows.sample's blobs on a background with Poisson noise (400 blobs per (z, 512, 512)). Planes larger than
    ``tile`` are mirrored tiles of one (z, tile, tile) sample (seamless, so the DoG sees one continuous volume):
    ``sample_volume`` of a full position would hold two float64 volumes (28 GB) and take minutes."""
    z, y, x = shape
    if y <= tile and x <= tile:
        arr[0, 0] = sample_volume(shape, 400, rng)
        return
    base = sample_volume((z, tile, tile), 400, rng)
    for i in range(0, y, tile):
        for j in range(0, x, tile):
            t = base[:, :: -1 if (i // tile) % 2 else 1, :: -1 if (j // tile) % 2 else 1]
            arr[0, 0, :, i : i + tile, j : j + tile] = t[:, : min(tile, y - i), : min(tile, x - j)]


def one_position(inp: Path, out: Path, dtype: str = "float32") -> dict[str, float]:
    """The task's sequence for one channel: read, DoG, preview, free the input, write every level."""
    t = {}
    t0 = time.perf_counter()
    ds = open_dataset(inp)
    volume = ds.read(0, 0)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = dog.difference_of_gaussians(volume, SIGMA_SMALL, SIGMA_LARGE)
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
    ap.add_argument("--full", action="store_true", help="the full seed position (413, 2048, 2048), two levels")
    ap.add_argument("--layouts", action="store_true", help="layout 2 against layout 3, side by side")
    ap.add_argument("--shards", action="store_true", help="shard budgets: write, peak, files, plane and chunk reads")
    ap.add_argument("--codecs", action="store_true")
    ap.add_argument("--s3", action="store_true", help="read and write the position through a local S3 server too")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    shape = (413, 2048, 2048) if a.full else tuple(int(s) for s in a.shape.split(","))
    max_plane = 1024 if a.full else a.max_plane
    work = Path(tempfile.mkdtemp(prefix="dogflow-bench-"))
    try:
        inp, out = work / "in.zarr", work / "out.zarr"
        arr = zarr.create_array(str(inp), shape=(1, 1, *shape), chunks=(1, 1, 64, 256, 256), dtype="uint16")
        write_sample(arr, shape, np.random.default_rng(0))
        del arr
        ds = open_dataset(inp)
        spec = _spec(inp, ds, max_plane)
        Output(out).prepare(spec, channels=[0])
        print(f"shape {shape}, levels {spec.levels}, shards {output.shard_shapes(spec)}, codec {output.CODEC}, "
              f"cpus {os.cpu_count()}", flush=True)
        vol_bytes = 4 * int(np.prod(shape))
        if a.full:
            result = engine_result(inp, ds)
        else:
            t = one_position(inp, out)
            written = sum(4 * int(np.prod(s)) for s in spec.levels)
            print(f"read {t['read']:.2f} s, engine {t['engine']:.2f} s, preview {t['preview']:.2f} s, "
                  f"write (all levels) {t['write']:.2f} s; read + write = "
                  f"{100 * (t['read'] + t['write']) / t['engine']:.0f} % of the engine; output ratio "
                  f"{written / du(out):.2f}")
            _, peak = traced_peak(lambda: one_position(inp, out))   # large arrays from numpy, which tracemalloc sees
            print(f"peak traced memory of read+engine+preview+write: {peak / vol_bytes:.2f}x the float32 volume")
            result = engine_result(inp, ds) if (a.layouts or a.shards or a.codecs or a.s3) else None
        shutil.rmtree(out, ignore_errors=True)
        if a.layouts:
            compare_layouts(work, inp, ds, max_plane, result, a.reps)
        if a.shards:
            compare_shards(work, inp, ds, max_plane, result, a.reps)
        if a.codecs:
            compare_codecs(work, result)
        if a.s3:
            compare_s3(work, inp, spec, result, a.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spec(inp: Path, ds, max_plane: int, dtype: str = "float32") -> OutputSpec:
    params = FilterParams(str(inp), SEED, dtype)
    return OutputSpec.for_dataset(params, ds, max_plane=max_plane)


def engine_result(inp: Path, ds, tile: int = 512) -> np.ndarray:
    """The DoG of the input. A plane larger than ``tile`` (the input is mirrored tiles, :func:`write_sample`) is
    the DoG of one tile with ``mode="reflect"``, tiled the same way: the exact DoG of the whole mirrored volume
    in its interior (the seed's "nearest" differs only at the outer faces), for a fraction of the engine's time
    and memory (a full position's engine holds 14 GB)."""
    t0 = time.perf_counter()
    z, y, x = ds.shape
    if y <= tile and x <= tile:
        result = dog.difference_of_gaussians(ds.read(0, 0), SIGMA_SMALL, SIGMA_LARGE)
    else:
        first = zarr.open_array(str(inp), mode="r")[0, 0, :, :tile, :tile]
        base = dog.difference_of_gaussians(first, SIGMA_SMALL, SIGMA_LARGE, mode="reflect")
        result = buffers.empty((z, y, x), np.float32)
        for i in range(0, y, tile):
            for j in range(0, x, tile):
                t = base[:, :: -1 if (i // tile) % 2 else 1, :: -1 if (j // tile) % 2 else 1]
                result[:, i : i + tile, j : j + tile] = t[:, : min(tile, y - i), : min(tile, x - j)]
    print(f"engine {time.perf_counter() - t0:.1f} s", flush=True)
    return result


def make_output(path: Path, inp: Path, ds, max_plane: int, layout: int) -> OutputSpec:
    """A fresh output in layout 3 (what dogflow creates) or layout 2 (the same tree, unsharded arrays)."""
    shutil.rmtree(path, ignore_errors=True)
    spec = _spec(inp, ds, max_plane)
    Output(path).prepare(spec, channels=[0])
    if layout == output.UNSHARDED_LAYOUT:
        root = zarr.open_group(str(path), mode="a")
        output._create_position(root, 0, spec, None)
        attrs = root.attrs.asdict()
        root.attrs.put({**attrs, "dogflow": {**attrs["dogflow"], "layout_version": layout, "shards": None}})
    return spec


def files(path: Path) -> int:
    """Data files (chunks or shards) under every level's ``c`` folder."""
    return sum(1 for f in path.glob("*/*/c/**/*") if f.is_file())


def timed_write(out: Path, result: np.ndarray) -> tuple[float, float]:
    """(wall, CPU) seconds of write_levels into a fresh ``out`` (earlier data removed, dirty pages flushed first)."""
    for level in range(Output(out).n_levels(0)):
        shutil.rmtree(out / level_path(0, level) / "c", ignore_errors=True)
    os.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    Output(out).write_levels(0, 0, result, "float32")
    return time.perf_counter() - t0, time.process_time() - c0


def _best_median(xs: list[float]) -> str:
    return f"{min(xs):5.2f} / {float(np.median(xs)):5.2f}"


def compare_layouts(work: Path, inp: Path, ds, max_plane: int, result: np.ndarray, reps: int) -> None:
    outs = {2: work / "layout2.zarr", 3: work / "layout3.zarr"}
    for layout, path in outs.items():
        make_output(path, inp, ds, max_plane, layout)
    runs: dict[int, list[tuple[float, float]]] = {2: [], 3: []}
    for rep in range(reps):
        for layout in ((2, 3) if rep % 2 == 0 else (3, 2)):  # alternate who goes first
            runs[layout].append(timed_write(outs[layout], result))
            print(f"  rep {rep} layout {layout}: wall {runs[layout][-1][0]:.2f} s, CPU {runs[layout][-1][1]:.2f} s",
                  flush=True)
    written = sum(4 * int(np.prod(s)) for s in pyramid.level_shapes(result.shape, max_plane))
    print(f"write of every level, best / median of {reps}")
    for layout, rs in runs.items():
        print(f"  layout {layout} ({'sharded' if layout == 3 else 'unsharded'}): wall {_best_median([r[0] for r in rs])} s,"
              f" CPU {_best_median([r[1] for r in rs])} s, {files(outs[layout])} data files, "
              f"ratio {written / du(outs[layout]):.2f}")
        shutil.rmtree(outs[layout], ignore_errors=True)


def _reads(path: Path, reps: int) -> tuple[float, float]:
    """Best seconds for one z-plane and one inner chunk of level 0, through dask.array.from_zarr (ome-zarr's reader)."""
    import dask.array as da

    arr = Output(path).level(0)
    d = da.from_zarr(arr)
    z = arr.shape[1] // 2
    cz, cy, cx = arr.chunks[1:]
    plane, chunk = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.asarray(d[0, z])
        plane.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.asarray(d[0, cz : 2 * cz, cy : 2 * cy, cx : 2 * cx])
        chunk.append(time.perf_counter() - t0)
    return min(plane), min(chunk)


def compare_shards(work: Path, inp: Path, ds, max_plane: int, result: np.ndarray, reps: int) -> None:
    budgets = {"unsharded (layout 2)": None, "1 GiB": 1 << 30, "2 GiB": 2 << 30, "whole level": 1 << 50}
    saved = sharding.SHARD_BYTES
    print("shard budget, shards | write wall / CPU, best | write phase peak / float32 volume | data files | "
          "plane read | chunk read")
    try:
        for name, budget in budgets.items():
            path = work / "shards.zarr"
            sharding.SHARD_BYTES = budget or saved
            spec = make_output(path, inp, ds, max_plane, 3 if budget else output.UNSHARDED_LAYOUT)
            ts = [timed_write(path, result) for _ in range(reps)]
            _, extra = traced_peak(lambda: Output(path).write_levels(0, 0, result, "float32"))
            plane, chunk = _reads(path, reps)
            shards = output.shard_shapes(spec) if budget else "-"
            print(f"  {name:20s} {shards} | {min(t[0] for t in ts):5.2f} / {min(t[1] for t in ts):5.2f} s | "
                  f"{(result.nbytes + extra) / result.nbytes:.2f}x | {files(path)} | {plane:.3f} s | {chunk:.4f} s",
                  flush=True)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        sharding.SHARD_BYTES = saved


def compare_codecs(work: Path, result: np.ndarray) -> None:
    """Blosc variants on the sharded layout (level 0 in the shards dogflow chooses): write/read seconds, ratio."""
    from zarr.codecs import BloscCodec

    cands = {
        "blosc lz4 shuffle": ("lz4", 5, "shuffle"),
        "blosc lz4 bitshuffle": ("lz4", 5, "bitshuffle"),
        "blosc zstd-1 shuffle": ("zstd", 1, "shuffle"),
        "blosc zstd-1 bitshuffle": ("zstd", 1, "bitshuffle"),
        "blosc zstd-3 shuffle": ("zstd", 3, "shuffle"),
    }
    chunks = pyramid.chunk_shape(result.shape)
    shards = sharding.shard_shape((1, *result.shape), chunks, 4)
    print(f"codecs, level 0 {result.shape} in shards {shards}: write wall / CPU | read | ratio")
    for name, (cname, clevel, shuffle) in cands.items():
        p = work / "codec.zarr"
        shutil.rmtree(p, ignore_errors=True)
        z = zarr.create_array(str(p), shape=(1, *result.shape), chunks=chunks, shards=shards, dtype="float32",
                              compressors=(BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle),))
        os.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        sharding.write_whole_shards(z, (0,), result)
        w, wc = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        zarr.open_array(str(p))[0]
        r = time.perf_counter() - t0
        print(f"  {name:24s} write {w:5.2f} / {wc:5.2f} s  read {r:5.2f} s  ratio {result.nbytes / du(p):.2f}", flush=True)
        shutil.rmtree(p)


def compare_s3(work: Path, inp: Path, spec: OutputSpec, result: np.ndarray, repeats: int = 3) -> None:
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
