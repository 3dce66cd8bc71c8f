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
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from flows import clusters
from tasks import units
from tasks import defaults, filters, pyramid
from tasks.filters import FilterError, FilterParams
from tasks.inputs import Dataset, open_dataset
from tasks.output import Output, OutputSpec
from tasks.storage import StoreError, is_url

Sigma = Union[float, list[float], str]


class ParameterError(ValueError):
    """Bad input, phrased for the user on one line."""


# --------------------------------------------------------------------------- parsers


def sigma_or_fwhm(sigma: Any, fwhm: Any, name: str) -> Any:
    """The σ of a Gaussian given either as σ or as FWHM (σ = FWHM / 2·sqrt(2·ln 2)), in the same form
    (voxels, or a string with the FWHM's unit); None if neither."""
    if sigma is not None and fwhm is not None:
        raise ParameterError(f"give --sigma-{name} or --fwhm-{name}, not both")
    if fwhm is None:
        return sigma
    try:
        return units.fwhm_as_sigma(fwhm, f"fwhm_{name}")
    except units.UnitError as exc:
        raise ParameterError(str(exc)) from None


def parse_channels(spec: Any, n_channels: int, default: Any = 0) -> list[int]:
    """``"0,2"``, ``[0, 2]``, ``2`` or ``"all"`` -> those channels (ascending); ``None`` -> ``[default]``."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        items: list[Any] = [default]
    elif isinstance(spec, str) and spec.strip().lower() in ("all", "*"):
        return list(range(n_channels))
    elif isinstance(spec, str):
        items = [s for s in re.split(r"[,\s]+", spec.strip().strip("[]")) if s]
    elif isinstance(spec, int) and not isinstance(spec, bool):
        items = [spec]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ParameterError(f"channels must be a list, 'all' or a string like '0,2', got {spec!r}")
    out = set()
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            out.add(item if isinstance(item, int) else int(str(item).strip()))
        except ValueError:
            raise ParameterError(f"channel must be an integer, got {item!r}") from None
    bad = sorted(c for c in out if not 0 <= c < n_channels)
    if bad:
        raise ParameterError(f"channel {bad[0]} out of range: the input has {n_channels} channels (0-{n_channels - 1})")
    return sorted(out)


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
    filter: str = defaults.FILTER
    sigma: Optional[Sigma] = None
    channel: int = 0
    channels: Union[str, list[int], None] = None
    voxel_size: Union[str, list[float], None] = None
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
        self._choices()
        in_abs, out_abs = self._paths()
        if self.retries < 0 or self.retry_delay_seconds < 0:
            raise ParameterError("retries and retry_delay_seconds must be >= 0")
        try:
            ds = open_dataset(in_abs)
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        voxel, sigmas = self._sigmas(ds)
        channels = parse_channels(self.channels, ds.n_channels, self.channel)
        if ds.n_positions == 0:
            raise ParameterError(f"input has no positions: {self.input_path}")
        positions = parse_positions(self.positions, ds.n_positions)
        kind = filters.kind_named(self.filter)
        try:
            settings = kind(**{n: s.voxels for n, s in sigmas.items()}, truncate=self.truncate, mode=self.mode).check()
        except FilterError as exc:
            raise ParameterError(str(exc)) from None
        params = FilterParams(in_abs, settings, self.output_dtype)
        physical = {f"{n}_um": list(s.micrometers) for n, s in sigmas.items() if s.micrometers is not None}
        output = OutputSpec.for_dataset(params, ds, voxel.values if voxel else None, voxel.unit if voxel else None,
                                        physical=physical)
        try:
            Output(out_abs).check(output, self.overwrite)
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        need = filters.memory_per_task(kind.kind, ds.shape, ds.dtype, self.output_dtype)
        profile = _profile(self.cluster, need)
        return RunSpec(self, in_abs, out_abs, (ds.n_positions, ds.n_channels, *ds.shape), str(ds.dtype),
                       tuple(positions), tuple(channels), params, output, profile, need)

    def _sigmas(self, ds: Dataset) -> tuple[Optional[units.Lengths], dict[str, units.Sigma]]:
        """The voxel size (metadata, or ``voxel_size``) and the filter's σ in voxels (from voxels or a length),
        by parameter name."""
        given = {"sigma": self.sigma} if self.filter == filters.Gaussian.kind else {
            "sigma_small": self.sigma_small, "sigma_large": self.sigma_large}
        if any(v is None for v in given.values()):
            raise ParameterError(f"the {self.filter} filter needs {' and '.join('--' + n.replace('_', '-') for n in given)}")
        try:
            voxel = units.resolve_voxel_size(self.voxel_size, ds.voxel_size, ds.unit)
            return voxel, {n: units.sigma_in_voxels(v, voxel, n) for n, v in given.items()}
        except units.UnitError as exc:
            raise ParameterError(str(exc)) from None

    def _choices(self) -> None:
        try:
            filters.kind_named(self.filter)
            filters.check_mode(self.mode)
            filters.check_truncate(self.truncate)
            pyramid.check_output_dtype(self.output_dtype)
        except (FilterError, StoreError) as exc:
            raise ParameterError(str(exc)) from None

    def _paths(self) -> tuple[str, str]:
        if not self.input_path:
            raise ParameterError("input path is empty")
        if not self.output_path:
            raise ParameterError("output path is empty")
        in_abs, out_abs = _location(self.input_path), _location(self.output_path)
        if in_abs == out_abs or out_abs.startswith(in_abs.rstrip("/") + "/"):
            raise ParameterError(f"output path must not be the input or lie inside it: {self.output_path}")
        return in_abs, out_abs


def _location(text: str) -> str:
    """An absolute path, or an object-store URL as given (without a trailing slash)."""
    if is_url(text):
        return str(text).rstrip("/")
    return os.path.abspath(os.path.expanduser(str(text)))


def _profile(name: str, need_bytes: int) -> Any:
    """The run's cluster profile, checked (and, for ``local``, sized) on this host for ``need_bytes`` per task."""
    try:
        profile = clusters.load_profile(name)
        profile.preflight(need_bytes)
    except clusters.ProfileError as exc:
        raise ParameterError(str(exc)) from None
    return profile


@dataclass(frozen=True)
class RunSpec:
    """A validated run: what the flow plans from (absolute paths, parsed σ, the profile, the memory plan)."""

    request: RunRequest
    input_path: str
    output_path: str
    input_shape: tuple[int, ...]  # (P, C, Z, Y, X)
    input_dtype: str
    positions: tuple[int, ...]
    channels: tuple[int, ...]
    params: FilterParams
    output: OutputSpec
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
