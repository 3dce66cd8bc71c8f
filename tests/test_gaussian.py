"""The second filter kind, ``gaussian``, end to end: the filter seam holds (parameters, engine call, labels,
digest), and an output of one kind is never resumed as the other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import reference_gaussian, run_cli, tolerance
from flows.request import ParameterError, RunRequest
from flows.sample import make_sample
from tasks import filters
from tasks.filters import DoG, FilterError, FilterParams, Gaussian
from tasks.inputs import open_dataset
from tasks.output import Output
from tasks.position import position_task


def test_kinds_own_parameters_digest_and_labels(tmp_path):
    dog = FilterParams("/in", DoG((1.0,) * 3, (2.0,) * 3), "float32")
    blur = FilterParams("/in", Gaussian((1.0,) * 3), "float32")
    assert dog.digest() != blur.digest()
    # the DoG's record has no "filter" key: its digest is what outputs made before the second kind recorded
    assert "filter" not in dog.as_dict() and blur.as_dict()["filter"] == "gaussian"
    assert FilterParams.from_dict(blur.as_dict()) == blur and FilterParams.from_dict(dog.as_dict()) == dog
    assert filters.channel_label("gaussian", 2) == "Gaussian of channel 2"
    assert filters.channel_label("dog", 0) == "DoG of channel 0"
    assert position_task("gaussian").name == "gaussian-position" and position_task().name == "dog-position"
    with pytest.raises(FilterError, match="sigma must be > 0 on every axis"):
        Gaussian((1.0, 0.0, 1.0)).check()
    with pytest.raises(FilterError, match="unknown filter 'log'"):
        filters.kind_named("log")
    assert DoG((21.27659574468085,) * 3, (85.1063829787234,) * 3).describe() == "σ 21.28 / 85.11"


def test_gaussian_request_needs_its_sigma(tmp_path):
    make_sample(tmp_path / "in.zarr", positions=1, channels=1, shape=(4, 16, 16), blobs=2)
    with pytest.raises(ParameterError, match="the gaussian filter needs --sigma "):
        RunRequest(str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), filter="gaussian").validate()
    with pytest.raises(ParameterError, match="unknown filter 'median'"):
        RunRequest(str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"), filter="median", sigma="1").validate()
    assert not (tmp_path / "o.zarr").exists()


def test_gaussian_through_dogflow_run_is_exact_and_not_resumed_as_a_dog(tmp_path):
    inp = tmp_path / "in.zarr"
    make_sample(inp, positions=2, channels=2, shape=(10, 32, 30), chunks=(4, 16, 16), blobs=6, seed=3)
    out = tmp_path / "blur.zarr"
    res = run_cli("run", inp, out, "--filter", "gaussian", "--sigma", "1,2.5,2.5", "--channels", "0,1",
                  "--retry-delay", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    src = open_dataset(inp)
    o = Output(out)
    for p in range(2):
        for c in range(2):
            assert o.markers.read(p, c) is not None
            ref = reference_gaussian(src.read(p, c), (1.0, 2.5, 2.5))
            assert float(np.max(np.abs(o.read(p, c).astype(np.float64) - ref))) <= tolerance(src.read(p, c))
    prov = o.provenance()
    assert prov["filter"] == "gaussian" and prov["params"]["sigma"] == [1.0, 2.5, 2.5]
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]
    assert [ch["label"] for ch in attrs["omero"]["channels"]] == ["Gaussian of channel 0", "Gaussian of channel 1"]
    assert attrs["multiscales"][0]["metadata"]["method"] == "dogflow.gaussian"
    st = run_cli("status", out)
    assert st.returncode == 0 and "filter: gaussian (σ 1,2.5,2.5 voxels)" in st.stdout, st.stdout
    # the same output with the DoG: refused in one line, nothing changed
    before = {pc: o.markers.read(*pc)["finished"] for pc in o.markers.marked()}
    again = run_cli("run", inp, out, "--sigma-small", "1", "--sigma-large", "2")
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "was made with other parameters (--filter gaussian --sigma 1,2.5,2.5" in lines[0]
    assert "given --sigma-small 1 --sigma-large 2" in lines[0] and "--overwrite discards its 4 computed" in lines[0]
    # --filter dog given: the same refusal; a plain rerun continues the Gaussian output as it was made
    assert run_cli("run", inp, out, "--filter", "dog").returncode == 2
    cont = run_cli("run", inp, out, "--no-progress")
    assert cont.returncode == 0 and "--filter gaussian --sigma 1,2.5,2.5" in cont.stderr + cont.stdout, cont.stderr
    assert {pc: o.markers.read(*pc)["finished"] for pc in o.markers.marked()} == before
