"""The output layout (version 3, sharded; version 2 resumed unsharded), pyramid, completion markers, status and the run lock, on real Zarr stores on disk.

Paths inside the output are asked from ``store``, never written out here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import is_populated_mapping
from datasets import make_bioformats2raw
from tasks import buffers
from tasks import markers, output, pyramid
from tasks.filters import DoG, FilterParams
from tasks.lock import LOCK_KEY, RunLock, RunLockedError
from tasks.markers import Markers
from tasks.output import Output, OutputSpec, level_path
from tasks.storage import StoreError
from tasks.markers import MarkerState
from tasks.testing import traced_peak
from tasks.inputs import open_dataset


def _params(inp, **kw):
    d = dict(input_path=str(inp), sigma_small=(1.0,) * 3, sigma_large=(2.0,) * 3, truncate=4.0, mode="nearest",
             output_dtype="float32")
    d.update(kw)
    return FilterParams(d.pop("input_path"), DoG(d["sigma_small"], d["sigma_large"], d["truncate"], d["mode"]),
                        d["output_dtype"])


def _spec(inp, max_plane=pyramid.PYRAMID_MAX_PLANE, **kw):
    return OutputSpec.for_dataset(_params(inp, **kw), open_dataset(inp), max_plane=max_plane)


def test_uint16_policy_rounds_and_clips():
    x = np.array([-70000.0, -3.2, -0.5, 0.4, 0.5, 1.5, 2.5, 65534.6, 70000.0])
    out = pyramid.to_output_dtype(x, "uint16")
    assert out.dtype == np.uint16
    assert out.tolist() == [0, 0, 0, 0, 0, 2, 2, 65535, 65535]  # half to even; negatives never wrap


def test_level_shapes_halve_until_the_plane_fits():
    assert pyramid.level_shapes((413, 2048, 2048)) == [(413, 2048, 2048), (413, 1024, 1024)]
    assert pyramid.level_shapes((10, 5000, 300)) == [(10, 5000, 300), (10, 2500, 150), (10, 1250, 75), (10, 625, 38)]
    assert pyramid.level_shapes((4, 1024, 10)) == [(4, 1024, 10)]
    assert pyramid.level_shapes((4, 41, 37), max_plane=10) == [(4, 41, 37), (4, 21, 19), (4, 11, 10), (4, 6, 5)]


def _mean_2x2(a):
    """Reference 2x2 mean in y, x (float64); an odd last row or column averages with itself."""
    z, y, x = a.shape
    padded = np.pad(a.astype(np.float64), ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    return padded.reshape(z, (y + 1) // 2, 2, (x + 1) // 2, 2).mean(axis=(2, 4))


@pytest.mark.parametrize("shape", [(3, 8, 6), (2, 9, 7), (2, 1, 5), (1, 4, 1)])
def test_pyramid_level_is_the_2x2_mean_of_the_level_above(shape):
    rng = np.random.default_rng(1)
    a = rng.normal(size=shape).astype(np.float32)
    got = pyramid.downsample_mean(a)
    ref = _mean_2x2(a)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_large_arrays_are_populated_mappings_with_the_same_values(tmp_path, monkeypatch):
    """The input volume a task reads, its pyramid levels and its uint16 copy come from pre-populated mappings
    (tasks.buffers) once large; here every size is 'large'. Missing input chunks still read as the fill value."""
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=2, shape=(5, 19, 23), chunks=(2, 8, 8))
    ds = open_dataset(inp)
    first = inp / ds.stored_objects(1, 1)[0]   # chunk (0, 0, 0): planes 0-1, rows and columns 0-7
    first.unlink()  # a missing chunk
    monkeypatch.setattr(buffers, "POPULATE_MIN", 1)
    v = ds.read(1, 1)
    assert is_populated_mapping(v) and v.flags.writeable and v.dtype == ds.dtype and v.shape == (5, 19, 23)
    want = zarr.open_array(str(inp / "1" / "0"), mode="r")[0, 1]   # series 1 = position 1: (T, C, Z, Y, X)
    np.testing.assert_array_equal(v, want)
    assert not np.any(v[:2, :8, :8]) and np.all(v[2:] > 0)   # the missing chunk reads as the fill value, the rest is data
    f = v.astype(np.float32) - 7.5
    lv = pyramid.downsample_mean(f)
    assert is_populated_mapping(lv)
    np.testing.assert_allclose(lv, _mean_2x2(f), rtol=1e-6, atol=1e-5)
    u = pyramid.to_output_dtype(f, "uint16")
    assert is_populated_mapping(u) and u.dtype == np.uint16
    np.testing.assert_array_equal(u, np.clip(np.rint(f), 0, 65535).astype(np.uint16))


def test_layout_v3_tree_and_ngff_metadata(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=3, shape=(4, 41, 37))
    out = tmp_path / "o.zarr"
    spec = _spec(inp, max_plane=16)
    prov = Output(out).prepare(spec, channels=[2, 0])
    assert prov["layout_version"] == 3 and prov["channels"] == [0, 2]
    assert prov["shards"] == [[1, 4, 41, 37], [1, 4, 21, 19], [1, 4, 11, 10]] == output.shard_shapes(spec)
    assert prov["voxel_size"] == [2.0, 0.406, 0.406] and prov["unit"] == "micrometer"
    assert prov["codec"] == output.CODEC and prov["input"]["layout"] == "bioformats2raw"
    assert prov["levels"] == [[4, 41, 37], [4, 21, 19], [4, 11, 10]]
    for p in range(2):
        assert Output(out).n_levels(p) == 3
        for level, (z, y, x) in enumerate(prov["levels"]):
            arr = Output(out).level(p, level)
            assert arr.shape == (3, z, y, x) and arr.metadata.dimension_names == ("c", "z", "y", "x")
            assert arr.chunks == (1, z, y, x) and arr.metadata.zarr_format == 3
            assert arr.shards == tuple(prov["shards"][level])  # zarr v3's sharding codec; here one chunk per shard
            assert arr.compressors[0].to_dict()["configuration"]["cname"] == "lz4"
            assert Path(arr.store_path.store.root) / arr.path == out / level_path(p, level)
    ome = zarr.open_group(str(out), mode="r").attrs["ome"]
    assert ome["version"] == "0.5" and [m["name"] for m in ome["multiscales"]] == ["position 0", "position 1"]
    ms = ome["multiscales"][1]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][1] == {"name": "z", "type": "space", "unit": "micrometer"}
    assert [d["path"] for d in ms["datasets"]] == ["1/0", "1/1", "1/2"]
    t2 = ms["datasets"][2]["coordinateTransformations"]
    assert t2[0]["scale"] == pytest.approx([1.0, 2.0, 0.406 * 4, 0.406 * 4])
    assert t2[1]["translation"] == pytest.approx([0.0, 0.0, 0.406 * 1.5, 0.406 * 1.5])  # centre of 4 pixels
    assert [c["active"] for c in ome["omero"]["channels"]] == [True, False, True]


def test_write_levels_writes_every_level_of_one_channel_only(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=2, shape=(3, 30, 22))
    out = tmp_path / "o.zarr"
    Output(out).prepare(_spec(inp, max_plane=8), channels=[1])
    result = np.random.default_rng(0).normal(size=(3, 30, 22)).astype(np.float32)
    assert Output(out).write_levels(1, 1, result, "float32") == 3
    level = result
    for n in range(3):
        arr = Output(out).level(1, n)
        np.testing.assert_array_equal(arr[1], level)
        assert not np.any(arr[0])  # the other channel stays unwritten
        level = pyramid.downsample_mean(level)
    assert not list((out / "0").rglob("c/*/*"))  # position 0 untouched: no chunk on disk


def test_uint16_levels_are_computed_in_float_then_cast(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=1, channels=1, shape=(2, 6, 6))
    out = tmp_path / "o.zarr"
    Output(out).prepare(_spec(inp, max_plane=4, output_dtype="uint16"))
    result = np.array([[[-4.0, 1.5, 2.5, 3.0, 0.4, 0.6]] * 6] * 2, dtype=np.float32)
    Output(out).write_levels(0, 0, result, "uint16")
    lv1 = Output(out).level(0, 1)[0]
    assert lv1.dtype == np.uint16
    np.testing.assert_array_equal(lv1, pyramid.to_output_dtype(pyramid.downsample_mean(result), "uint16"))
    assert lv1[0, 0].tolist() == [0, 3, 0]  # mean(-4, 1.5) = -1.25 -> 0; mean(2.5, 3) = 2.75 -> 3; 0.5 -> 0


def test_markers_are_atomic_and_owned_per_position_and_channel(sample, tmp_path):
    out = tmp_path / "o.zarr"
    params = _params(sample)
    Output(out).prepare(_spec(sample))
    assert Output(out).markers.read(0, 0) is None
    # leftover temp file of a killed writer and a torn marker: neither counts as complete, neither breaks anything
    m0, m1 = (Path(out) / Markers.key(0, 1)), (Path(out) / Markers.key(1, 1))
    m0.parent.mkdir(parents=True)
    m1.parent.mkdir(parents=True)
    (m0.parent / f".{m0.name}.host.123.tmp").write_text('{"position": 0')
    m1.write_text('{"position": 1, "input_fin')
    assert Output(out).markers.read(0, 1) is None and Output(out).markers.read(1, 1) is None
    record = markers.marker_record(params, "abc", {"position": 0, "channel": 1, "seconds": 1.0})
    Output(out).markers.write(0, 1, record)
    key = markers.expected_key(params, "abc")
    assert markers.judge(Output(out).markers.read(0, 1), key) == (MarkerState.COMPLETE, "")
    assert Output(out).markers.read(0, 0) is None  # per channel
    other = markers.expected_key(_params(sample, sigma_large=(3.0,) * 3), "abc")
    assert markers.judge(Output(out).markers.read(0, 1), other) == (MarkerState.STALE, "parameters changed")
    assert markers.judge(None, key) == (MarkerState.MISSING, "")
    assert Output(out).markers.marked() == [(0, 1), (1, 1)]
    Output(out).markers.clear(0, 1)
    assert Output(out).markers.read(0, 1) is None


def test_check_output_refuses_other_params_shape_voxel_size_and_old_layout(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=2, shape=(4, 12, 10))
    out = tmp_path / "o.zarr"
    spec = _spec(inp)
    assert Output(out).check(spec, False) == "create"
    Output(out).prepare(spec, channels=[0])
    assert Output(out).check(spec, False) == "open"
    with pytest.raises(StoreError, match=r"other parameters \(sigma_large"):
        Output(out).check(_spec(inp, sigma_large=(3.0,) * 3), False)
    assert Output(out).check(_spec(inp, sigma_large=(3.0,) * 3), True) == "overwrite"
    moved = OutputSpec(spec.params, 2, 2, spec.shape, (1.0, 0.406, 0.406), "micrometer")
    with pytest.raises(StoreError, match="another voxel size"):
        Output(out).check(moved, False)
    with pytest.raises(StoreError, match=r"another shape \(c,z,y,x\)=\(2, 4, 12, 10\), input has \(3, 4, 12, 10\)"):
        Output(out).check(OutputSpec(spec.params, 2, 3, spec.shape, spec.voxel_size, spec.unit), False)
    # layout 1 (what dogflow wrote before): refused with what to do, recomputed into layout 3 with overwrite
    v1 = tmp_path / "v1.zarr"
    g = zarr.open_group(str(v1), mode="w")
    g.create_array("0", shape=(2, 4, 12, 10), chunks=(1, 4, 12, 10), dtype="float32")
    g.attrs["dogflow"] = {"layout_version": 1, "params": {}, "shape": [2, 4, 12, 10]}
    v1_markers = (Path(v1) / Markers.key(0, 0)).parents[1]  # layout 1 kept one marker file per position here
    v1_markers.mkdir(parents=True)
    (v1_markers / "000000.json").write_text("{}")
    with pytest.raises(StoreError) as info:
        Output(v1).check(spec, False)
    msg = str(info.value)
    assert "old layout 1" in msg and "--overwrite" in msg and "new output path" in msg and "\n" not in msg
    Output(v1).prepare(spec, overwrite=True)
    assert Output(v1).provenance()["layout_version"] == 3 and Output(v1).level(1).shape == (2, 4, 12, 10)
    assert not list(v1_markers.iterdir())


def test_params_digest_does_not_depend_on_channels_and_channels_accumulate(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=1, channels=3, shape=(2, 8, 8))
    out = tmp_path / "o.zarr"
    spec = _spec(inp)
    Output(out).prepare(spec, channels=[0])
    assert Output(out).check(spec, False) == "open"  # another channel is not another parameter
    prov = Output(out).prepare(spec, channels=[2])
    assert prov["channels"] == [0, 2]
    assert Output(out).provenance()["channels"] == [0, 2]


def test_output_grows_with_the_input(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=1, shape=(2, 8, 8))
    out = tmp_path / "o.zarr"
    Output(out).prepare(_spec(inp))
    Output(out).write_levels(1, 0, np.ones((2, 8, 8), np.float32), "float32")
    make_bioformats2raw(tmp_path / "more.zarr", positions=3, channels=1, shape=(2, 8, 8))
    grown = OutputSpec(_params(inp), 3, 1, (2, 8, 8), (2.0, 0.406, 0.406), "micrometer")
    prov = Output(out).prepare(grown)
    assert prov["shape"] == [3, 1, 2, 8, 8] and Output(out).level(2).shape == (1, 2, 8, 8)
    assert len(zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"]) == 3
    assert Output(out).level(1)[0].min() == 1.0  # existing positions untouched


def test_status_rows_per_position_and_channel(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=2, shape=(2, 8, 8))
    out = tmp_path / "o.zarr"
    params = _params(inp)
    Output(out).prepare(_spec(inp), channels=[1])
    ds = open_dataset(inp)
    Output(out).markers.write(0, 1, markers.marker_record(params, ds.fingerprint(0, 1), {"seconds": 1.0}))
    Output(out).markers.write(1, 1, markers.marker_record(params, "old-fingerprint", {"seconds": 1.0}))
    st = Output(out).status()
    assert [(r.position, r.channel, r.state, r.reason) for r in st.rows] == [
        (0, 1, "complete", ""), (1, 1, "stale", "input changed")]
    assert st.counts() == {"complete": 1, "missing": 0, "stale": 1} and st.input_problem is None
    with pytest.raises(StoreError, match="^output not found: .*nothing.zarr$"):
        Output(tmp_path / "nothing.zarr").status()
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreError, match="^not a dogflow output: .*other$"):
        Output(tmp_path / "other").status()
    (out / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="^corrupt output: its zarr.json is not valid JSON"):
        Output(out).status()


def test_run_log_path(tmp_path):
    out = tmp_path / "o.zarr"
    assert Output(out).log_path("brave-fox") == out / output.LOG_PREFIX / "brave-fox-local.log"
    assert Output(out).log_path("run", "42").name == "run-42.log"
    assert Output(out).log_path("x", folder=tmp_path / "L") == tmp_path / "L" / "x-local.log"


def test_lock_is_exclusive_and_stale_after_owner_death(tmp_path):
    out = tmp_path / "o.zarr"
    lock_file = out / LOCK_KEY
    lock = RunLock(out, run_id="a", run_name="brave-fox").acquire()
    with pytest.raises(RunLockedError, match=r"another dogflow run is writing to this output: flow run 'brave-fox' \(a\) on host "):
        RunLock(out, run_id="b").acquire()
    lock.release()
    assert not lock_file.exists()
    # a lock left behind by a process that died (SIGKILL: no cleanup) is stale and taken over
    code = f"from tasks.lock import RunLock; import os; RunLock({str(out)!r}, run_id='dead').acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert json.loads(lock_file.read_text())["run_id"] == "dead"
    RunLock(out).check()  # stale: no error
    taken = RunLock(out, run_id="c").acquire()
    assert json.loads(lock_file.read_text())["run_id"] == "c"
    taken.release()


def test_lock_heartbeat_keeps_it_fresh(tmp_path):
    lock = RunLock(tmp_path / "o.zarr", stale_after=4.0).acquire()
    lock_file = tmp_path / "o.zarr" / LOCK_KEY
    old = lock_file.stat().st_mtime
    time.sleep(2.5)
    assert lock_file.stat().st_mtime > old
    lock.release()


@pytest.mark.parametrize("output_dtype", ["float32", "float16", "uint16"])
def test_write_peak_is_within_its_bound_and_the_memory_plan(tmp_path, output_dtype):
    """write_levels (every pyramid level, the uint16 cast) measured with tracemalloc stays within
    pyramid.write_peak_bytes, and the memory plan covers that phase as well as the filter's."""
    import dataclasses

    from conftest import volume_dataset
    from flows.request import RunRequest
    from tasks import filters

    zyx = (40, 320, 352)
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    volume_dataset(inp, positions=1, shape=(2, 8, 8))
    spec = RunRequest(str(inp), str(out), output_dtype=output_dtype).validate()
    output = dataclasses.replace(spec.output, shape=zyx, max_plane=64)
    Output(out).prepare(output, channels=[0])
    assert len(output.levels) == 4
    result = np.random.default_rng(0).normal(100, 50, zyx).astype(np.float32)
    Output(out).write_levels(0, 0, result, output_dtype)  # warm up
    # the shard writer's chunk buffers are part of the bound (sharding.buffer_bytes, for its most threads); zarr
    # writes no chunk here (layout 3), so no allowance for zarr's buffers is needed
    _, extra = traced_peak(lambda: Output(out).write_levels(0, 0, result, output_dtype, threads=4))
    bound = pyramid.write_peak_bytes(zyx, output_dtype)
    assert result.nbytes + extra <= bound, (result.nbytes + extra, bound)
    assert np.array_equal(Output(out).level(0)[0], pyramid.to_output_dtype(result, output_dtype))
    plan = filters.memory_per_task("dog", zyx, np.uint16, output_dtype)
    assert plan >= 1.1 * bound + filters.RUNTIME_OVERHEAD


def _as_layout_2(out, spec):
    """Turn a fresh output into what dogflow wrote as layout 2: the same tree, unsharded arrays, no "shards"."""
    root = zarr.open_group(str(out), mode="a")
    for p in range(spec.n_positions):
        output._create_position(root, p, spec, None)
    attrs = root.attrs.asdict()
    prov = {k: v for k, v in attrs["dogflow"].items() if k not in ("shards", "chunks", "float16_policy")}
    root.attrs.put({**attrs, "dogflow": {**prov, "layout_version": 2}})


def test_layout_2_output_keeps_resuming_unsharded_and_overwrite_makes_it_layout_3(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=1, shape=(3, 30, 22))
    out = tmp_path / "o.zarr"
    spec = _spec(inp, max_plane=8)
    Output(out).prepare(spec)
    _as_layout_2(out, spec)
    assert Output(out).check(spec, False) == "open"
    prov = Output(out).prepare(spec)
    assert prov["layout_version"] == 2 and "shards" not in prov
    result = np.random.default_rng(0).normal(size=(3, 30, 22)).astype(np.float32)
    assert Output(out).write_levels(1, 0, result, "float32") == 3
    arr = Output(out).level(1)
    assert arr.shards is None and arr.chunks == (1, 3, 30, 22)
    np.testing.assert_array_equal(arr[0], result)
    assert Output(out).status().provenance["layout_version"] == 2
    # positions a layout-2 output gains are unsharded too
    make_bioformats2raw(tmp_path / "more.zarr", positions=3, channels=1, shape=(3, 30, 22))
    grown = OutputSpec(_params(inp), 3, 1, (3, 30, 22), (2.0, 0.406, 0.406), "micrometer", max_plane=8)
    assert Output(out).prepare(grown)["layout_version"] == 2
    assert all(Output(out).level(2, lv).shards is None for lv in range(3))
    # --overwrite recomputes into layout 3 (sharded)
    prov = Output(out).prepare(spec, overwrite=True)
    assert prov["layout_version"] == 3 and Output(out).level(0).shards == tuple(prov["shards"][0])


def test_layout_newer_than_this_dogflow_is_refused_in_one_line(tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=1, channels=1, shape=(2, 8, 8))
    out = tmp_path / "o.zarr"
    spec = _spec(inp)
    Output(out).prepare(spec)
    root = zarr.open_group(str(out), mode="a")
    root.attrs["dogflow"] = {**root.attrs["dogflow"], "layout_version": 4}
    for call in (lambda: Output(out).check(spec, False), lambda: Output(out).check(spec, True),
                 lambda: Output(out).status()):
        with pytest.raises(StoreError) as info:
            call()
        assert "layout 4, newer than this dogflow's (3)" in str(info.value) and "\n" not in str(info.value)


def test_float16_policy_rounds_to_nearest_and_clips_at_65504():
    x = np.array([-1e6, -65519.0, 0.1, 1 / 3, 2049.0, 2051.0, 65504.0, 65519.0, 65520.0, 3e38], dtype=np.float32)
    out = pyramid.to_output_dtype(x, "float16")
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, np.clip(x, -65504, 65504).astype(np.float16))
    assert out[[0, 1, 6, 7, 8, 9]].tolist() == [-65504.0, -65504.0, 65504.0, 65504.0, 65504.0, 65504.0]
    assert out[4] == 2048.0 and out[5] == 2052.0  # 11-bit significand: steps of 2 above 2048, ties to even
    v = np.random.default_rng(3).normal(0, 1000, 100_000).astype(np.float32)
    rel = np.abs(pyramid.to_output_dtype(v, "float16").astype(np.float64) - v) / np.maximum(np.abs(v), 2.0**-14)
    assert rel.max() <= 2.0**-11


def test_float16_output_is_the_float32_result_rounded(tmp_path):
    """The whole task, twice: float16 output equals the float32 output rounded to float16, at every level."""
    from tasks.position import process_position

    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=2, shape=(6, 40, 36))
    outs = {}
    for dtype in ("float32", "float16"):
        outs[dtype] = tmp_path / f"{dtype}.zarr"
        spec = _spec(inp, max_plane=16, output_dtype=dtype)
        Output(outs[dtype]).prepare(spec, channels=[1])
        process_position(str(inp), str(outs[dtype]), 1, spec.params.as_dict(), threads=1, channels=[1])
    assert Output(outs["float16"]).n_levels(1) == 3
    for level in range(3):
        full = Output(outs["float32"]).level(1, level)[1]
        half = Output(outs["float16"]).level(1, level)
        assert half.dtype == np.float16 and half.shards is not None
        np.testing.assert_array_equal(half[1], full.astype(np.float16))
    assert Output(outs["float16"]).markers.read(1, 1) is not None


_CRASH = """
import os, sys
from tasks import markers, output, pyramid
from tasks.filters import DoG, FilterParams
from tasks.lock import LOCK_KEY, RunLock, RunLockedError
from tasks.markers import MarkerRow, Markers
from tasks.output import Output, OutputSpec, level_path
from tasks.storage import StoreError
from tasks.markers import MarkerState
from tasks.testing import traced_peak
from tasks.position import process_position
real, calls = os.replace, []
def crash_in_second_shard(src, dst):  # os.replace of every caller (the preview too), so count shards only
    calls.append("/c/" in str(dst))
    if sum(calls) == 2:  # the second shard's bytes are half on disk when the process dies
        with open(src, "r+b") as fh:
            fh.truncate(os.path.getsize(src) // 2)
        os._exit(9)
    real(src, dst)
os.replace = crash_in_second_shard
process_position(sys.argv[1], sys.argv[2], 0, FilterParams.from_dict(Output(sys.argv[2]).provenance()["params"]).as_dict(),
                 threads=1, channels=[0])
"""


def test_a_crash_mid_shard_is_never_complete_and_the_rerun_rewrites_it(tmp_path, monkeypatch):
    """A real crash: the task's process dies (os._exit) while its second shard is half written. No marker, no torn
    shard under a shard's name (at most a temporary file), status says missing; the rerun rewrites every
    shard, removes the temporary file and marks the channel complete with the right data."""
    from tasks.position import process_position

    monkeypatch.setattr(pyramid, "CHUNK_ZYX", (4, 16, 16))
    monkeypatch.setattr("tasks.sharding.SHARD_BYTES", 4 * 8 * 48 * 48)  # shards (1, 8, 48, 48): 3 along z
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=1, channels=1, shape=(20, 40, 36))
    out = tmp_path / "o.zarr"
    spec = _spec(inp)
    prov = Output(out).prepare(spec, channels=[0])
    assert prov["shards"] == [[1, 8, 48, 48]]
    level0 = out / level_path(0, 0)
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(inp), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert Output(out).markers.read(0, 0) is None
    assert [r.state for r in Output(out).status().rows] == ["missing"]
    temps = list(level0.rglob("*.tmp"))
    shards = [f for f in level0.rglob("c/*/*/*/*") if not f.name.endswith(".tmp")]
    assert len(temps) == 1 and len(shards) == 1  # the first shard whole, the second only as a temporary file
    arr = Output(out).level(0)
    arr[0, :8]  # the finished shard reads (its index checksum holds)
    process_position(str(inp), str(out), 0, spec.params.as_dict(), threads=2, channels=[0])
    assert not list(level0.rglob("*.tmp"))
    assert len(list(level0.rglob("c/*/*/*/*"))) == 3  # (20, 40, 36) in shards of (8, 48, 48)
    from conftest import assert_output_exact
    assert_output_exact(out, inp, (1.0,) * 3, (2.0,) * 3)
