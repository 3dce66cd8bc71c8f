"""Classified retries (tasks/errors.py): permanent failures fail the position at once and name the cause;
transient ones are retried. The classification is checked on exceptions made by real system calls and
real readers where this machine can make them, and the flow end to end on a real full file system."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import _in_flow_run, assert_output_exact
from prefect_services import require
from tasks import errors
from tasks.output import Output
from tasks.errors import Kind, classify


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the exception is the object under test
        return exc
    raise AssertionError("nothing was raised")


def test_enospc_from_a_real_write_is_permanent():
    def write_full():
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x" * 4096)

    exc = _raised(write_full)
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    v = classify(exc)
    assert v.kind is Kind.PERMANENT and v.cause == "ENOSPC (no space left on device)"
    line = errors.failure_line(exc, "OSError: [Errno 28] No space left on device")
    assert line.startswith("permanent failure, not retried: ENOSPC (no space left on device): OSError")


@pytest.mark.parametrize("code, kind", [
    (errno.ENOSPC, Kind.PERMANENT), (errno.EDQUOT, Kind.PERMANENT), (errno.EROFS, Kind.PERMANENT),
    (errno.EACCES, Kind.PERMANENT), (errno.EIO, Kind.TRANSIENT), (errno.ESTALE, Kind.TRANSIENT),
    (errno.ETIMEDOUT, Kind.TRANSIENT), (errno.ECONNRESET, Kind.TRANSIENT),
])
def test_errno_classes(code, kind, tmp_path):
    exc = OSError(code, os.strerror(code), str(tmp_path / "out.zarr" / "0" / "0" / "c" / "0"))
    v = classify(exc)
    assert v.kind is kind and v.cause.startswith(errno.errorcode[code])
    assert v.retry is (kind is Kind.TRANSIENT)


def test_the_chain_of_causes_decides():
    def wrapped(inner):
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("while writing level 0") from e

    assert classify(_raised(lambda: wrapped(OSError(errno.ENOSPC, "full")))).kind is Kind.PERMANENT
    # a ValueError raised while handling an EIO: the specific cause (EIO) wins over the general rule
    def value_error_during_eio():
        try:
            raise OSError(errno.EIO, "I/O error")
        except OSError:
            raise ValueError("bad data")

    assert classify(_raised(value_error_during_eio)).kind is Kind.TRANSIENT
    assert classify(ValueError("sigma_large must be larger")).kind is Kind.PERMANENT
    assert classify(TimeoutError("read timed out")).kind is Kind.TRANSIENT
    assert classify(KeyError("something odd")).cause == "unclassified KeyError"
    assert classify(KeyError("something odd")).retry


def test_lost_connections_and_s3_answers():
    from botocore.exceptions import ClientError, ReadTimeoutError
    from distributed.comm.core import CommClosedError

    assert classify(CommClosedError("in <TCP ...>: Stream is closed")).kind is Kind.TRANSIENT
    assert classify(ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b")).kind is Kind.TRANSIENT

    def s3(status, code):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert classify(s3(503, "SlowDown")).kind is Kind.TRANSIENT
    assert classify(s3(500, "InternalError")).cause == "S3 InternalError (HTTP 500)"
    assert classify(s3(400, "Throttling")).kind is Kind.TRANSIENT
    assert classify(s3(404, "NoSuchKey")).cause == "unclassified ClientError"


def test_real_corrupt_chunk_is_permanent_and_a_missing_one_transient(tmp_path):
    from flows.sample import make_sample
    from tasks.inputs import open_dataset
    from tasks.position import read_volume

    inp = tmp_path / "in.zarr"
    arr = make_sample(inp, positions=2, channels=1, shape=(8, 32, 32), chunks=(4, 16, 16), blobs=4)
    (inp / arr.metadata.encode_chunk_key((0, 0, 1, 0, 1))).write_bytes(b"\xff" * 40)
    (inp / arr.metadata.encode_chunk_key((1, 0, 0, 1, 0))).unlink()
    ds = open_dataset(str(inp))
    corrupt = _raised(lambda: read_volume(ds, 0, 0, allow_missing_chunks=False))
    missing = _raised(lambda: read_volume(ds, 1, 0, allow_missing_chunks=False))
    assert type(corrupt).__name__ == "InputChunkError" and "cannot be read" in str(corrupt)
    assert classify(corrupt).kind is Kind.PERMANENT and classify(corrupt).cause == "corrupt input chunk"
    assert "is missing" in str(missing) and classify(missing).kind is Kind.TRANSIENT


# --------------------------------------------------------------------------- end to end: a full disk


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 512 KiB tmpfs (needs root and mount; CI runs as root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int = 16384) -> None:
    """Fill the file system of ``folder`` until writes fail with ENOSPC, then free ``leave`` bytes."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_full_disk_fails_the_position_at_once_naming_enospc(prefect_api, tiny_fs, tmp_path):
    from flows.dog_filter import dog_filter
    from flows.sample import make_sample
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    inp = tmp_path / "in.zarr"
    make_sample(inp, positions=2, channels=1, shape=(8, 64, 64), chunks=(8, 64, 64), blobs=5)
    out = tiny_fs / "out.zarr"
    args = dict(input_path=str(inp), output_path=str(out), sigma_small=1.0, sigma_large=2.0)
    assert dog_filter(**args, positions="0", retries=0, retry_delay_seconds=0, return_state=True).is_completed()
    _fill(tiny_fs)
    t0 = time.monotonic()
    state = dog_filter(**args, positions="1", retries=2, retry_delay_seconds=60, return_state=True)
    elapsed = time.monotonic() - t0
    assert state.is_failed(), state
    assert elapsed < 60, f"a permanent failure waited for a retry ({elapsed:.0f} s)"
    message = str(state.result(raise_on_failure=False))
    assert "1 position(s) failed: 1" in message
    with get_client(sync_client=True) as c:
        flt = TaskRunFilter(name=TaskRunFilterName(any_=["position-1"]),
                            flow_run_id=_in_flow_run(c, state.state_details.flow_run_id))
        [run] = c.read_task_runs(task_run_filter=flt)
        history = [s.name for s in c.read_task_run_states(run.id)]
    assert run.state.is_failed() and run.run_count == 1, (run.run_count, history)
    assert "AwaitingRetry" not in history and "Retrying" not in history, history
    assert _summary_mentions("permanent failure, not retried: ENOSPC (no space left on device)")
    assert Output(out).markers.read(1, 0) is None and Output(out).markers.read(0, 0) is not None
    assert_output_exact(out, inp, 1.0, 2.0, positions=[0])


def _summary_mentions(text: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as pc:
        [art] = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dog-filter-summary"])),
                                  sort=ArtifactSort.CREATED_DESC, limit=1)
    return text in str(art.data)

