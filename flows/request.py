"""A run's parameters as one typed request, validated once into a :class:`RunSpec`.

:class:`RunRequest` has one field per run parameter (:data:`flows.params.PARAMS`, same names, order and
defaults as the ``dog-filter`` flow). Validation comes in two steps, each failure a :class:`ParameterError`
whose message is one line, meant to be shown as is:

- :meth:`RunRequest.check`: the parameters alone (syntax of σ, channels, positions and voxel size, units,
  choices, numbers) and that the input exists. It imports neither zarr nor Prefect nor Dask, so that
  ``dogflow run`` refuses such input in a fraction of a second;
- :meth:`RunRequest.validate`: :meth:`check`, then the input and output stores, the parameters an existing
  output was made with (a parameter not given is taken from its provenance; one given that differs is
  refused unless ``overwrite``), the cluster profile and the memory plan. Nothing is written.

Who validates when is :mod:`flows.run`'s business (validation once).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from flows import params
from tasks import units
from tasks import defaults


class ParameterError(ValueError):
    """Bad input, phrased for the user on one line."""


# --------------------------------------------------------------------------- parsers


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

_ANY = 10**9  # parse_channels/parse_positions bound used to check syntax alone


def _flag(name: str) -> str:
    return params.BY_NAME[name].cli_flags[0]


class _RequestMethods:
    """The methods of :class:`RunRequest` (its fields come from :data:`flows.params.PARAMS`)."""

    def __post_init__(self) -> None:
        # one form per value, whoever built the request (CLI, flow, Python): text parameters as text, and a
        # profile path given as `cluster` moved to `cluster_file`, so that equal runs compare equal
        for p in params.PARAMS:
            value = getattr(self, p.name)
            if p.kind is params.Kind.TEXT or p.kind is params.Kind.CHOICE:
                value = params.as_text(value)
                value = value.strip() if isinstance(value, str) else value
            elif p.kind is params.Kind.SECONDS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # what the flow's parameter validation makes of it
            elif p.kind is params.Kind.NUMBER and isinstance(value, str):
                value = value.strip() or None
            object.__setattr__(self, p.name, value)
        if self.cluster and self.cluster not in params.BY_NAME["cluster"].choices():
            if self.cluster_file and self.cluster_file != self.cluster:
                raise ParameterError(f"give cluster {self.cluster!r} or cluster_file {self.cluster_file!r}, not both")
            object.__setattr__(self, "cluster_file", self.cluster)
            object.__setattr__(self, "cluster", defaults.CLUSTER)

    def parameters(self) -> dict[str, Any]:
        """The flow's parameters (a plain dict: what `prefect deployment run --params` would send)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @property
    def profile_name(self) -> str:
        return self.cluster_file or self.cluster

    # -- step 1: the parameters alone ---------------------------------------------------------------------

    @property
    def kind(self) -> Any:
        """The filter kind (:mod:`tasks.filters`) the request names, or the default one when not given."""
        from tasks import filters

        return filters.kind_named(self.filter or params.BY_NAME["filter"].seed)

    def check(self) -> None:
        """Refuse bad parameters and a missing input; imports nothing heavy, reads no store (an object store's
        input is looked at by :meth:`validate`)."""
        from tasks.storage import is_url

        in_abs, out_abs = self._paths(plan_only=not self.output_path)
        if not is_url(in_abs) and not os.path.exists(in_abs):
            raise ParameterError(f"input not found: {self.input_path}")
        self._truncate()
        self._choices()
        if isinstance(self.retries, bool) or self.retries < 0 or self.retry_delay_seconds < 0:
            raise ParameterError("retries and retry_delay_seconds must be >= 0")
        if self.cluster_file and self.cluster != defaults.CLUSTER:
            raise ParameterError(f"give cluster {self.cluster!r} or cluster_file {self.cluster_file!r}, not both")
        if self.channels and self.channels.lower() not in ("all", "*"):
            parse_channels(self.channels, _ANY)
        if self.positions and self.positions.lower() not in ("all", "*"):
            parse_positions(self.positions, _ANY)
        kind = self.kind
        if self.filter:  # without it, the kind may come from an existing output (validate)
            _refuse_other_sigmas(self, kind)
        try:
            units.parse_voxel_size(self.voxel_size or None)
            given = {n: units.parse_lengths(getattr(self, n), n) for n in kind.sigmas if getattr(self, n)}
        except units.UnitError as exc:
            raise ParameterError(str(exc)) from None
        if len(given) == 2 and (given["sigma_small"].unit is None) != (given["sigma_large"].unit is None):
            raise ParameterError(
                f"sigma_small and sigma_large must be in the same units: {self.sigma_small!r} and "
                f"{self.sigma_large!r} (a number alone is voxels; give both in voxels or both with a unit)")

    def _truncate(self) -> Optional[float]:
        from tasks import filters

        try:
            return None if self.truncate is None else filters.check_truncate(self.truncate)
        except filters.FilterError as exc:
            raise ParameterError(str(exc)) from None

    def _choices(self) -> None:
        """The choice parameters that were given, checked where each is defined (:mod:`tasks.filters`)."""
        from tasks import filters

        try:
            for value, check in ((self.mode, filters.check_mode), (self.output_dtype, filters.check_output_dtype),
                                 (self.filter, filters.kind_named)):
                if value:
                    check(value)
        except filters.FilterError as exc:
            raise ParameterError(str(exc)) from None

    def _paths(self, plan_only: bool = False) -> tuple[str, str]:
        if not self.input_path:
            raise ParameterError("input path is empty")
        in_abs = _location(self.input_path)
        if plan_only and not self.output_path:
            return in_abs, ""
        if not self.output_path:
            raise ParameterError("output path is empty")
        out_abs = _location(self.output_path)
        if in_abs == out_abs or out_abs.startswith(in_abs.rstrip("/") + "/"):
            raise ParameterError(f"output path must not be the input or lie inside it: {self.output_path}")
        return in_abs, out_abs

    # -- step 2: the stores, the output's provenance, the profile --------------------------------------------

    def validate(self, plan_only: bool = False) -> "RunSpec":
        """:meth:`check`, then the stores, the parameters an existing output was made with, the cluster
        profile and the memory plan; writes nothing. ``plan_only`` (``dogflow plan``): the output is optional,
        and the profile's memory is checked without this host's checks (a plan may be made elsewhere)."""
        from tasks import filters
        from tasks.filters import FilterError, FilterParams
        from tasks.inputs import open_dataset
        from tasks.output import Output, OutputSpec
        from tasks.storage import StoreError

        self.check()
        in_abs, out_abs = self._paths(plan_only)
        try:
            ds = open_dataset(in_abs)
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        if ds.n_positions == 0:
            raise ParameterError(f"input has no positions: {self.input_path}")
        made = MadeWith.read(out_abs) if out_abs else None
        r = self._resolve(ds, made)
        positions = parse_positions(self.positions or None, ds.n_positions)
        channels = parse_channels(r.channels, ds.n_channels)
        if made is not None and r.conflicts and not self.overwrite:
            raise ParameterError(made.conflict_line(out_abs, r.conflicts, len(positions), len(channels)))
        try:
            settings = r.kind(**{n: s.voxels for n, s in r.sigmas.items()}, truncate=r.truncate, mode=r.mode).check()
        except FilterError as exc:
            raise ParameterError(str(exc)) from None
        fparams = FilterParams(in_abs, settings, r.output_dtype)
        physical = {f"{n}_um": list(s.micrometers) for n, s in r.sigmas.items() if s.micrometers is not None}
        voxel = r.voxel
        output = OutputSpec.for_dataset(fparams, ds, voxel.values if voxel else None,
                                        voxel.unit if voxel else None, physical=physical)
        if out_abs:
            try:
                Output(out_abs).check(output, self.overwrite)
            except StoreError as exc:  # one line; it says what --overwrite would discard
                raise ParameterError(str(exc)) from None
        need = filters.memory_per_task(r.kind.kind, ds.shape, ds.dtype, r.output_dtype)
        profile = _profile(self.profile_name, need, plan_only)
        verb = "overwriting {}, with these as it was made" if self.overwrite and made else "continuing {} as it was made"
        notice = f"{verb.format(self.output_path)}: {' '.join(r.taken)}" if r.taken else ""
        return RunSpec(self, in_abs, out_abs, (ds.n_positions, ds.n_channels, *ds.shape), str(ds.dtype),
                       tuple(positions), tuple(channels), fparams, output, profile, need, notice)

    def _resolve(self, ds: Any, made: Optional["MadeWith"]) -> "_Resolved":
        """Every remembered parameter: given, else the output's, else the seed default; and the conflicts."""
        taken: list[str] = []
        conflicts: list[str] = []
        old = made.params if made is not None else None
        kind = self.kind
        if self.filter and old is not None and old.kind != self.filter:
            conflicts.append(f"--filter {self.filter}")
        elif not self.filter and old is not None:
            kind = type(old.filter)
            if old.kind != params.BY_NAME["filter"].seed:
                taken.append(f"--filter {old.kind}")
        same = old is not None and old.kind == kind.kind  # the output's σ, truncate and mode apply
        if old is None:
            _refuse_other_sigmas(self, kind)
        for name in ("sigma", "sigma_small", "sigma_large"):
            if getattr(self, name) and name not in kind.sigmas:  # a σ of the other kind, for this output
                conflicts.append(f"{_flag(name)} {getattr(self, name)}")
        try:
            vs_text = self.voxel_size
            if not vs_text and ds.voxel_size is None and made is not None and made.voxel_size:
                vs_text = made.voxel_size_text()
                taken.append(f"--voxel-size {units.format_lengths(made.voxel_size, made.unit_suffix())}")
            voxel = units.resolve_voxel_size(vs_text or None, ds.voxel_size, ds.unit)
            if self.voxel_size and made is not None and not made.same_voxel_size(voxel):
                conflicts.append(f"--voxel-size {self.voxel_size}")
            sigmas = {}
            for name in kind.sigmas:
                given = getattr(self, name)
                if given:
                    s = units.sigma_in_voxels(given, voxel, name)
                    if same:
                        if _close(s.voxels, getattr(old.filter, name)):
                            s = units.Sigma(getattr(old.filter, name), s.micrometers)  # as it was made, exactly
                        else:
                            conflicts.append(f"{_flag(name)} {given}")
                elif same:
                    s = units.Sigma(getattr(old.filter, name), made.micrometers(name))
                    taken.append(f"{_flag(name)} {made.sigma_text(name)}")
                elif params.BY_NAME[name].seed is not None:
                    s = units.sigma_in_voxels(params.BY_NAME[name].seed, voxel, name)
                else:
                    raise ParameterError(f"the {kind.kind} filter needs {_flag(name)} (e.g. "
                                         f"{_flag(name)} {params.BY_NAME[name].example.split(' or ')[0]})")
                sigmas[name] = s
        except units.UnitError as exc:
            raise ParameterError(str(exc)) from None
        values: dict[str, Any] = {}
        for name, given in (("truncate", self._truncate()), ("mode", self.mode), ("output_dtype", self.output_dtype)):
            if name == "output_dtype":
                stored = old.output_dtype if old is not None else None
            else:
                stored = getattr(old.filter, name) if same else None
            if given not in (None, ""):
                values[name] = given
                if stored is not None and given != stored:
                    conflicts.append(f"{_flag(name)} {_plain(given)}")
            elif stored is not None:
                values[name] = stored
                taken.append(f"{_flag(name)} {_plain(stored)}")
            else:
                values[name] = params.BY_NAME[name].seed
        channels = self.channels
        if not channels and made is not None and made.channels:
            channels = ",".join(map(str, made.channels))
            taken.append(f"--channels {channels}")
        return _Resolved(kind, voxel, sigmas, float(values["truncate"]), values["mode"], values["output_dtype"],
                         channels or params.BY_NAME["channels"].seed, taken, conflicts)


RunRequest = dataclasses.make_dataclass(
    "RunRequest", params.request_fields(), bases=(_RequestMethods,), frozen=True,
    namespace={"__module__": __name__})
RunRequest.__doc__ = """The parameters of one ``dog-filter`` run, as the user gave them (fields: flows.params.PARAMS)."""


def _close(a: Sequence[float], b: Sequence[float], rtol: float = 5e-4) -> bool:
    """Equal to the 4 significant digits σ is printed with (so that a printed σ typed back continues the output)."""
    return all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


def _plain(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _refuse_other_sigmas(request: Any, kind: Any) -> None:
    others = [n for n in ("sigma", "sigma_small", "sigma_large") if getattr(request, n) and n not in kind.sigmas]
    if others:
        hint = " (give --filter gaussian)" if others[0] == "sigma" else ""
        raise ParameterError(f"{_flag(others[0])} is not a parameter of the {kind.kind} filter, which takes "
                             f"{' and '.join(_flag(n) for n in kind.sigmas)}{hint}")


def _location(text: str) -> str:
    """An absolute path, or an object-store URL as given (without a trailing slash)."""
    from tasks.storage import is_url

    return str(text).rstrip("/") if is_url(text) else os.path.abspath(os.path.expanduser(str(text)))


@dataclass(frozen=True)
class _Resolved:
    kind: Any  # the filter kind's class (tasks.filters)
    voxel: Optional[units.Lengths]
    sigmas: dict[str, units.Sigma]  # the kind's σ parameters, in voxels (and µm when given so)
    truncate: float
    mode: str
    output_dtype: str
    channels: str
    taken: list[str]  # flags of the values taken from the output
    conflicts: list[str]  # flags given that differ from the output's


@dataclass(frozen=True)
class MadeWith:
    """What an existing output (layout 2, readable provenance) was made with."""

    path: str
    params: Any  # tasks.filters.FilterParams
    provenance: dict[str, Any]

    @classmethod
    def read(cls, out: str) -> Optional["MadeWith"]:
        from tasks import output
        from tasks.filters import FilterParams
        from tasks.storage import StoreError

        o = output.Output(out)
        try:
            if not o.exists():
                return None
            prov = o.provenance()
        except StoreError as exc:
            raise ParameterError(str(exc)) from None
        if not prov or prov.get("layout_version", 1) not in output.RESUMABLE_LAYOUTS:
            return None
        try:
            return cls(out, FilterParams.from_dict(prov["params"]), prov)
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def voxel_size(self) -> Optional[tuple[float, ...]]:
        v = self.provenance.get("voxel_size")
        return tuple(float(x) for x in v) if v else None

    @property
    def channels(self) -> list[int]:
        return [int(c) for c in self.provenance.get("channels") or []]

    def unit_suffix(self) -> str:
        return self.provenance.get("unit") or ""

    def voxel_size_text(self) -> str:
        return ",".join(repr(v) for v in self.voxel_size or ()) + (f" {self.unit_suffix()}" if self.unit_suffix() else "")

    def same_voxel_size(self, voxel: Optional[units.Lengths]) -> bool:
        if self.voxel_size is None or voxel is None:
            return self.voxel_size is None and voxel is None
        if voxel.micrometers is None or not self.unit_suffix():
            return _close(voxel.values, self.voxel_size, 1e-6)
        mine = [v * units.um_per_unit(self.unit_suffix()) for v in self.voxel_size]
        return _close(voxel.micrometers, mine, 1e-6)

    def micrometers(self, name: str) -> Optional[tuple[float, float, float]]:
        um = self.provenance["params"].get(f"{name}_um")
        return tuple(float(v) for v in um) if um else None  # type: ignore[return-value]

    def sigma_text(self, name: str) -> str:
        um = self.micrometers(name)
        return units.format_lengths(um, "um") if um else units.format_lengths(getattr(self.params.filter, name))

    def flags(self) -> str:
        """The flags this output was made with (σ with 4 significant digits)."""
        f = self.params.filter
        out = [f"--filter {f.kind}"] if f.kind != params.BY_NAME["filter"].seed else []
        out += [f"{_flag(n)} {self.sigma_text(n)}" for n in f.sigmas]
        out += [f"--truncate {f.truncate:g}", f"--mode {f.mode}", f"--output-dtype {self.params.output_dtype}"]
        if self.voxel_size:
            out.append(f"--voxel-size {units.format_lengths(self.voxel_size)} ({self.unit_suffix() or 'no unit'})")
        return " ".join(out)

    def overwrite_words(self, n_positions: int, n_channels: int) -> str:
        from tasks.output import Output

        done = len(Output(self.path).markers.marked())
        return (f"--overwrite discards its {done} computed (position, channel) pair(s) and computes "
                f"{n_positions} position(s) x {n_channels} channel(s) anew")

    def conflict_line(self, out: str, conflicts: list[str], n_positions: int, n_channels: int) -> str:
        what = "another voxel size" if all(c.startswith("--voxel-size") for c in conflicts) else "other parameters"
        return (f"output {out} was made with {what} ({self.flags()}), given {' '.join(conflicts)}: leave those out "
                f"to continue it as it was made, or {self.overwrite_words(n_positions, n_channels)}")


def _profile(name: str, need_bytes: int, plan_only: bool = False) -> Any:
    """The run's cluster profile, sized for ``need_bytes`` per task and checked (on this host unless ``plan_only``)."""
    from flows import clusters

    try:
        profile = clusters.load_profile(name)
        return profile.check_memory(need_bytes) if plan_only else profile.preflight(need_bytes)
    except clusters.ProfileError as exc:
        raise ParameterError(str(exc)) from None


@dataclass(frozen=True)
class RunSpec:
    """A validated run: what the flow plans from (absolute paths, parsed σ, the sized profile, the memory plan)."""

    request: Any  # RunRequest
    input_path: str
    output_path: str
    input_shape: tuple[int, ...]  # (P, C, Z, Y, X)
    input_dtype: str
    positions: tuple[int, ...]
    channels: tuple[int, ...]
    params: Any  # tasks.filters.FilterParams
    output: Any  # tasks.output.OutputSpec
    profile: Any = field(repr=False)
    need_bytes: int = 0
    notice: str = ""  # one line: the parameters taken from the existing output, or ""
