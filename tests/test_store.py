"""The output layout, completion markers, fingerprints and the run lock, on real Zarr stores on disk."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from tasks import store


def _params(inp, **kw):
    d = dict(input_path=str(inp), channel=0, sigma_small=(1.0,) * 3, sigma_large=(2.0,) * 3, truncate=4.0,
             mode="nearest", output_dtype="float32")
    d.update(kw)
    return store.FilterParams(**d)


def test_uint16_policy_rounds_and_clips():
    x = np.array([-70000.0, -3.2, -0.5, 0.4, 0.5, 1.5, 2.5, 65534.6, 70000.0])
    out = store.to_output_dtype(x, "uint16")
    assert out.dtype == np.uint16
    assert out.tolist() == [0, 0, 0, 0, 0, 2, 2, 65535, 65535]  # half to even; negatives never wrap


def test_fingerprint_tracks_each_position_alone(sample):
    arr = zarr.open_array(str(sample), mode="r+")
    before = [store.input_fingerprint(arr, p, 1) for p in range(3)]
    assert len(set(before)) == 3
    time.sleep(0.01)
    arr[1, 1, 0, 0, 0] = 7  # rewrites one chunk of position 1
    after = [store.input_fingerprint(arr, p, 1) for p in range(3)]
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert store.input_fingerprint(arr, 1, 0) == store.input_fingerprint(arr, 1, 0)


def test_fingerprint_zarr_v2_and_missing_chunks(tmp_path):
    a = zarr.create_array(str(tmp_path / "v2.zarr"), shape=(2, 1, 4, 4, 4), chunks=(1, 1, 2, 4, 4), dtype="uint16",
                          zarr_format=2)
    empty = store.input_fingerprint(a, 0, 0)
    a[0, 0] = 1
    assert store.input_fingerprint(a, 0, 0) != empty
    assert store.input_fingerprint(a, 1, 0) == store.input_fingerprint(a, 1, 0)


def test_markers_are_atomic_and_owned_per_position(sample, tmp_path):
    out = tmp_path / "o.zarr"
    params = _params(sample)
    store.prepare_output(out, params, zarr.open_array(str(sample)).shape)
    assert store.read_marker(out, 0) is None
    # leftover temp file of a killed writer and a torn marker: neither counts as complete, neither breaks anything
    mdir = out / "dogflow" / "positions"
    (mdir / ".000000.json.host.123.tmp").write_text('{"position": 0')
    (mdir / "000001.json").write_text('{"position": 1, "input_fin')
    assert store.read_marker(out, 0) is None and store.read_marker(out, 1) is None
    key = store.expected_marker_key(params, "abc")
    store.write_marker(out, 0, {**key, "position": 0})
    assert store.position_state(store.read_marker(out, 0), key) == "complete"
    other = store.expected_marker_key(_params(sample, sigma_large=(3.0,) * 3), "abc")
    assert store.position_state(store.read_marker(out, 0), other) == "stale"
    assert store.stale_reason(store.read_marker(out, 0), other) == "parameters changed"
    assert store.position_state(None, key) == "missing"
    store.clear_marker(out, 0)
    assert store.read_marker(out, 0) is None


def test_output_layout_is_ngff(sample, tmp_path):
    out = tmp_path / "o.zarr"
    arr = store.prepare_output(out, _params(sample), (3, 2, 12, 40, 36))
    assert arr.shape == (3, 12, 40, 36) and arr.chunks[0] == 1 and arr.metadata.zarr_format == 3
    g = zarr.open_group(str(out), mode="r")
    assert sorted(g.keys()) == ["0", "dogflow"]
    assert g.attrs["ome"]["multiscales"][0]["axes"][0] == {"name": "position", "type": "position"}
    assert g.attrs["dogflow"]["params"]["output_dtype"] == "float32"


def test_lock_is_exclusive_and_stale_after_owner_death(tmp_path):
    out = tmp_path / "o.zarr"
    lock = store.RunLock(out, run_id="a").acquire()
    with pytest.raises(store.RunLockedError, match="another dogflow run is writing to this output"):
        store.RunLock(out, run_id="b").acquire()
    lock.release()
    assert not lock.path.exists()
    # a lock left behind by a process that died (SIGKILL: no cleanup) is stale and taken over
    code = f"from tasks import store; import os; store.RunLock({str(out)!r}, run_id='dead').acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert json.loads(lock.path.read_text())["run_id"] == "dead"
    store.RunLock(out).check()  # stale: no error
    taken = store.RunLock(out, run_id="c").acquire()
    assert json.loads(taken.path.read_text())["run_id"] == "c"
    taken.release()


def test_lock_heartbeat_keeps_it_fresh(tmp_path):
    lock = store.RunLock(tmp_path / "o.zarr", stale_after=4.0).acquire()
    old = lock.path.stat().st_mtime
    time.sleep(2.5)
    assert lock.path.stat().st_mtime > old
    lock.release()
