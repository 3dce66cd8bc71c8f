"""Validation of a run's parameters: everything is checked here, before any output is
touched and before any job is submitted. Each failure is a :class:`ParameterError`
whose message is one line, meant to be shown as is.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tasks import dog
from tasks.store import OUTPUT_DTYPES, FilterParams, StoreError, check_output, open_input

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548...
SEED_SIGMA_SMALL = 50 / 2.35
SEED_SIGMA_LARGE = 200 / 2.35
# Failure budget of one position, stated once (see README "Retries"):
# - Prefect retries: an exception inside the task (I/O error, corrupt chunk) is retried
#   DEFAULT_RETRIES times, DEFAULT_RETRY_DELAY_SECONDS apart, on the same worker.
# - Dask rescheduling: if the worker process dies while running the task (OOM kill, node
#   failure, scancel, walltime), the scheduler re-runs the task on another worker, until it
#   has killed DEFAULT_ALLOWED_FAILURES + 1 workers; then the position fails for good.
# The worst case for one position is (DEFAULT_ALLOWED_FAILURES + 1) * (DEFAULT_RETRIES + 1) attempts.
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_SECONDS = 10.0
DEFAULT_ALLOWED_FAILURES = 2


class ParameterError(ValueError):
    """Bad input, phrased for the user on one line."""


def parse_sigma(value: Any, name: str = "sigma") -> tuple[float, float, float]:
    """``2.0``, ``"2.0"``, ``"1,3,3"`` or ``[1, 3, 3]`` -> (σz, σy, σx)."""
    if isinstance(value, str):
        parts = [s for s in re.split(r"[,\s]+", value.strip().strip("[]()")) if s]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise ParameterError(f"{name} must be a number or 3 numbers (z,y,x), got {value!r}")
    try:
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number or 3 numbers (z,y,x), got {value!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ParameterError(f"{name} needs 1 or 3 values (z,y,x), got {len(vals)}: {value!r}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ParameterError(f"{name} must be > 0 and finite on every axis, got {value!r}")
    return (vals[0], vals[1], vals[2])


def fwhm_to_sigma(value: Any, name: str = "fwhm") -> tuple[float, float, float]:
    """σ = FWHM / (2·sqrt(2·ln 2)) ≈ FWHM / 2.3548, per axis."""
    return tuple(v / FWHM_PER_SIGMA for v in parse_sigma(value, name))  # type: ignore[return-value]


def parse_positions(spec: Any, n_positions: int) -> list[int]:
    """``None`` -> every position (0..P-1, the last one included); ``"0-9,15"`` or a list -> those.

    Ranges are inclusive on both ends. Duplicates are removed; order is ascending.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all", "*")):
        return list(range(n_positions))
    out: set[int] = set()
    if isinstance(spec, int) and not isinstance(spec, bool):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ParameterError(f"positions must be a list or a range string like '0-9,15', got {spec!r}")
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"\d+\s*-\s*\d+", item):
            a, b = (int(s) for s in item.split("-"))
            if b < a:
                raise ParameterError(f"position range {item!r} is reversed")
            out.update(range(a, b + 1))
        else:
            try:
                out.add(int(str(item).strip()) if not isinstance(item, int) else item)
            except ValueError:
                raise ParameterError(f"bad position {item!r} in {spec!r} (use e.g. '0-9,15')") from None
    bad = sorted(p for p in out if p < 0 or p >= n_positions)
    if bad:
        raise ParameterError(f"position {bad[0]} out of range: the input has {n_positions} positions (0-{n_positions - 1})")
    if not out:
        raise ParameterError(f"no positions selected by {spec!r}")
    return sorted(out)


@dataclass(frozen=True)
class RunSpec:
    """A validated run: what the flow plans from."""

    input_path: str
    output_path: str
    input_shape: tuple[int, ...]
    input_dtype: str
    positions: tuple[int, ...]
    params: FilterParams
    overwrite: bool
    output_action: str  # create | open | overwrite


def validate(
    input_path: str,
    output_path: str,
    channel: int = 0,
    sigma_small: Any = SEED_SIGMA_SMALL,
    sigma_large: Any = SEED_SIGMA_LARGE,
    positions: Any = None,
    truncate: float = 4.0,
    mode: str = "nearest",
    output_dtype: str = "float32",
    overwrite: bool = False,
) -> RunSpec:
    """Check every parameter and the input/output stores; write nothing."""
    s_small = parse_sigma(sigma_small, "sigma_small")
    s_large = parse_sigma(sigma_large, "sigma_large")
    bad_axes = [ax for ax, a, b in zip("zyx", s_small, s_large) if a >= b]
    if bad_axes:
        raise ParameterError(
            f"sigma_small must be smaller than sigma_large on every axis (not on {','.join(bad_axes)}): "
            f"{list(s_small)} vs {list(s_large)}"
        )
    try:
        truncate = float(truncate)
    except (TypeError, ValueError):
        raise ParameterError(f"truncate must be a number > 0, got {truncate!r}") from None
    if not (math.isfinite(truncate) and truncate > 0):
        raise ParameterError(f"truncate must be > 0, got {truncate!r}")
    if mode not in dog.MODES:
        raise ParameterError(f"unknown mode {mode!r}; choose one of {', '.join(dog.MODES)}")
    if output_dtype not in OUTPUT_DTYPES:
        raise ParameterError(f"unknown output dtype {output_dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    if not input_path:
        raise ParameterError("input path is empty")
    if not output_path:
        raise ParameterError("output path is empty")
    in_abs = os.path.abspath(os.path.expanduser(str(input_path)))
    out_abs = os.path.abspath(os.path.expanduser(str(output_path)))
    if in_abs == out_abs or Path(out_abs).is_relative_to(in_abs):
        raise ParameterError(f"output path must not be the input or lie inside it: {output_path}")
    try:
        arr = open_input(in_abs)
    except StoreError as exc:
        raise ParameterError(str(exc)) from None
    P, C = arr.shape[0], arr.shape[1]
    if isinstance(channel, bool) or not isinstance(channel, int):
        try:
            channel = int(str(channel))
        except ValueError:
            raise ParameterError(f"channel must be an integer, got {channel!r}") from None
    if not 0 <= channel < C:
        raise ParameterError(f"channel {channel} out of range: the input has {C} channels (0-{C - 1})")
    if P == 0:
        raise ParameterError(f"input has no positions: {input_path}")
    pos = parse_positions(positions, P)
    params = FilterParams(
        input_path=in_abs,
        channel=channel,
        sigma_small=s_small,
        sigma_large=s_large,
        truncate=truncate,
        mode=mode,
        output_dtype=output_dtype,
    )
    try:
        action = check_output(out_abs, params, tuple(arr.shape), overwrite)
    except StoreError as exc:
        raise ParameterError(str(exc)) from None
    return RunSpec(
        input_path=in_abs,
        output_path=out_abs,
        input_shape=tuple(int(s) for s in arr.shape),
        input_dtype=str(arr.dtype),
        positions=tuple(pos),
        params=params,
        overwrite=bool(overwrite),
        output_action=action,
    )
