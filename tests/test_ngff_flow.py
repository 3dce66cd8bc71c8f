"""End to end through the dog-filter flow (real LocalCluster, real Prefect API): every input layout, several
channels, σ in µm, the pyramid, readers on the flow's own output, and the old layout refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from conftest import assert_exact, run_cli
from datasets import make_bioformats2raw, make_ome_image
from flows.sample import make_sample
from tasks import pyramid
from tasks.output import Output
from tasks.inputs import open_dataset
from test_readers import check_with_readers

SHAPE = (6, 24, 22)
CHUNKS = (3, 12, 11)
SS, SL = [1.0, 1.5, 1.5], [2.0, 3.0, 3.0]


def _flow(inp, out, **kw):
    from flows.dog_filter import dog_filter

    args = dict(input_path=str(inp), output_path=str(out), sigma_small=SS, sigma_large=SL, retries=0,
                retry_delay_seconds=0)
    args.update(kw)
    return dog_filter(**args, return_state=True)


def assert_channels_exact(out, inp, channels, sigma_small=SS, sigma_large=SL):
    """Every position of ``out``: the selected channels are marked and exact, the others unwritten and unmarked."""
    ds = open_dataset(inp)
    for p in range(ds.n_positions):
        level0 = Output(out).level(p)
        for c in range(ds.n_channels):
            if c in channels:
                assert Output(out).markers.read(p, c) is not None, (p, c)
                assert_exact(level0[c], ds.read(p, c), sigma_small, sigma_large)
            else:
                assert Output(out).markers.read(p, c) is None, (p, c)
                assert not np.any(level0[c])


def _plain(path):
    make_sample(path, positions=2, channels=2, shape=SHAPE, chunks=CHUNKS, blobs=4, zarr_format=2)


LAYOUTS = {
    "plain-v2-with-voxel-size": (_plain, dict(voxel_size="2,0.406,0.406")),
    "ome-zarr-0.5": (lambda p: make_ome_image(p, channels=2, shape=SHAPE, chunks=CHUNKS), {}),
    "ome-zarr-0.4": (lambda p: make_ome_image(p, channels=2, shape=SHAPE, ngff="0.4", chunks=CHUNKS), {}),
    "bioformats2raw-0.4": (lambda p: make_bioformats2raw(p, positions=2, shape=SHAPE, chunks=CHUNKS), {}),
    "bioformats2raw-0.5": (lambda p: make_bioformats2raw(p, positions=2, shape=SHAPE, ngff="0.5", chunks=CHUNKS,
                                                         series_list=False), {}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_input_layout_end_to_end(prefect_api, tmp_path, name):
    make, extra = LAYOUTS[name]
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    make(inp)
    state = _flow(inp, out, channels="all", **extra)
    assert state.is_completed(), state
    ds = open_dataset(inp)
    assert state.result()["processed"] == ds.n_positions
    assert_channels_exact(out, inp, channels=range(ds.n_channels))
    prov = Output(out).provenance()
    assert prov["voxel_size"] == [2.0, 0.406, 0.406] and prov["unit"] == "micrometer"
    assert prov["input"]["layout"] == ds.layout


def test_dogflow_output_as_input_sigma_in_um_and_channels_added_later(prefect_api, tmp_path):
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=3, shape=SHAPE, chunks=CHUNKS)  # voxels (2, 0.406, 0.406) µm
    first = tmp_path / "first.zarr"
    # σ in µm: 2 µm / 4 µm is (1, 4.926, 4.926) / (2, 9.852, 9.852) voxels
    um_small, um_large = [1.0, 2 / 0.406, 2 / 0.406], [2.0, 4 / 0.406, 4 / 0.406]
    assert _flow(inp, first, channels="0", sigma_small="2um", sigma_large="4 µm").is_completed()
    assert_channels_exact(first, inp, [0], um_small, um_large)
    prov = Output(first).provenance()
    assert prov["params"]["sigma_small"] == pytest.approx(um_small)
    assert prov["params"]["sigma_small_um"] == pytest.approx([2.0, 2.0, 2.0])
    before = Output(first).markers.read(1, 0)["finished"]
    # adding channel 2 computes only channel 2
    state = _flow(inp, first, channels=[0, 2], sigma_small="2um", sigma_large="4 µm")
    assert state.is_completed(), state
    assert state.result()["processed"] == 2 and Output(first).markers.read(1, 0)["finished"] == before
    assert all(r["channels"] == [2] for r in state.result()["positions"])
    assert_channels_exact(first, inp, [0, 2], um_small, um_large)
    # dogflow's own output is an input too (its channels are the channels)
    second = tmp_path / "second.zarr"
    assert _flow(first, second, channels=2).is_completed()
    for p in range(2):
        assert_exact(Output(second).read(p, 2), Output(first).read(p, 2), SS, SL)
    assert Output(second).provenance()["input"]["layout"] == "dogflow"


def test_pyramid_levels_and_readers_on_the_flow_output(prefect_api, tmp_path):
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    make_ome_image(inp, channels=1, shape=(2, 1100, 20), chunks=(2, 550, 20))  # plane > 1024: two levels
    assert _flow(inp, out, output_dtype="float32").is_completed()
    assert Output(out).n_levels(0) == 2
    level0, level1 = Output(out).read(0, 0), Output(out).read(0, 0, level=1)
    np.testing.assert_allclose(level1, pyramid.downsample_mean(level0), rtol=1e-6, atol=1e-5)
    check_with_readers(out, 1, 1, [(2, 1100, 20), (2, 550, 10)], (2.0, 0.406, 0.406), lambda p, c: level0)


def test_old_layout_is_refused_then_recomputed_with_overwrite(prefect_api, tmp_path):
    inp, out = tmp_path / "in.zarr", tmp_path / "old.zarr"
    make_sample(inp, positions=1, channels=1, shape=SHAPE, blobs=4)
    g = zarr.open_group(str(out), mode="w")
    g.create_array("0", shape=(1, *SHAPE), chunks=(1, *SHAPE), dtype="float32")
    g.attrs["dogflow"] = {"layout_version": 1, "params": {}, "shape": [1, *SHAPE]}
    state = _flow(inp, out)
    assert state.is_failed() and "old layout 1" in str(state.result(raise_on_failure=False))
    assert _flow(inp, out, overwrite=True).is_completed()
    assert_channels_exact(out, inp, [0])


def test_cli_channels_voxel_size_units_and_status(tmp_path):
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    make_sample(inp, positions=2, channels=3, shape=SHAPE, chunks=CHUNKS, blobs=4)
    res = run_cli("run", inp, out, "--channels", "0,2", "--voxel-size", "2,0.5,0.5", "--sigma-small", "1um",
                  "--sigma-large", "2,3,3um", "--retry-delay", "0", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_channels_exact(out, inp, [0, 2], [0.5, 2.0, 2.0], [1.0, 6.0, 6.0])
    st = run_cli("status", out)
    assert st.returncode == 0, st.stderr
    assert "4 complete, 0 missing, 0 stale (of 4)" in st.stdout
    assert any(line.split()[:3] == ["1", "2", "complete"] for line in st.stdout.splitlines())
    bad = run_cli("run", tmp_path / "out.zarr", tmp_path / "again.zarr", "--voxel-size", "1,1,1")
    assert bad.returncode == 2 and "contradicts the input's metadata" in bad.stderr
