"""A run that finds its output locked by another live run (``tasks.lock.RunLock``): fail, or end Completed.

Two runs never write one output at once: the second one cannot take the lock. What that means depends on
who started the second one:

* an on-demand run, or ``dogflow run``, fails at once with one line naming the holder (someone asked for
  this run now and must hear that it did not happen);
* a run of a deployment that carries the tag :data:`COMPLETE_WHEN_LOCKED` (prefect.yaml gives it to
  ``nightly``), however it was started (schedule, UI, ``prefect deployment run``), ends **Completed** with
  a message naming the holder: meeting an on-demand run on the same output is a normal event for a nightly
  run, not a red Failed run, and the next night picks up whatever is left. The state is Prefect's standard
  ``Completed`` (a custom name such as "Skipped" would drop out of the UI's default filters).

The holder's run is not touched either way: the lock file is only read.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Iterable, Optional

COMPLETE_WHEN_LOCKED = "on-locked:complete"


class OnLocked(enum.Enum):
    FAIL = "fail"
    COMPLETE = "complete"


def policy(tags: Optional[Iterable[str]] = None) -> OnLocked:
    """The policy of the current flow run (its tags: the deployment's), or of ``tags`` when given."""
    if tags is None:
        from prefect.runtime import flow_run

        tags = flow_run.get_tags() or []
    return OnLocked.COMPLETE if COMPLETE_WHEN_LOCKED in set(tags) else OnLocked.FAIL


def holder(output_path: str) -> Optional[dict[str, Any]]:
    """The lock record of the run holding ``output_path`` (host, pid, run id and name, start time), or None."""
    from tasks.lock import RunLock

    return RunLock(output_path).owner()


def describe(owner: Optional[dict[str, Any]]) -> str:
    """The holder in words (:func:`tasks.lock.describe_owner`)."""
    from tasks.lock import describe_owner

    return describe_owner(owner)


def completed_when_locked(output_path: str, logger: logging.Logger):
    """The Completed state a run with policy COMPLETE returns when the lock was refused (None with FAIL)."""
    if policy() is not OnLocked.COMPLETE:
        return None
    from prefect.states import Completed

    msg = f"output {output_path} is being written by {describe(holder(output_path))}; nothing done, the next run " \
          "picks up what is left"
    logger.warning(msg)
    return Completed(message=msg)
