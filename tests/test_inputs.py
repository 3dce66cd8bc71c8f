"""Every input layout through tasks/inputs.py, on real Zarr stores on disk: geometry, voxel size, data,
stored objects (fingerprints, missing and unreadable chunks) and one-line errors."""

from __future__ import annotations

from pathlib import Path

import time

import numpy as np
import pytest
import zarr

from datasets import make_bioformats2raw, make_ome_image
from flows.sample import make_sample
from tasks.filters import DoG, FilterParams
from tasks.output import Output, OutputSpec
from tasks.inputs import open_dataset
from tasks.storage import StoreError

SHAPE = (6, 20, 18)
CHUNKS = (3, 10, 9)


def _plain(path, zarr_format):
    arr = make_sample(path, positions=3, channels=2, shape=SHAPE, chunks=CHUNKS, blobs=4, zarr_format=zarr_format)
    return arr[:]


def _legacy_group(path):
    """A group with a 5-D array '0' and minimal multiscales without axes (what dogflow always accepted)."""
    g = zarr.open_group(str(path), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    return make_sample(path / "0", positions=2, channels=2, shape=SHAPE, chunks=CHUNKS, blobs=4)[:]


def _dogflow_output(path, tmp_path):
    """dogflow's own layout-2 output (two positions, channel 1 computed), written through store."""
    src = tmp_path / "src.zarr"
    data = make_bioformats2raw(src, positions=2, channels=2, shape=SHAPE, chunks=CHUNKS, blobs=4)
    ds = open_dataset(src)
    spec = OutputSpec.for_dataset(FilterParams(str(src), DoG((1.0,) * 3, (2.0,) * 3, 4.0, "nearest"), "float32"), ds)
    Output(path).prepare(spec, channels=[0, 1])
    out = np.zeros(data.shape, np.float32)
    for p in range(2):
        for c in range(2):
            out[p, c] = data[p, c] * 0.5
            Output(path).write_levels(p, c, out[p, c], "float32")
    return out


LAYOUTS = {
    "array-v3": ("array", lambda p, t: _plain(p, 3), None),
    "array-v2": ("array", lambda p, t: _plain(p, 2), None),
    "legacy-group": ("ome-zarr", lambda p, t: _legacy_group(p), None),
    "ome-0.5": ("ome-zarr", lambda p, t: make_ome_image(p, channels=2, shape=SHAPE, chunks=CHUNKS)[None], "micrometer"),
    "ome-0.4": ("ome-zarr", lambda p, t: make_ome_image(p, channels=2, shape=SHAPE, ngff="0.4", chunks=CHUNKS,
                                                        voxel_size=(2000.0, 406.0, 406.0), unit="nanometer")[None],
                "nanometer"),
    "bioformats2raw-0.4": ("bioformats2raw", lambda p, t: make_bioformats2raw(p, shape=SHAPE, chunks=CHUNKS), "micrometer"),
    "bioformats2raw-0.5-no-OME": ("bioformats2raw", lambda p, t: make_bioformats2raw(
        p, shape=SHAPE, ngff="0.5", series_list=False, chunks=CHUNKS), "micrometer"),
    "dogflow-output": ("dogflow", _dogflow_output, "micrometer"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_reads_the_same_way(name, tmp_path):
    layout, make, unit = LAYOUTS[name]
    path = tmp_path / "in.zarr"
    data = make(path, tmp_path)  # (P, C, z, y, x) as written
    ds = open_dataset(path)
    assert ds.layout == layout
    assert (ds.n_positions, ds.n_channels, ds.shape) == (data.shape[0], data.shape[1], SHAPE)
    assert ds.dtype == data.dtype
    assert ds.unit == unit
    if unit is None:
        assert ds.voxel_size is None and ds.voxel_size_um is None
    else:
        assert ds.voxel_size_um == pytest.approx((2.0, 0.406, 0.406))
    for p in range(ds.n_positions):
        for c in range(ds.n_channels):
            np.testing.assert_array_equal(ds.read(p, c), data[p, c])
    # stored objects: every chunk of the volume (2 x 2 x 2 chunks of CHUNKS; dogflow's output: one), all on disk
    objs = ds.stored_objects(ds.n_positions - 1, 1)
    assert len(objs) == (1 if layout == "dogflow" else 8) and all((Path(ds.path) / key).exists() for key in objs)
    assert ds.missing_objects(ds.n_positions - 1, 1) == [] and ds.find_unreadable_chunk(0, 0) is None
    assert ds.describe()["layout"] == layout


def test_fingerprint_tracks_each_position_and_channel_alone(tmp_path):
    path = tmp_path / "b.zarr"
    make_bioformats2raw(path, positions=3, shape=SHAPE, chunks=CHUNKS)
    ds = open_dataset(path)
    before = {(p, c): ds.fingerprint(p, c) for p in range(3) for c in range(2)}
    assert len(set(before.values())) == 6
    time.sleep(0.01)
    zarr.open_array(str(path / "1" / "0"), mode="r+")[0, 1, 0, 0, 0] = 7  # one chunk of position 1, channel 1
    after = {(p, c): ds.fingerprint(p, c) for p in range(3) for c in range(2)}
    assert [k for k in before if before[k] != after[k]] == [(1, 1)]


def test_missing_and_unreadable_chunks_are_named(tmp_path):
    path = tmp_path / "b.zarr"
    make_bioformats2raw(path, positions=2, shape=SHAPE, chunks=CHUNKS)
    ds = open_dataset(path)
    name_a, name_b = ds.stored_objects(1, 0)[:2]
    file_a, file_b = path / name_a, path / name_b
    assert name_a == "1/0/0/0/0/0/0"  # relative to the input root: series 1, level 0, chunk (t, c, z, y, x)
    file_a.unlink()
    file_b.write_bytes(b"\xff" * 30)
    assert ds.missing_objects(1, 0) == [name_a] and ds.missing_objects(1, 1) == []
    bad = ds.find_unreadable_chunk(1, 0)
    assert bad is not None and bad[0] == name_b


def _raises(path, expect):
    with pytest.raises(StoreError) as info:
        open_dataset(path)
    msg = str(info.value)
    assert expect in msg and len(msg.splitlines()) == 1, msg


def test_series_that_differ_are_one_line_errors(tmp_path):
    a = tmp_path / "shape.zarr"
    make_bioformats2raw(a, positions=2, shape=SHAPE)
    make_ome_image(a / "1", shape=(6, 20, 20), ngff="0.4")  # series 1 replaced by another shape
    _raises(a, "input series 1 has shape (z,y,x) (6, 20, 20), not (6, 20, 18)")
    b = tmp_path / "voxel.zarr"
    make_bioformats2raw(b, positions=2, shape=SHAPE)
    make_ome_image(b / "1", shape=SHAPE, ngff="0.4", voxel_size=(1.0, 0.406, 0.406))
    _raises(b, "input series 1 has voxel size (1.0, 0.406, 0.406)")


def test_bad_inputs_are_one_line_errors(tmp_path):
    _raises(tmp_path / "nope.zarr", "input not found")
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 5, 6), chunks=(2, 5, 6), dtype="uint16")
    _raises(tmp_path / "a.zarr", "must be 5-D")
    zarr.create_array(str(tmp_path / "b.zarr"), shape=(1, 1, 2, 3, 4), chunks=(1, 1, 2, 3, 4), dtype="bool")
    _raises(tmp_path / "b.zarr", "real numeric")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    _raises(tmp_path / "g.zarr", "neither an OME-Zarr image")
    t = tmp_path / "t.zarr"
    make_ome_image(t, shape=SHAPE)
    g = zarr.open_group(str(t), mode="a")
    zarr.create_array(str(t / "0"), shape=(3, 2, *SHAPE), chunks=(1, 1, *SHAPE), dtype="uint16", overwrite=True)
    _raises(t, "has 3 time points")
    r = tmp_path / "r.zarr"
    make_bioformats2raw(r, positions=1, shape=SHAPE)
    zarr.open_group(str(r), mode="a").attrs["bioformats2raw.layout"] = 4
    _raises(r, "unsupported bioformats2raw.layout 4")
    assert g is not None


def test_a_task_opens_only_the_image_of_its_position(tmp_path):
    path = tmp_path / "b.zarr"
    data = make_bioformats2raw(path, positions=4, shape=SHAPE, chunks=CHUNKS)
    ds = open_dataset(path, check=False)
    np.testing.assert_array_equal(ds.read(2, 1), data[2, 1])
    assert ds.opened_images == [0, 2] and ds.n_positions == 4
    make_ome_image(path / "3", shape=(6, 20, 20), ngff="0.4")  # a bad series is found by the full check only
    open_dataset(path, check=False)
    _raises(path, "input series 3 has shape")
