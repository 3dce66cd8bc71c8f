"""Which failures of a position are worth a retry: Prefect's ``retry_condition_fn`` for the position task.

A retry repeats the whole position on the same worker after ``retry_delay_seconds``. That helps when the
cause may pass (a file server that hiccuped, a timeout, S3 throttling) and only wastes the delay when it
cannot (a full disk, a read-only mount, a chunk that does not decode). :func:`classify` decides, from the
exception and its chain of causes (``__cause__``, else ``__context__``), outermost first:

Permanent (the position fails at once, its error line names the cause)
    ``OSError`` with errno ENOSPC, EDQUOT, EROFS, EACCES, EPERM (no space, quota, read-only file system,
    permission denied: the output cannot be written until someone acts); an input chunk that exists but
    cannot be decoded (``tasks.position.InputChunkError`` raised from the decoder's error); bad parameters
    found only inside the task (``ValueError``, ``TypeError``, a ``ParameterError``).
Transient (retried, as every failure was before)
    ``OSError`` with errno EIO, ESTALE (network file systems), ETIMEDOUT, ECONNRESET, ECONNREFUSED,
    ECONNABORTED, EHOSTUNREACH, ENETUNREACH, EAGAIN, EBUSY, EINTR; ``TimeoutError``; a lost connection to
    a worker or the scheduler (distributed's ``CommClosedError``, ``StreamClosedError``); S3 answers with
    HTTP status 5xx or a throttling code (``SlowDown``, ``Throttling``, ...; botocore's ``ClientError``
    carries them in ``response``) and botocore's connection and read timeouts; an input chunk that is
    missing (``InputChunkError`` without a cause: the file may still be arriving, e.g. a copy in progress).
Anything else is unclassified and retried.

The first exception in the chain that a specific rule (an errno, a timeout, a lost connection, an S3
status) matches decides; only if none does, the general rules (undecodable chunk, bad parameters) apply.
So a ``ValueError`` raised while handling an EIO is transient, and an ``InputChunkError`` whose cause is
ESTALE is transient too.

A worker process that dies is not a Prefect failure at all: Dask reschedules the task
(``distributed.scheduler.allowed-failures``), see ``tasks.defaults``.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Any, Iterator, Optional

PERMANENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
TRANSIENT_ERRNOS = {
    errno.EIO: "I/O error",
    errno.ESTALE: "stale file handle",
    errno.ETIMEDOUT: "timed out",
    errno.ECONNRESET: "connection reset",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNABORTED: "connection aborted",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EAGAIN: "resource temporarily unavailable",
    errno.EBUSY: "device or resource busy",
    errno.EINTR: "interrupted system call",
}
# S3 error codes that mean "slow down, try again" (AWS, MinIO, Ceph)
S3_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                 "RequestThrottled", "ProvisionedThroughputExceededException", "ServiceUnavailable",
                 "InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
# exception class names of lost connections and timeouts (distributed, tornado, botocore, aiohttp)
TRANSIENT_NAMES = {"CommClosedError", "StreamClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                   "EndpointConnectionError", "ConnectionClosedError", "ServerDisconnectedError",
                   "ClientConnectorError", "ResponseStreamingError", "IncompleteReadError"}
PARAMETER_NAMES = {"ParameterError", "ProfileError"}


class Kind(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"


@dataclass(frozen=True)
class Verdict:
    """What :func:`classify` found: the kind, and the cause in a few words (e.g. "ENOSPC (no space left on device)")."""

    kind: Kind
    cause: str

    @property
    def retry(self) -> bool:
        return self.kind is Kind.TRANSIENT


def _chain(exc: BaseException, limit: int = 16) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < limit:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _s3_status(exc: BaseException) -> tuple[Optional[int], str]:
    """(HTTP status, error code) of a botocore-style ``ClientError`` (its ``response`` mapping), else (None, "")."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, ""
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    try:
        return (int(status) if status is not None else None), code
    except (TypeError, ValueError):
        return None, code


def _specific(exc: BaseException) -> Optional[Verdict]:
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return Verdict(Kind.PERMANENT, f"{_errno_name(exc.errno)} ({PERMANENT_ERRNOS[exc.errno]})")
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return Verdict(Kind.TRANSIENT, f"{_errno_name(exc.errno)} ({TRANSIENT_ERRNOS[exc.errno]})")
    status, code = _s3_status(exc)
    if code in S3_THROTTLING or (status is not None and (status >= 500 or status == 429)):
        return Verdict(Kind.TRANSIENT, f"S3 {code or 'error'} (HTTP {status or '?'})")
    if isinstance(exc, TimeoutError) or type(exc).__name__ in TRANSIENT_NAMES:
        return Verdict(Kind.TRANSIENT, f"{type(exc).__name__} (timeout or lost connection)")
    return None


def _general(exc: BaseException) -> Optional[Verdict]:
    name = type(exc).__name__
    if name == "InputChunkError":
        if exc.__cause__ is None:
            return Verdict(Kind.TRANSIENT, "missing input chunk (it may still be arriving)")
        return Verdict(Kind.PERMANENT, "corrupt input chunk")
    if name in PARAMETER_NAMES or isinstance(exc, (ValueError, TypeError)):
        return Verdict(Kind.PERMANENT, f"bad parameters or data ({name})")
    return None


def classify(exc: Optional[BaseException]) -> Verdict:
    """Permanent or transient, and why (see the module docstring for the rules)."""
    if exc is None:
        return Verdict(Kind.TRANSIENT, "unknown failure")
    chain = list(_chain(exc))
    for rule in (_specific, _general):
        for e in chain:
            verdict = rule(e)
            if verdict is not None:
                return verdict
    return Verdict(Kind.TRANSIENT, f"unclassified {type(exc).__name__}")


def exception_of(state: Any) -> Optional[BaseException]:
    """The exception a Failed Prefect state carries (in memory, or from its result), or None."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        res = state.result(raise_on_failure=False)
    except Exception as exc:  # a result that cannot be read is itself the best description
        return exc
    return res if isinstance(res, BaseException) else None


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn`` of the position task: retry transient failures only."""
    verdict = classify(exception_of(state))
    if not verdict.retry:
        try:
            from prefect.logging import get_run_logger

            get_run_logger().error("%s: permanent failure, %s: not retried", getattr(task_run, "name", "task"),
                                   verdict.cause)
        except Exception:  # logging must never decide the retry
            pass
    return verdict.retry


def failure_line(exc: Optional[BaseException], line: str) -> str:
    """A position's one-line error ``line``, with the cause named when the failure was permanent."""
    verdict = classify(exc)
    return line if verdict.retry else f"permanent failure, not retried: {verdict.cause}: {line}"
