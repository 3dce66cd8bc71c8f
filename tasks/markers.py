"""Completion markers and the status of an output's (position, channel) pairs.

A (position, channel) is *complete* when its marker exists, parses, and records the same input fingerprint,
parameter digest and dogflow version that the current run expects. Each marker is one object that only its
task writes, replaced atomically (:meth:`tasks.storage.Storage.write_atomic`), and only after every level of
that channel has been written. Group attributes (last writer wins) and chunk existence (empty chunks are
never written) are never used as markers.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as _pkg_version
from typing import TYPE_CHECKING, Any, Iterable

from tasks.filters import FilterParams
from tasks.storage import Storage

if TYPE_CHECKING:  # pragma: no cover
    from tasks.inputs import Dataset

MARKER_PREFIX = "dogflow/positions"


def dogflow_version() -> str:
    try:
        return _pkg_version("dogflow")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "0+unknown"


class MarkerState(str, enum.Enum):
    """Where one (position, channel) of an output stands."""

    COMPLETE = "complete"
    MISSING = "missing"
    STALE = "stale"  # marked, but for another input, other parameters or another dogflow version

    def __str__(self) -> str:
        return self.value


_STALE_REASONS = {"input_fingerprint": "input changed", "params_digest": "parameters changed",
                  "version": "dogflow version changed"}


def expected_key(params: FilterParams, fingerprint: str) -> dict[str, str]:
    """What a marker must record to count as complete for this run."""
    return {"input_fingerprint": fingerprint, "params_digest": params.digest(), "version": dogflow_version()}


def marker_record(params: FilterParams, fingerprint: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The JSON a completion marker holds: what it is complete for, the task's summary, the parameters."""
    return {**expected_key(params, fingerprint), **summary, "params": params.as_dict(), "finished": time.time()}


def judge(marker: dict[str, Any] | None, expected: dict[str, str]) -> tuple[MarkerState, str]:
    """The state of a marker against what the run expects, and why it is stale ("" otherwise)."""
    if marker is None:
        return MarkerState.MISSING, ""
    differs = [k for k, v in expected.items() if marker.get(k) != v]
    if not differs:
        return MarkerState.COMPLETE, ""
    return MarkerState.STALE, ", ".join(_STALE_REASONS[k] for k in differs)


@dataclass(frozen=True)
class MarkerRow:
    """The state of one (position, channel) of an output."""

    position: int
    channel: int
    state: MarkerState
    marker: dict[str, Any] | None
    reason: str = ""  # why stale; "" otherwise


class Markers:
    """The completion markers of one output store."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def key(position: int, channel: int) -> str:
        return f"{MARKER_PREFIX}/{int(position):06d}/c{int(channel):04d}.json"

    def read(self, position: int, channel: int) -> dict[str, Any] | None:
        data = self.storage.read_bytes(self.key(position, channel))
        try:
            return json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write(self, position: int, channel: int, record: dict[str, Any]) -> None:
        """Mark (position, channel) complete. Call only after every level of it is written."""
        self.storage.write_atomic(self.key(position, channel), json.dumps(record, sort_keys=True))

    def clear(self, position: int, channel: int) -> None:
        self.storage.delete(self.key(position, channel))

    def clear_all(self) -> None:
        """Remove every marker (layout 1's per-position objects too)."""
        for name in self.storage.list(MARKER_PREFIX):
            self.storage.delete_tree(f"{MARKER_PREFIX}/{name}")

    def marked(self) -> list[tuple[int, int]]:
        """Every (position, channel) that has a marker, sorted."""
        found = []
        for pos in self.storage.list(MARKER_PREFIX):
            if not pos.isdigit():
                continue
            for name in self.storage.list(f"{MARKER_PREFIX}/{pos}"):
                if name.startswith("c") and name.endswith(".json") and name[1:-5].isdigit():
                    found.append((int(pos), int(name[1:-5])))
        return sorted(found)

    def scan(self, ds: "Dataset | None", params: FilterParams, positions: Iterable[int],
             channels: Iterable[int]) -> list[MarkerRow]:
        """State of every (position, channel), comparing markers with the current input.

        Without an input (``ds`` None) only the markers are read: marked counts as complete.
        """
        rows = []
        chans = list(channels)
        for p in positions:
            for c in chans:
                marker = self.read(p, c)
                if ds is None or p >= ds.n_positions:
                    rows.append(MarkerRow(p, c, MarkerState.COMPLETE if marker else MarkerState.MISSING, marker))
                    continue
                state, reason = judge(marker, expected_key(params, ds.fingerprint(p, c)))
                rows.append(MarkerRow(p, c, state, marker, reason))
        return rows


@dataclass(frozen=True)
class OutputStatus:
    """What ``dogflow status`` shows: the output's provenance and one row per (position, channel)."""

    path: str
    provenance: dict[str, Any]
    params: FilterParams
    rows: list[MarkerRow]
    input_problem: str | None  # why staleness could not be checked, or None

    def counts(self) -> dict[str, int]:
        """How many pairs are in each state, by the state's name."""
        c = {s.value: 0 for s in MarkerState}
        for r in self.rows:
            c[r.state.value] += 1
        return c
