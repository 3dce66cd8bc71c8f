"""The one seam where a filter kind plugs in.

A kind is a frozen dataclass of its parameters that also states, as class attributes and methods, everything
else dogflow needs to know about it:

- ``kind`` (its name in flow parameters and provenance), ``label`` (what output channels and task runs are
  called: "DoG of channel 2", ``dog-position``), ``method`` (the function named in the NGFF metadata);
- :meth:`check` (its parameters, one-line :class:`FilterError`), :meth:`as_dict` / :meth:`from_dict`
  (provenance and digest);
- :meth:`apply` (the engine call on one (z, y, x) volume) and :meth:`peak_bytes` (its memory plan).

:class:`FilterParams` joins a kind's parameters with the rest of what determines an output channel's content
(the input and the output dtype); its :meth:`FilterParams.digest` is what completion markers record.
Adding a kind means one dataclass here, registered in :data:`KINDS`, plus its entries in the run's parameter
schema (``flows/params.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

from tasks import defaults, units

if TYPE_CHECKING:  # the engine (numpy, scipy) is imported where a filter runs, not where a run is checked
    import numpy as np

_MiB = 1 << 20
RUNTIME_OVERHEAD = 256 * _MiB  # interpreter, zarr codecs and I/O buffers of one task, on top of the filter's peak

Zyx = tuple[float, float, float]


class FilterError(ValueError):
    """Bad filter parameters, phrased for the user on one line."""


def check_truncate(truncate: Any) -> float:
    """``truncate`` as a finite float > 0 (kernel radius ``int(truncate * sigma + 0.5)``), else :class:`FilterError`."""
    try:
        t = float(truncate)
    except (TypeError, ValueError):
        raise FilterError(f"truncate must be a number > 0, got {truncate!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise FilterError(f"truncate must be > 0, got {truncate!r}")
    return t


def check_output_dtype(output_dtype: Any) -> str:
    """``output_dtype`` if dogflow writes it (:data:`tasks.defaults.OUTPUT_DTYPES`), else :class:`FilterError`."""
    if output_dtype not in defaults.OUTPUT_DTYPES:
        raise FilterError(f"unknown output dtype {output_dtype!r}; choose one of {', '.join(defaults.OUTPUT_DTYPES)}")
    return str(output_dtype)


def check_mode(mode: Any) -> str:
    """``mode`` if it is one of scipy.ndimage's edge modes the engine has (:data:`tasks.defaults.MODES`)."""
    if mode not in defaults.MODES:
        raise FilterError(f"unknown mode {mode!r}; choose one of {', '.join(defaults.MODES)}")
    return str(mode)


def _zyx(values: Any, name: str) -> Zyx:
    try:
        out = tuple(float(s) for s in values)
    except (TypeError, ValueError):
        raise FilterError(f"{name} must be three numbers (z, y, x), got {values!r}") from None
    if len(out) != 3:
        raise FilterError(f"{name} must be three numbers (z, y, x), got {values!r}")
    if not all(math.isfinite(s) and s > 0 for s in out):
        raise FilterError(f"{name} must be > 0 on every axis, got {list(out)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class DoG:
    """Difference of Gaussians ``G(σ_small) * f - G(σ_large) * f``: band-pass, blobs of radius ~σ_small·√3 bright.

    Each Gaussian is ``scipy.ndimage.gaussian_filter(f, σ, truncate=truncate, mode=mode)`` computed exactly
    (float64 semantics) by :func:`tasks.dog.difference_of_gaussians`; σ in voxels per axis (z, y, x),
    σ_small < σ_large on every axis.
    """

    sigma_small: Zyx
    sigma_large: Zyx
    truncate: float = defaults.TRUNCATE
    mode: str = defaults.MODE

    kind: ClassVar[str] = "dog"
    label: ClassVar[str] = "DoG"
    method: ClassVar[str] = "dogflow.difference_of_gaussians"
    sigmas: ClassVar[tuple[str, ...]] = ("sigma_small", "sigma_large")  # its σ parameters, by name

    def check(self) -> "DoG":
        small, large = _zyx(self.sigma_small, "sigma_small"), _zyx(self.sigma_large, "sigma_large")
        bad_axes = [ax for ax, a, b in zip("zyx", small, large) if a >= b]
        if bad_axes:
            raise FilterError(
                f"sigma_small must be smaller than sigma_large on every axis (not on {','.join(bad_axes)}): "
                f"{units.format_lengths(small)} vs {units.format_lengths(large)} voxels")
        return DoG(small, large, check_truncate(self.truncate), check_mode(self.mode))

    def as_dict(self) -> dict[str, Any]:
        return {"sigma_small": list(self.sigma_small), "sigma_large": list(self.sigma_large),
                "truncate": self.truncate, "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DoG":
        return cls(tuple(float(s) for s in d["sigma_small"]), tuple(float(s) for s in d["sigma_large"]),  # type: ignore[arg-type]
                   float(d["truncate"]), str(d["mode"]))

    def describe(self) -> str:
        return f"σ {units.format_lengths(self.sigma_small)} / {units.format_lengths(self.sigma_large)}"

    def apply(self, volume: "np.ndarray", threads: int) -> "np.ndarray":
        from tasks import dog

        return dog.difference_of_gaussians(volume, self.sigma_small, self.sigma_large, truncate=self.truncate,
                                           mode=self.mode, threads=threads)

    @staticmethod
    def peak_bytes(zyx: tuple[int, int, int], input_dtype: Any, threads: int) -> int:
        import numpy as np

        from tasks import dog

        return dog.peak_memory_bytes(tuple(zyx), np.dtype(input_dtype), threads=threads)


@dataclass(frozen=True)
class Gaussian:
    """Gaussian blur ``G(σ) * f``: ``scipy.ndimage.gaussian_filter(f, σ, truncate=truncate, mode=mode)`` computed
    exactly (float64 semantics) by :func:`tasks.dog.gaussian`; σ in voxels per axis (z, y, x)."""

    sigma: Zyx
    truncate: float = defaults.TRUNCATE
    mode: str = defaults.MODE

    kind: ClassVar[str] = "gaussian"
    label: ClassVar[str] = "Gaussian"
    method: ClassVar[str] = "dogflow.gaussian"
    sigmas: ClassVar[tuple[str, ...]] = ("sigma",)

    def check(self) -> "Gaussian":
        return Gaussian(_zyx(self.sigma, "sigma"), check_truncate(self.truncate), check_mode(self.mode))

    def as_dict(self) -> dict[str, Any]:
        return {"filter": self.kind, "sigma": list(self.sigma), "truncate": self.truncate, "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gaussian":
        return cls(tuple(float(s) for s in d["sigma"]), float(d["truncate"]), str(d["mode"]))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"σ {units.format_lengths(self.sigma)}"

    def apply(self, volume: "np.ndarray", threads: int) -> "np.ndarray":
        from tasks import dog

        return dog.gaussian(volume, self.sigma, truncate=self.truncate, mode=self.mode, threads=threads)

    @staticmethod
    def peak_bytes(zyx: tuple[int, int, int], input_dtype: Any, threads: int) -> int:
        return DoG.peak_bytes(zyx, input_dtype, threads)  # the engine's bound holds for one Gaussian too


Filter = Union[DoG, Gaussian]
KINDS: dict[str, type] = {DoG.kind: DoG, Gaussian.kind: Gaussian}
FILTER_KINDS = tuple(KINDS)


def kind_named(name: str) -> type:
    try:
        return KINDS[name]
    except KeyError:
        raise FilterError(f"unknown filter {name!r}; choose one of {', '.join(KINDS)}") from None


def channel_label(kind: str, channel: int) -> str:
    """What output channel ``channel`` is called (omero label, bioio channel name): "DoG of channel 2"."""
    return f"{kind_named(kind).label} of channel {int(channel)}"


def task_name(kind: str) -> str:
    """The Prefect task's name for one position of this kind: ``dog-position``."""
    return f"{kind}-position"


@dataclass(frozen=True)
class FilterParams:
    """Everything that determines the content of an output channel, except the input data: the input, the
    filter and its parameters, and the output dtype.

    The channel selection is not a parameter: output channel c is always the filter of input channel c, so
    the digest does not depend on which channels a run computes. The DoG's dictionary (and so its digest)
    is what it was before there was a second kind: outputs made then keep resuming.
    """

    input_path: str
    filter: Filter
    output_dtype: str = defaults.OUTPUT_DTYPE

    @property
    def kind(self) -> str:
        return self.filter.kind

    def as_dict(self) -> dict[str, Any]:
        return {"input_path": self.input_path, **self.filter.as_dict(), "output_dtype": self.output_dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FilterParams":
        """Read the fields of :meth:`as_dict`; other keys (e.g. σ in µm) are ignored. No ``filter`` key: a DoG."""
        try:
            kind = kind_named(str(d.get("filter", DoG.kind)))
            return cls(str(d["input_path"]), kind.from_dict(d), str(d["output_dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FilterError):
                raise
            raise FilterError(f"unreadable filter parameters ({type(exc).__name__}: {exc})") from None

    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def differences(self, other: "FilterParams") -> list[str]:
        """``name: other -> self`` for every parameter that differs."""
        a, b = self.as_dict(), other.as_dict()
        return [f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def apply(self, volume: "np.ndarray", threads: int) -> "np.ndarray":
        return self.filter.apply(volume, threads)


def memory_per_task(kind: str, zyx: tuple[int, int, int], input_dtype: Any, output_dtype: str,
                    threads: int = defaults.PLAN_THREADS) -> int:
    """Bytes one position's task holds at its peak, plus 10 % and :data:`RUNTIME_OVERHEAD`.

    The peak is the larger of the task's two phases (``tasks/position.py``): the filter (its own bound for up
    to ``threads`` engine threads, input included) and the write, after the input is freed
    (:func:`tasks.pyramid.write_peak_bytes`: the result, its pyramid levels and, for uint16, the cast copy).
    """
    from tasks import pyramid

    need = max(kind_named(kind).peak_bytes(tuple(zyx), input_dtype, threads),
               pyramid.write_peak_bytes(tuple(zyx), output_dtype))
    return int(need * 1.1) + RUNTIME_OVERHEAD
