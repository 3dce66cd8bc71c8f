"""A run's parameters as one typed request, validated once into a :class:`RunSpec`.

The CLI, the ``dog-filter`` flow and the deployments share :class:`RunRequest`: its fields are the
flow's parameters (same names, same defaults from :mod:`tasks.defaults`). :meth:`RunRequest.validate`
checks everything (parameters, input and output stores, cluster profile, memory plan) before any output
is touched or any job is submitted; each failure is a :class:`ParameterError` whose message is one line,
meant to be shown as is.

The CLI validates before it starts Prefect (a bad input exits 2 at once) and hands the result to the flow
it then runs in the same process (:func:`handing_over`), so a CLI run validates once; a deployment run
validates inside the flow.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from flows import clusters
from tasks import defaults, filters
from tasks.store import FilterParams, StoreError, check_output, open_input

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548...

Sigma = Union[float, list[float], str]


class ParameterError(ValueError):
    """Bad input, phrased for the user on one line."""


# --------------------------------------------------------------------------- parsers


def parse_sigma(value: Any, name: str = "sigma") -> tuple[float, float, float]:
    """``2.0``, ``"2.0"``, ``"1,3,3"`` or ``[1, 3, 3]`` -> (σz, σy, σx)."""
    if isinstance(value, str):
        parts: list[Any] = [s for s in re.split(r"[,\s]+", value.strip().strip("[]()")) if s]
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


def sigma_or_fwhm(sigma: Any, fwhm: Any, name: str) -> Any:
    """The σ of a Gaussian given either as σ or as FWHM (σ = FWHM / 2·sqrt(2·ln 2)); None if neither."""
    if sigma is not None and fwhm is not None:
        raise ParameterError(f"give --sigma-{name} or --fwhm-{name}, not both")
    if fwhm is None:
        return sigma
    return [v / FWHM_PER_SIGMA for v in parse_sigma(fwhm, f"fwhm_{name}")]


def parse_positions(spec: Any, n_positions: int) -> list[int]:
    """``None`` -> every position (0..P-1, the last one included); ``"0-9,15"`` or a list -> those.

    Ranges are inclusive on both ends. Duplicates are removed; order is ascending.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all", "*")):
        return list(range(n_positions))
    if isinstance(spec, int) and not isinstance(spec, bool):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ParameterError(f"positions must be a list or a range string like '0-9,15', got {spec!r}")
    out: set[int] = set()
    for item in items:
        out.update(_position_item(item, spec))
    bad = sorted(p for p in out if p < 0 or p >= n_positions)
    if bad:
        raise ParameterError(f"position {bad[0]} out of range: the input has {n_positions} positions (0-{n_positions - 1})")
    if not out:
        raise ParameterError(f"no positions selected by {spec!r}")
    return sorted(out)


def _position_item(item: Any, spec: Any) -> range | list[int]:
    if isinstance(item, str) and re.fullmatch(r"\d+\s*-\s*\d+", item):
        a, b = (int(s) for s in item.split("-"))
        if b < a:
            raise ParameterError(f"position range {item!r} is reversed")
        return range(a, b + 1)
    try:
        return [item if isinstance(item, int) else int(str(item).strip())]
    except ValueError:
        raise ParameterError(f"bad position {item!r} in {spec!r} (use e.g. '0-9,15')") from None


# --------------------------------------------------------------------------- request


@dataclass(frozen=True)
class RunRequest:
    """The parameters of one ``dog-filter`` run, as the user gave them (see the flow's docstring)."""

    input_path: str
    output_path: str
    channel: int = 0
    sigma_small: Sigma = defaults.SEED_SIGMA_SMALL
    sigma_large: Sigma = defaults.SEED_SIGMA_LARGE
    positions: Union[str, list[int], None] = None
    truncate: float = defaults.TRUNCATE
    mode: str = defaults.MODE
    output_dtype: str = defaults.OUTPUT_DTYPE
    overwrite: bool = False
    force: bool = False
    cluster: str = defaults.CLUSTER
    retries: int = defaults.RETRIES
    retry_delay_seconds: float = defaults.RETRY_DELAY_SECONDS
    allow_missing_chunks: bool = False

    def parameters(self) -> dict[str, Any]:
        """The flow's parameters (a plain dict: what `prefect deployment run --params` would send)."""
        return asdict(self)

    def validate(self) -> "RunSpec":
        """Check every parameter, the stores, the cluster profile and the memory plan; write nothing."""
        s_small, s_large = self._sigmas()
        truncate = self._truncate()
        self._choices()
        in_abs, out_abs = self._paths()
        if self.retries < 0 or self.retry_delay_seconds < 0:
            raise ParameterError("retries and retry_delay_seconds must be >= 0")
        try:
            arr = open_input(in_abs)
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        shape = tuple(int(s) for s in arr.shape)
        channel = self._channel(shape[1])
        if shape[0] == 0:
            raise ParameterError(f"input has no positions: {self.input_path}")
        positions = parse_positions(self.positions, shape[0])
        params = FilterParams(input_path=in_abs, channel=channel, sigma_small=s_small, sigma_large=s_large,
                              truncate=truncate, mode=self.mode, output_dtype=self.output_dtype)
        try:
            check_output(out_abs, params, shape, self.overwrite)
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        need = filters.memory_per_task(filters.FILTERS[defaults.FILTER], shape[2:], arr.dtype, self.output_dtype)
        profile = _profile(self.cluster, shape[2:], str(arr.dtype), self.output_dtype)
        return RunSpec(self, in_abs, out_abs, shape, str(arr.dtype), tuple(positions), params, profile, need)

    def _sigmas(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        s_small = parse_sigma(self.sigma_small, "sigma_small")
        s_large = parse_sigma(self.sigma_large, "sigma_large")
        bad_axes = [ax for ax, a, b in zip("zyx", s_small, s_large) if a >= b]
        if bad_axes:
            raise ParameterError(
                f"sigma_small must be smaller than sigma_large on every axis (not on {','.join(bad_axes)}): "
                f"{list(s_small)} vs {list(s_large)}"
            )
        return s_small, s_large

    def _truncate(self) -> float:
        try:
            truncate = float(self.truncate)
        except (TypeError, ValueError):
            raise ParameterError(f"truncate must be a number > 0, got {self.truncate!r}") from None
        if not (math.isfinite(truncate) and truncate > 0):
            raise ParameterError(f"truncate must be > 0, got {self.truncate!r}")
        return truncate

    def _choices(self) -> None:
        if self.mode not in defaults.MODES:
            raise ParameterError(f"unknown mode {self.mode!r}; choose one of {', '.join(defaults.MODES)}")
        if self.output_dtype not in defaults.OUTPUT_DTYPES:
            raise ParameterError(
                f"unknown output dtype {self.output_dtype!r}; choose one of {', '.join(defaults.OUTPUT_DTYPES)}")

    def _paths(self) -> tuple[str, str]:
        if not self.input_path:
            raise ParameterError("input path is empty")
        if not self.output_path:
            raise ParameterError("output path is empty")
        in_abs = os.path.abspath(os.path.expanduser(str(self.input_path)))
        out_abs = os.path.abspath(os.path.expanduser(str(self.output_path)))
        if in_abs == out_abs or Path(out_abs).is_relative_to(in_abs):
            raise ParameterError(f"output path must not be the input or lie inside it: {self.output_path}")
        return in_abs, out_abs

    def _channel(self, n_channels: int) -> int:
        channel = self.channel
        if isinstance(channel, bool) or not isinstance(channel, int):
            try:
                channel = int(str(channel))
            except ValueError:
                raise ParameterError(f"channel must be an integer, got {channel!r}") from None
        if not 0 <= channel < n_channels:
            raise ParameterError(f"channel {channel} out of range: the input has {n_channels} channels (0-{n_channels - 1})")
        return channel


def _profile(name: str, zyx: tuple[int, ...], input_dtype: str, output_dtype: str) -> Any:
    """The run's cluster profile, checked on this host (interface, memory per task)."""
    try:
        profile = clusters.load_profile(name)
        clusters.preflight(profile, tuple(zyx), input_dtype, output_dtype)
    except clusters.ProfileError as exc:
        raise ParameterError(str(exc)) from None
    return profile


@dataclass(frozen=True)
class RunSpec:
    """A validated run: what the flow plans from (absolute paths, parsed σ, the profile, the memory plan)."""

    request: RunRequest
    input_path: str
    output_path: str
    input_shape: tuple[int, ...]
    input_dtype: str
    positions: tuple[int, ...]
    params: FilterParams
    profile: Any = field(repr=False)
    need_bytes: int


# --------------------------------------------------------------------------- hand-over

_VALIDATED: contextvars.ContextVar[Optional[RunSpec]] = contextvars.ContextVar("dogflow_validated", default=None)


@contextlib.contextmanager
def handing_over(spec: RunSpec) -> Iterator[None]:
    """Within the block, :func:`validated` returns ``spec`` for the same request instead of validating again."""
    token = _VALIDATED.set(spec)
    try:
        yield
    finally:
        _VALIDATED.reset(token)


def validated(request: RunRequest) -> RunSpec:
    """``request.validate()``, unless this process validated the very same request just before (CLI)."""
    spec = _VALIDATED.get()
    if spec is not None and spec.request == request:
        return spec
    return request.validate()
