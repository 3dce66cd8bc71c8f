"""The parameters of a run, defined once: :data:`PARAMS`.

Each :class:`Param` states one run parameter: its name, kind (the type), default, help text and example,
its CLI flags, and whether ``dogflow plan`` takes it, whether a rerun takes it from an existing output's
provenance when it is not given, and whether a site value sets it. What derives from this tuple:

- the ``dog-filter`` flow's signature and docstring (:func:`signature`, :func:`docstring`): the Prefect UI
  form and ``prefect deployment run --param k=v`` come from them;
- the fields of :class:`flows.request.RunRequest` (:func:`request_fields`);
- the options of ``dogflow run`` and ``dogflow plan`` (:func:`cli_signature`);
- the site values of ``deployments/site.py`` (``DOGFLOW_<NAME>``, :func:`site_var`);
- the parameter table of README.md (:func:`markdown_table`), and the site values of deployments/README.md
  and deployments/sites/example.env (tests/test_params.py checks them against this tuple).

Adding a run parameter: one :class:`Param` here, the code that uses it, tests and docs.

Kinds are chosen for the form a scientist fills in, one plain field each: σ, channels, positions, voxel
size and a profile file are text with an example; mode, output dtype and the shipped cluster profiles are
choice lists; truncate is a number; overwrite, force and allow_missing_chunks are switches. Numbers and
lists (from Python, or JSON from ``--param k=v``) are turned into the text form (:func:`as_text`) by the
flow's own parameter validation, which is why ``prefect.yaml`` turns the server's schema enforcement off:
the server would refuse ``--param sigma_small=2`` (a JSON number for a text field) before the flow could
read it.

"Not given" is the empty text (``None`` for truncate): on an existing output the value is taken from its
provenance (``remembered``), else it is the seed default (``seed``). The CLI passes an option the user did
not type as not given.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional

from tasks import defaults

REQUIRED = inspect.Parameter.empty
UNSET = ""  # "not given" of a text or choice parameter


class Kind(enum.Enum):
    TEXT = "text"
    NUMBER = "number"  # a float that may be not given (None)
    INTEGER = "integer"
    SECONDS = "seconds"  # a float with a default
    SWITCH = "switch"
    CHOICE = "choice"


def as_text(value: Any) -> Any:
    """A text parameter's value as text: ``None`` -> ``""``, ``2`` -> ``"2"``, ``[1, 2.5, 2]`` -> ``"1,2.5,2"``.

    Other values are left for the type check to refuse."""
    if value is None:
        return UNSET
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                                for v in value):
        return ",".join(as_text(v) for v in value)
    return value


def _empty_as_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _filter_kinds() -> tuple[str, ...]:
    from tasks.filters import FILTER_KINDS  # light: the engine is imported where a filter runs

    return FILTER_KINDS


def _profiles() -> tuple[str, ...]:
    # the shipped profiles are package data; read without importing flows.clusters (fast start)
    from importlib import resources

    names = (p.name[:-5] for p in resources.files("infra.clusters").iterdir() if p.name.endswith(".yaml"))
    return tuple(sorted(names))


@dataclass(frozen=True)
class Alias:
    """A second CLI option for the same parameter (``--channel 1`` for ``--channels 1``), refused together with it.

    ``convert`` turns its value into the parameter's (it may raise ``ValueError`` with a one-line message)."""

    flags: tuple[str, ...]
    help: str
    type: type = str
    convert: Callable[[Any], str] = as_text
    site: str = ""  # an old site variable meaning the same (DOGFLOW_CHANNEL)


@dataclass(frozen=True)
class Param:
    """One run parameter (see the module docstring)."""

    name: str
    kind: Kind
    default: Any
    help: str
    example: str = ""
    flags: Optional[tuple[str, ...]] = None  # CLI flags; None: --name-with-dashes; (): a CLI argument
    choices: Optional[Callable[[], tuple[str, ...]]] = None
    plan: bool = True  # `dogflow plan` takes it: it changes what a run would do
    remembered: bool = False  # not given on an existing output: taken from its provenance
    seed: Any = None  # remembered: the value when neither given nor in the output
    site: bool = False  # a site value DOGFLOW_<NAME> sets it on both deployments
    alias: Optional[Alias] = None
    metavar: str = ""

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return ("--" + self.name.replace("_", "-"),) if self.flags is None else self.flags

    @property
    def options(self) -> tuple[str, ...]:
        """The values a choice parameter takes (with ``""``, not given, first when it is remembered)."""
        if self.choices is None:
            return ()
        return ((UNSET,) if self.remembered else ()) + tuple(self.choices())

    @property
    def annotation(self) -> Any:
        """The flow's type annotation (what the Prefect UI form and its parameter validation read)."""
        from pydantic import BeforeValidator, WithJsonSchema

        if self.kind is Kind.TEXT:
            return Annotated[str, BeforeValidator(as_text)]
        if self.kind is Kind.NUMBER:
            return Annotated[Optional[float], BeforeValidator(_empty_as_none), WithJsonSchema({"type": "number"})]
        if self.kind is Kind.CHOICE:
            return Annotated[Literal[self.options], BeforeValidator(as_text)]  # type: ignore[valid-type]
        return {Kind.INTEGER: int, Kind.SECONDS: float, Kind.SWITCH: bool}[self.kind]

    def doc(self) -> str:
        """The help text with its example and what "not given" means: the docstring's and the docs' line."""
        text = self.help
        if self.example:
            text += f", e.g. {self.example}"
        if self.remembered:
            text += f". Not given (empty): as the output was made, else {self.seed_text()}"
        return text + "."

    def seed_text(self) -> str:
        return {"sigma_small": "50/2.35 = 21.28 voxels", "sigma_large": "200/2.35 = 85.11 voxels",
                "voxel_size": "the input's metadata", "sigma": "required with filter gaussian"}.get(self.name, str(self.seed))


def _fwhm_to_sigma(name: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        from tasks import units

        try:
            return as_text(units.fwhm_as_sigma(value, f"fwhm_{name}"))
        except units.UnitError as exc:
            raise ValueError(str(exc)) from None

    return convert


PARAMS: tuple[Param, ...] = (
    Param("input_path", Kind.TEXT, REQUIRED, "A 5-D (position, channel, z, y, x) Zarr array, an OME-Zarr image "
          "(NGFF 0.4/0.5), a bioformats2raw root (each series a position) or a dogflow output",
          "/data/run1.zarr", flags=(), metavar="INPUT"),
    Param("output_path", Kind.TEXT, REQUIRED, "OME-Zarr (NGFF 0.5) group to create or continue: position P at "
          "full resolution is the array P/0, shape (C, Z, Y, X); P/1, ... are its 2x-downsampled levels",
          "/scratch/run1-dog.ome.zarr", flags=(), metavar="OUTPUT"),
    Param("filter", Kind.CHOICE, UNSET, "The filter: dog (Difference of Gaussians, sigma_small and sigma_large) "
          "or gaussian (a blur, sigma); both exact to scipy's gaussian_filter in float64",
          choices=lambda: _filter_kinds(), site=True, remembered=True, seed=defaults.FILTER),
    Param("sigma", Kind.TEXT, UNSET, "Sigma of the gaussian filter: voxels (one number or z,y,x) or a length with "
          "a unit, converted with the voxel size", "2.5 or 1,3,3 or 0.5um", site=True, remembered=True, seed=None),
    Param("channels", Kind.TEXT, UNSET, "Channels to filter: numbers or all", "0,2 or all", site=True,
          alias=Alias(("--channel", "-c"), "one channel to filter (the same as --channels N)", int,
                      site="DOGFLOW_CHANNEL"),
          remembered=True, seed="0"),
    Param("sigma_small", Kind.TEXT, UNSET, "Sigma of the small Gaussian: voxels (one number or z,y,x) or a length "
          "with a unit, converted with the voxel size", "2 or 1,3,3 or 0.5um or 1,2,2um", site=True, remembered=True,
          seed=defaults.SEED_SIGMA_SMALL,
          alias=Alias(("--fwhm-small",), "the small Gaussian as its FWHM (sigma = FWHM / 2.3548), voxels or a length",
                      convert=_fwhm_to_sigma("small"))),
    Param("sigma_large", Kind.TEXT, UNSET, "Sigma of the large Gaussian, likewise (larger than sigma_small on "
          "every axis, in the same units)", "4 or 4,12,12 or 2um", site=True, remembered=True,
          seed=defaults.SEED_SIGMA_LARGE,
          alias=Alias(("--fwhm-large",), "the large Gaussian as its FWHM", convert=_fwhm_to_sigma("large"))),
    Param("voxel_size", Kind.TEXT, UNSET, "Voxel size z,y,x in µm (or with a unit) of an input without NGFF "
          "metadata", "2,0.406,0.406", site=True, remembered=True, seed=None),
    Param("positions", Kind.TEXT, UNSET, "Positions to filter (empty: all): numbers and inclusive ranges",
          "0-9,15"),
    Param("truncate", Kind.NUMBER, None, "Kernel radius in sigmas (scipy: radius = int(truncate * sigma + 0.5))",
          "4", site=True, remembered=True, seed=defaults.TRUNCATE),
    Param("mode", Kind.CHOICE, UNSET, "Edge mode, as in scipy.ndimage (nearest: edge replication)",
          choices=lambda: defaults.MODES, site=True, remembered=True, seed=defaults.MODE),
    Param("output_dtype", Kind.CHOICE, UNSET, "float32; float16 (half the bytes: 11-bit significand, clipped to "
          "±65504); or uint16 (rounded half to even, clipped to 0..65535)",
          choices=lambda: defaults.OUTPUT_DTYPES, site=True, remembered=True, seed=defaults.OUTPUT_DTYPE),
    Param("cluster", Kind.CHOICE, defaults.CLUSTER, "Cluster profile shipped with dogflow (on the command line "
          "also a path to a profile YAML)", choices=_profiles, site=True, metavar="NAME|PATH"),
    Param("cluster_file", Kind.TEXT, UNSET, "Path to a cluster profile YAML; it replaces cluster",
          "~/profiles/lab-slurm.yaml", flags=(), site=True),
    Param("overwrite", Kind.SWITCH, False, "Replace an output made with other parameters or another shape: "
          "its computed positions are discarded and every selected position and channel is computed anew"),
    Param("force", Kind.SWITCH, False, "Recompute the selected positions even if complete and unchanged"),
    Param("retries", Kind.INTEGER, defaults.RETRIES, "Prefect retries of a failed position", plan=False, site=True),
    Param("retry_delay_seconds", Kind.SECONDS, defaults.RETRY_DELAY_SECONDS, "Seconds between those retries",
          flags=("--retry-delay",), plan=False, site=True),
    Param("allow_missing_chunks", Kind.SWITCH, False, "Read a missing input chunk as the fill value instead of "
          "failing its position", plan=False, site=True),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
REMEMBERED: tuple[Param, ...] = tuple(p for p in PARAMS if p.remembered)


def site_var(p: Param) -> str:
    return "DOGFLOW_" + p.name.upper()


def split_cluster(value: Any) -> dict[str, str]:
    """``--cluster`` / ``DOGFLOW_CLUSTER`` take a shipped profile name or a YAML path: as the parameter it is."""
    value = str(value or "").strip()
    if not value or value in _profiles():
        return {"cluster": value or defaults.CLUSTER}
    return {"cluster_file": value}


# --------------------------------------------------------------------------- the flow


def signature(return_annotation: Any = inspect.Signature.empty) -> inspect.Signature:
    """The ``dog-filter`` flow's signature: every parameter, in order, with its annotation and default."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(p.name, kind, default=p.default, annotation=p.annotation)
                              for p in PARAMS], return_annotation=return_annotation)


def docstring(summary: str) -> str:
    """The flow's docstring: ``summary`` and one ``Args:`` line per parameter (Prefect shows them in the form)."""
    lines = [summary, "", "Args:"]
    lines += [f"    {p.name}: {p.doc()}" for p in PARAMS]
    return "\n".join(lines) + "\n"


def request_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, dataclasses.field) of every parameter, for :class:`flows.request.RunRequest`."""
    import dataclasses

    py = {Kind.TEXT: str, Kind.NUMBER: Optional[float], Kind.INTEGER: int, Kind.SECONDS: float, Kind.SWITCH: bool,
          Kind.CHOICE: str}
    return [(p.name, py[p.kind], dataclasses.field() if p.default is REQUIRED else dataclasses.field(default=p.default))
            for p in PARAMS]


# --------------------------------------------------------------------------- the CLI


def cli_signature(command: str, extra: list[inspect.Parameter] = ()) -> inspect.Signature:
    """The typer signature of ``dogflow run`` or ``dogflow plan`` (``command``): one option (or argument) per
    parameter that command takes, plus each alias, plus ``extra``. An option the user does not type is None
    (not given) where the parameter can be not given, else the parameter's default."""
    import typer

    kind = inspect.Parameter.KEYWORD_ONLY
    out: list[inspect.Parameter] = []
    for p in PARAMS:
        if command == "plan" and not p.plan:
            continue
        if p.name == "cluster_file":
            continue  # the command line's --cluster takes a path too (split_cluster)
        if not p.cli_flags:
            required = command == "run" or p.name == "input_path"
            info = typer.Argument(... if required else None, metavar=p.metavar, help=p.doc(), show_default=False)
            out.append(inspect.Parameter(p.name, kind, default=info, annotation=str if required else Optional[str]))
            continue
        meta = p.metavar or None
        if p.kind is Kind.SWITCH:
            out.append(inspect.Parameter(p.name, kind, annotation=bool,
                                         default=typer.Option(False, *p.cli_flags, help=p.doc())))
        elif p.kind in (Kind.INTEGER, Kind.SECONDS):
            typ = int if p.kind is Kind.INTEGER else float
            out.append(inspect.Parameter(p.name, kind, annotation=typ,
                                         default=typer.Option(p.default, *p.cli_flags, help=p.doc())))
        elif p.kind is Kind.NUMBER:
            out.append(inspect.Parameter(p.name, kind, annotation=Optional[float],
                                         default=typer.Option(None, *p.cli_flags, help=p.doc(), show_default=False)))
        elif p.kind is Kind.CHOICE and p.name != "cluster":
            # plain text, checked by RunRequest.check: a bad choice is refused in dogflow's one line
            out.append(inspect.Parameter(p.name, kind, annotation=Optional[str], default=typer.Option(
                None, *p.cli_flags, help=p.doc(), show_default=False, metavar="|".join(p.choices()))))
        else:
            help_ = p.doc() if p.name != "cluster" else (
                f"{p.help}; shipped: {', '.join(_profiles())} [default: {p.default}]")
            out.append(inspect.Parameter(p.name, kind, annotation=Optional[str], default=typer.Option(
                None, *p.cli_flags, help=help_, show_default=False, metavar=meta)))
        if p.alias is not None:
            a = p.alias
            out.append(inspect.Parameter(_alias_name(p), kind, annotation=Optional[a.type],
                                         default=typer.Option(None, *a.flags, help=a.help, show_default=False)))
    return inspect.Signature([*out, *extra])


def _alias_name(p: Param) -> str:
    return p.alias.flags[0].lstrip("-").replace("-", "_") if p.alias else ""


class GivenTwice(ValueError):
    """An option and its alias were both given (one line)."""


def from_cli(values: dict[str, Any]) -> dict[str, Any]:
    """The run parameters of a command line (typer's values by name): aliases folded in, ``--cluster`` split
    into ``cluster``/``cluster_file``, options not typed left out. Raises ``ValueError`` (one line)."""
    out: dict[str, Any] = {}
    for p in PARAMS:
        value = values.get(p.name)
        if p.alias is not None:
            alias = values.get(_alias_name(p))
            if alias is not None:
                if value is not None:
                    raise GivenTwice(f"give {p.cli_flags[0]} or {p.alias.flags[0]}, not both")
                value = p.alias.convert(alias)
        if p.name == "channels" and value is not None and not str(value).strip():
            raise ValueError("--channels is empty; give channel numbers (0,2) or all, or leave it out")
        if p.name == "cluster":
            if value is not None:
                out.update(split_cluster(value))
            continue
        if value is not None:
            out[p.name] = value
    return out


# --------------------------------------------------------------------------- docs


def markdown_table() -> str:
    """The parameter table of README.md: flow parameter, command-line option, site value, meaning."""
    rows = ["| flow parameter | `dogflow run` | site value | meaning |", "|---|---|---|---|"]
    for p in PARAMS:
        cli = ", ".join(f"`{f}`" for f in p.cli_flags) or (f"`{p.metavar}`" if p.name != "cluster_file" else
                                                           "`--cluster PATH`")
        if p.alias:
            cli += ", " + ", ".join(f"`{f}`" for f in p.alias.flags)
        site = f"`{site_var(p)}`" if p.site else ""
        default = "" if p.default is REQUIRED or p.remembered else f" Default: `{p.default!r}`."
        rows.append(f"| `{p.name}` | {cli} | {site} | {p.doc()}{default} |")
    return "\n".join(rows)
