"""A run that finds its output locked by a live run (flows/collisions.py): Completed naming the holder when its
tags say so (the nightly deployment's ``on-locked:complete``), else Failed at once; the holder's lock is kept.
The deployment end to end (a real nightly run meeting a real on-demand run): tests/test_deployments.py."""

from __future__ import annotations

import os
import socket

from flows import collisions
from flows.collisions import COMPLETE_WHEN_LOCKED, OnLocked
from tasks.lock import RunLock
from tasks.output import Output


def test_policy_comes_from_the_tags():
    assert collisions.policy(["dogflow", "nightly", COMPLETE_WHEN_LOCKED]) is OnLocked.COMPLETE
    assert collisions.policy(["dogflow", "on-demand"]) is OnLocked.FAIL
    assert collisions.policy([]) is OnLocked.FAIL


def test_holder_is_described_from_the_real_lock(tmp_path):
    out = tmp_path / "out.zarr"
    with RunLock(out, run_id="1234-abcd", run_name="crimson-fox"):
        owner = collisions.holder(str(out))
        text = collisions.describe(owner)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert text.startswith(f"flow run 'crimson-fox' (1234-abcd) on host {socket.gethostname()}, pid {os.getpid()}, since ")
    assert text.endswith(" UTC")
    assert collisions.holder(str(out)) is None  # released
    assert "unreadable" in collisions.describe(None)


def _flow(inp, out, **kw):
    from flows.dog_filter import dog_filter

    return dog_filter(input_path=str(inp), output_path=str(out), sigma_small=1.0, sigma_large=2.0, retries=0,
                      retry_delay_seconds=0, return_state=True, **kw)


def test_locked_output_completes_with_the_tag_and_fails_without(prefect_api, tmp_path):
    from prefect import tags

    from flows.sample import make_sample

    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    make_sample(inp, positions=2, channels=1, shape=(8, 32, 32), blobs=4)
    assert _flow(inp, out, positions="0").is_completed()
    with RunLock(out, run_id="holder-id", run_name="the-holder") as lock:
        with tags("nightly", COMPLETE_WHEN_LOCKED):
            state = _flow(inp, out)
        assert state.is_completed() and state.name == "Completed", state
        assert "flow run 'the-holder' (holder-id) on host" in state.message, state.message
        failed = _flow(inp, out)
        assert failed.is_failed() and "another dogflow run is writing to this output" in failed.message, failed
        assert lock.owner()["run_id"] == "holder-id"  # the holder's lock is untouched
    assert Output(out).markers.read(1, 0) is None  # neither run wrote anything
    assert _flow(inp, out).result()["processed"] == 1
