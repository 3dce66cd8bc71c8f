"""The dog-filter flow on a LocalCluster through DaskTaskRunner, against a real (test) Prefect API."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import assert_output_exact, reference_dog, run_in_thread, wait_for_task_run_state
from tasks.lock import LOCK_KEY
from tasks.output import Output

SS, SL = [1.0, 1.5, 1.5], [2.0, 4.0, 3.0]


def _run(sample, out, **kw):
    from flows.dog_filter import dog_filter

    args = dict(input_path=str(sample), output_path=str(out), channels=1, sigma_small=SS, sigma_large=SL,
                retries=0, retry_delay_seconds=0)
    args.update(kw)
    return dog_filter(**args, return_state=True)


def _chunk_file(sample, position, channel=1):
    arr = zarr.open_array(str(sample), mode="r")
    return Path(sample) / arr.metadata.encode_chunk_key((position, channel, 0, 0, 0))


def test_every_position_exact_including_last(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    state = _run(sample, out)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["processed"] == 3 and summary["skipped"] == 0 and summary["failed"] == []
    res = Output(out).level(2)
    assert res.shape == (2, 12, 40, 36) and res.dtype == np.float32  # (C, Z, Y, X): the input's channels
    assert_output_exact(out, sample, SS, SL, channel=1)  # every position, the last one (2) included
    assert [Output(out).markers.read(p, 1)["position"] for p in range(3)] == [0, 1, 2]
    # every position was filtered in a Dask worker process, not in the flow's own process
    assert all(Output(out).markers.read(p, 1)["pid"] not in (os.getpid(), None) for p in range(3))
    assert Output(out).markers.marked() == [(0, 1), (1, 1), (2, 1)]  # channel 0 was not selected: not computed
    assert not np.any(res[0])
    # NGFF 0.5 metadata and provenance
    g = zarr.open_group(str(out), mode="r")
    ome = g.attrs["ome"]
    assert ome["version"] == "0.5" and len(ome["multiscales"]) == 3
    assert [a["name"] for a in ome["multiscales"][2]["axes"]] == ["c", "z", "y", "x"]
    prov = g.attrs["dogflow"]
    assert prov["channels"] == [1] and prov["params"]["sigma_large"] == SL and prov["layout_version"] == 3
    assert prov["params"]["input_path"] == str(sample) and prov["version"]
    assert res.chunks[0] == 1


def test_rerun_skips_completed_work(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    assert _run(sample, out).is_completed()
    before = {p: Output(out).markers.read(p, 1)["finished"] for p in range(3)}
    state = _run(sample, out)
    summary = state.result()
    assert summary["processed"] == 0 and summary["skipped"] == 3
    assert {p: Output(out).markers.read(p, 1)["finished"] for p in range(3)} == before
    # only the two paths (a nightly deployment's parameters): sigma and channel as the output was made
    from flows.dog_filter import dog_filter

    summary = dog_filter(input_path=str(sample), output_path=str(out), return_state=True).result()
    assert summary["processed"] == 0 and summary["skipped"] == 3 and summary["selected"] == 3
    # force recomputes all of them
    summary = _run(sample, out, force=True).result()
    assert summary["processed"] == 3


def test_subset_and_uint16_policy(prefect_api, sample, tmp_path):
    out = tmp_path / "u16.zarr"
    state = _run(sample, out, positions="0,2", output_dtype="uint16")
    assert state.is_completed()
    src = zarr.open_array(str(sample), mode="r")
    for p in (0, 2):
        res = Output(out).read(p, 1)
        assert res.dtype == np.uint16
        ref = reference_dog(src[p, 1], SS, SL)
        assert ref.min() < -1, "the test needs negative DoG values"
        expected = np.clip(np.rint(ref), 0, 65535)
        assert np.abs(res.astype(np.float64) - expected).max() <= 1  # rounding ties of float32 vs float64
        assert res[ref < -1].max() == 0  # negatives clip to 0, they never wrap to ~65535
    assert Output(out).markers.read(1, 1) is None
    assert not np.any(Output(out).read(1, 1))


def test_changed_parameters_refused_unless_overwrite(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    assert _run(sample, out, positions="0").is_completed()
    before = Output(out).read(0, 1)
    state = _run(sample, out, sigma_large=[2.0, 5.0, 5.0])
    assert state.is_failed()
    assert "other parameters" in str(state.result(raise_on_failure=False))
    np.testing.assert_array_equal(Output(out).read(0, 1), before)
    assert Output(out).markers.read(0, 1) is not None
    state = _run(sample, out, sigma_large=[2.0, 5.0, 5.0], overwrite=True)
    assert state.is_completed() and state.result()["processed"] == 3
    assert_output_exact(out, sample, SS, [2.0, 5.0, 5.0], channel=1, positions=[0])


def test_complete_position_survives_failure_of_another(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    chunk = _chunk_file(sample, 1)
    good = chunk.read_bytes()
    chunk.write_bytes(b"\x00garbage" * 7)  # a corrupt chunk: position 1 cannot be decoded
    state = _run(sample, out)
    assert state.is_failed()
    assert "1 position(s) failed: 1" in str(state.result(raise_on_failure=False))
    assert_output_exact(out, sample, SS, SL, channel=1, positions=[0, 2])
    assert Output(out).markers.read(1, 1) is None
    assert not (Path(out) / LOCK_KEY).exists()
    chunk.write_bytes(good)  # repair: only position 1 is recomputed
    summary = _run(sample, out).result()
    assert summary["processed"] == 1 and summary["skipped"] == 2
    assert [r["position"] for r in summary["positions"]] == [1]
    assert_output_exact(out, sample, SS, SL, channel=1)


def test_task_failing_once_is_retried(prefect_api, sample, tmp_path):
    """A real transient fault: the chunk is missing on the first attempt (a copy still running) and arrives during
    the retry delay. (A corrupt chunk is permanent and not retried: tests/test_errors.py.)"""
    out = tmp_path / "out.zarr"
    chunk = _chunk_file(sample, 2)
    good = chunk.read_bytes()
    chunk.unlink()
    t, result = run_in_thread(lambda: _run(sample, out, positions=[2], retries=2, retry_delay_seconds=6))
    seen_retry = wait_for_task_run_state("position-2", ("AwaitingRetry", "Retrying"))
    chunk.write_bytes(good)
    t.join(180)
    assert seen_retry, "the first attempt should have failed and been scheduled for retry"
    state = result["value"]
    assert state.is_completed(), state
    assert_output_exact(out, sample, SS, SL, channel=1, positions=[2])


def test_ome_group_and_zarr_v2_inputs(prefect_api, tmp_path):
    from flows.sample import make_sample

    v2 = tmp_path / "v2.zarr"
    make_sample(v2, positions=2, channels=1, shape=(6, 20, 18), chunks=(3, 10, 9), blobs=5, zarr_format=2)
    grp = tmp_path / "ome.zarr"
    g = zarr.open_group(str(grp), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    make_sample(grp / "0", positions=2, channels=1, shape=(6, 20, 18), blobs=5, seed=3)
    from flows.dog_filter import dog_filter

    for src in (v2, grp):
        out = tmp_path / f"{src.stem}-out.zarr"
        state = dog_filter(input_path=str(src), output_path=str(out), channels=0, sigma_small=1.0, sigma_large=2.5,
                           return_state=True)
        assert state.is_completed(), state
        assert_output_exact(out, src, 1.0, 2.5)


def test_input_growing_along_positions_grows_output(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    assert _run(sample, out).is_completed()
    arr = zarr.open_array(str(sample), mode="r+")
    arr.resize((4, *arr.shape[1:]))
    rng = np.random.default_rng(5)
    arr[3] = rng.integers(0, 1000, size=arr.shape[1:], dtype=np.uint16)
    summary = _run(sample, out).result()
    assert summary["processed"] == 1 and summary["skipped"] == 3
    assert Output(out).provenance()["shape"][0] == 4 and Output(out).level(3).shape == (2, 12, 40, 36)
    assert_output_exact(out, sample, SS, SL, channel=1)


def test_flow_parameters_are_the_schema():
    """The flow's parameters (the UI form, `prefect deployment run --params`) and RunRequest are flows.params.PARAMS:
    same names, same order, same defaults; the docstring has one line per parameter."""
    import dataclasses
    import inspect

    from flows import params
    from flows.dog_filter import dog_filter
    from flows.request import RunRequest

    expected = [(p.name, p.default) for p in params.PARAMS]
    assert [(p.name, p.default) for p in inspect.signature(dog_filter.fn).parameters.values()] == expected
    assert [(f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(RunRequest)] == expected
    schema = dog_filter.parameters.model_dump()["properties"]
    assert list(schema) == [p.name for p in params.PARAMS]
    assert all(schema[p.name]["description"] == p.doc() for p in params.PARAMS)


def test_address_profile_joins_a_tls_scheduler(prefect_api, sample, tmp_path):
    """A running scheduler that speaks TLS only: the address profile carries the client's certificate files in
    its dask_config (Dask's own keys), the run is exact, and a client without them is refused."""
    import copy

    import dask
    import yaml
    from distributed import Client, LocalCluster

    from flows.clusters import tls

    certs = tls.create(tmp_path / "tls")
    saved = copy.deepcopy(dask.config.config)  # the run sets the profile's dask_config process-wide
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls",
                          security=tls.security(certs), dashboard_address=":0") as cluster:
            addr = cluster.scheduler_address
            assert addr.startswith("tls://")
            with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
                Client(addr, timeout=5)  # no certificate: refused
            profile = tmp_path / "join.yaml"
            profile.write_text(yaml.safe_dump({"cluster_type": "address", "address": addr, "dask_config": {
                "distributed.comm.tls.ca-file": str(certs / tls.CERT),
                "distributed.comm.tls.client.cert": str(certs / tls.CERT),
                "distributed.comm.tls.client.key": str(certs / tls.KEY)}}))
            out = tmp_path / "out.zarr"
            state = _run(sample, out, cluster_file=str(profile))
            assert state.is_completed(), state
            assert_output_exact(out, sample, SS, SL, channel=1)
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)


def test_a_cli_run_validates_once_and_the_flow_alone_validates_itself(prefect_api, sample, tmp_path, monkeypatch):
    """flows.run.execute (what `dogflow run` calls) validates, holds the lock and hands both to the flow it runs
    in this process (flows.run.HANDOVER): one validation. The flow called on its own (a deployment) validates."""
    from flows import run
    from flows.dog_filter import dog_filter
    from flows.request import RunRequest

    calls = []
    validate = RunRequest.validate
    monkeypatch.setattr(RunRequest, "validate", lambda self, *a, **kw: calls.append(1) or validate(self, *a, **kw))
    out = tmp_path / "out.zarr"
    request = RunRequest(str(sample), str(out), channels=1, sigma_small=SS, sigma_large=SL, retries=0,
                         retry_delay_seconds=0)
    summary = run.execute(request, temporary_api=None)  # the session's API is configured: the flow runs
    assert summary["processed"] == 3 and calls == [1]
    assert run.claim(request) is None and not (out / LOCK_KEY).exists()
    assert dog_filter(**request.parameters(), return_state=True).result()["skipped"] == 3
    assert calls == [1, 1]
    assert_output_exact(out, sample, SS, SL, channel=1)
