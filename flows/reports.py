"""What a run shows about itself: Prefect artifacts (progress, per-position summary table, MIP preview)
and the progress of this process's run for a terminal progress bar.

Artifacts
    ``dog-filter-progress``  progress artifact, updated as positions finish
    ``dog-filter-summary``   markdown table: position, channels, status, seconds, host, SLURM job, min/max/mean
    ``dog-filter-preview``   markdown with the input MIP next to the DoG MIP (PNG as a data URI)

Progress listeners
    :func:`listening` registers a callable ``(done, total)`` that :class:`Progress` calls as positions
    finish in this process (the CLI draws its progress bar from it: no polling of the output).
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any, Callable, Iterator, Sequence

from tasks.filters import kind_named
from tasks.output import Output
from tasks.position import PositionResult

_LISTENERS: list[Callable[[int, int], None]] = []


@contextlib.contextmanager
def listening(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``callback(done, total)`` whenever a position of a run in this process finishes."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def announce(done: int, total: int) -> None:
    for callback in list(_LISTENERS):
        callback(done, total)


class Progress:
    """The ``dog-filter-progress`` artifact plus this process's listeners. ``total`` counts the selected
    positions; those already complete count as done from the start."""

    def __init__(self, total: int, already_done: int, to_do: int):
        from prefect.artifacts import create_progress_artifact

        self.total, self.already_done, self.to_do, self.finished = total, already_done, to_do, 0
        self.artifact = create_progress_artifact(
            progress=self._percent(), key="dog-filter-progress", description=f"{to_do} of {total} positions to filter"
        )
        announce(self.already_done, self.total)

    def _percent(self) -> float:
        return 100.0 * self.finished / self.to_do if self.to_do else 100.0

    def step(self) -> None:
        from prefect.artifacts import update_progress_artifact

        self.finished += 1
        update_progress_artifact(self.artifact, progress=self._percent())
        announce(self.already_done + self.finished, self.total)


def preview_artifact(output_path: str, position: int, channel: int, kind: str) -> None:
    """A markdown artifact embedding the preview PNG that the task wrote (input MIP | filtered MIP)."""
    from prefect.artifacts import create_markdown_artifact

    out = Output(output_path)
    png = out.read_preview(position, channel)
    if png is None:
        return
    data = base64.b64encode(png).decode()
    create_markdown_artifact(
        key="dog-filter-preview",
        markdown=(
            f"# Position {position}, channel {channel}: max-intensity projection along z\n\n"
            f"Left: input. Right: {kind_named(kind).label}. File: `{out.path}/{out.preview_key(position, channel)}`\n\n"
            f"![position {position} preview](data:image/png;base64,{data})"
        ),
        description=f"MIP preview of position {position}",
    )


def summary_markdown(input_path: str, output_path: str, skipped: int, rows: list[PositionResult],
                     lost_workers: Sequence[dict[str, Any]] = ()) -> str:
    done = sum(r.completed for r in rows)
    failed = [r for r in rows if not r.completed]
    lines = [
        "# dog-filter summary",
        "",
        f"- input: `{input_path}`",
        f"- output: `{output_path}`",
        f"- processed: **{done}**, skipped (complete and unchanged): **{skipped}**, failed: **{len(failed)}**",
        *[f"- lost worker job (replaced): {lost_line(j)}" for j in lost_workers],
        "",
        "| position | channels | status | seconds | host | SLURM job | min | max | mean |",
        "|---:|---|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r.completed:
            lines.append(
                f"| {r.position} | {','.join(map(str, r.channels))} | completed | {r.seconds:.1f} | {r.host} | {r.slurm_job_id or '-'} "
                f"| {r.min:.4g} | {r.max:.4g} | {r.mean:.4g} |"
            )
        else:
            lines.append(f"| {r.position} | | **failed**: {r.error} | | | | | | |")
    return "\n".join(lines)


def lost_line(job: dict[str, Any]) -> str:
    """One lost worker job (a ``flows.clusters.keeper.LostJob`` as a dict), in words."""
    from flows.clusters.keeper import LostJob

    return LostJob(**job).describe()


def publish_summary(input_path: str, output_path: str, skipped: int, rows: list[PositionResult], kind: str,
                    lost_workers: Sequence[dict[str, Any]] = ()) -> None:
    """The summary table artifact, and the preview of the middle completed position."""
    from prefect.artifacts import create_markdown_artifact

    done_rows = [r for r in rows if r.completed]
    if done_rows:
        middle = done_rows[len(done_rows) // 2]
        preview_artifact(output_path, middle.position, middle.channels[0], kind)
    create_markdown_artifact(
        markdown=summary_markdown(input_path, output_path, skipped, rows, lost_workers),
        key="dog-filter-summary",
        description="dog-filter: per-position results",
    )
