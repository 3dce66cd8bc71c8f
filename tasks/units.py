"""σ, FWHM and voxel sizes given as strings with units: pure functions, no I/O.

Accepted forms (the CLI options, the flow parameters and the Prefect UI form take the same):

- numbers without a unit are **voxels**: ``2.0``, ``"2"``, ``"1,3,3"``, ``[1, 3, 3]`` (one value for every axis,
  or three values z,y,x);
- numbers with a unit are **physical lengths**: ``"0.5um"``, ``"0.5 µm"``, ``"500nm"``, ``"1,2,2um"``,
  ``"0.5 micrometer"``. One value means the same physical length on every axis; it is converted to voxels
  per axis with the voxel size, so on anisotropic data σ in voxels differs between z and y,x;
- FWHM likewise; σ = FWHM / (2·sqrt(2·ln 2)) ≈ FWHM / 2.3548.

Voxel sizes are (z, y, x) lengths: ``"2,0.406,0.406"`` (µm), ``"2,0.406,0.406um"`` or ``"406nm"``.

Every failure is a :class:`UnitError` whose message is one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548...

# Length units: every spelling -> (NGFF unit name, micrometers per unit). NGFF names are UDUNITS-2 names.
_UNITS: dict[str, tuple[str, float]] = {}
for _names, _ngff, _um in (
    (("um", "µm", "μm", "micrometer", "micrometers", "micron", "microns"), "micrometer", 1.0),
    (("nm", "nanometer", "nanometers"), "nanometer", 1e-3),
    (("mm", "millimeter", "millimeters"), "millimeter", 1e3),
    (("pm", "picometer"), "picometer", 1e-6),
    (("angstrom", "å"), "angstrom", 1e-4),
    (("cm", "centimeter"), "centimeter", 1e4),
    (("m", "meter"), "meter", 1e6),
):
    for _n in _names:
        _UNITS[_n] = (_ngff, _um)
UM_PER: dict[str, float] = {ngff: um for ngff, um in _UNITS.values()}  # NGFF unit name -> micrometers

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE = re.compile(rf"^\s*({_NUMBER})\s*([^\d\s,.+-][^\s,]*)?\s*$")


class UnitError(ValueError):
    """A length, σ or voxel size that cannot be used, phrased for the user on one line."""


@dataclass(frozen=True)
class Lengths:
    """Three (z, y, x) values and their unit: ``None`` means voxels."""

    values: tuple[float, float, float]
    unit: str | None  # NGFF unit name (e.g. "micrometer"), or None for voxels

    @property
    def micrometers(self) -> tuple[float, float, float] | None:
        if self.unit is None:
            return None
        f = um_per_unit(self.unit)
        return (self.values[0] * f, self.values[1] * f, self.values[2] * f)


@dataclass(frozen=True)
class Sigma:
    """One Gaussian's σ: in voxels (what the engine takes) and, when given with a unit, in micrometers."""

    voxels: tuple[float, float, float]
    micrometers: tuple[float, float, float] | None = None


def ngff_unit(unit: str) -> str:
    """The NGFF (UDUNITS-2) name of a length unit: ``"um"`` -> ``"micrometer"``."""
    u = str(unit).strip()
    hit = _UNITS.get(u) or _UNITS.get(u.lower())
    if hit is None:
        raise UnitError(f"unknown length unit {unit!r}; use um (µm, micrometer), nm or mm, or no unit for voxels")
    return hit[0]


def um_per_unit(unit: str) -> float:
    """Micrometers in one ``unit`` (any accepted spelling or NGFF name)."""
    return _UNITS[ngff_unit(unit)][1]


def parse_lengths(value: Any, name: str) -> Lengths:
    """``2``, ``"1,3,3"``, ``[1, 3, 3]``, ``"0.5um"``, ``"1,2,2 µm"``, ``["1um", "2um", "2um"]`` -> (z, y, x) + unit.

    One value is used on every axis. All values share one unit (or none).
    """
    if isinstance(value, bool) or value is None:
        raise UnitError(f"{name} must be a number or 3 numbers (z,y,x), optionally with a unit, got {value!r}")
    if isinstance(value, (int, float)):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [s for s in re.split(r"[,;\s]+(?=[-+.\d])", value.strip().strip("[]()")) if s.strip()]
        items = [s.strip().rstrip(",") for s in items]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise UnitError(f"{name} must be a number or 3 numbers (z,y,x), optionally with a unit, got {value!r}")
    vals: list[float] = []
    units: list[str | None] = []
    for item in items:
        if isinstance(item, bool):
            raise UnitError(f"{name} must be a number or 3 numbers (z,y,x), got {value!r}")
        if isinstance(item, (int, float)):
            vals.append(float(item))
            units.append(None)
            continue
        m = _VALUE.match(str(item))
        if not m:
            raise UnitError(f"{name} must be a number or 3 numbers (z,y,x), optionally with a unit, got {value!r}")
        vals.append(float(m.group(1)))
        units.append(ngff_unit(m.group(2)) if m.group(2) else None)
    if len(vals) not in (1, 3):
        raise UnitError(f"{name} needs 1 or 3 values (z,y,x), got {len(vals)}: {value!r}")
    given = {u for u in units if u is not None}
    if len(given) > 1 or (given and len(vals) == 3 and units[-1] is None):
        raise UnitError(f"{name}: give one unit for all values (e.g. 1,2,2um), got {value!r}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise UnitError(f"{name} must be > 0 and finite on every axis, got {value!r}")
    if len(vals) == 1:
        vals = vals * 3
    return Lengths((vals[0], vals[1], vals[2]), given.pop() if given else None)


def parse_voxel_size(value: Any, name: str = "voxel_size") -> Lengths | None:
    """``None``/``""`` -> None; numbers without a unit are micrometers."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    lengths = parse_lengths(value, name)
    return lengths if lengths.unit else Lengths(lengths.values, "micrometer")


def resolve_voxel_size(
    given: Any, metadata: tuple[float, float, float] | None, metadata_unit: str | None, rtol: float = 1e-6
) -> Lengths | None:
    """The voxel size of a run: the input's metadata, or ``given`` (``--voxel-size``) where the input has none.

    A ``given`` that contradicts the metadata (by more than ``rtol``, after unit conversion) is an error.
    Metadata without a unit stays without one (its σ can only be given in voxels).
    """
    user = parse_voxel_size(given)
    if metadata is None:
        return user
    md = Lengths(tuple(float(v) for v in metadata), ngff_unit(metadata_unit) if metadata_unit else None)  # type: ignore[arg-type]
    if user is None:
        return md
    if md.unit is None:
        raise UnitError(
            f"voxel_size {given!r} given, but the input's metadata has a voxel size without a unit "
            f"({list(md.values)}); drop --voxel-size"
        )
    a, b = user.micrometers, md.micrometers
    assert a is not None and b is not None
    if any(abs(x - y) > rtol * max(abs(x), abs(y)) for x, y in zip(a, b)):
        raise UnitError(
            f"voxel_size {given!r} contradicts the input's metadata ({_fmt(md.values)} {md.unit}, z,y,x); "
            f"drop --voxel-size or fix the metadata"
        )
    return md


def sigma_in_voxels(value: Any, voxel_size: Lengths | None, name: str) -> Sigma:
    """σ in voxels per axis, from voxels or a physical length (see :func:`fwhm_as_sigma` for FWHM).

    A physical value needs a voxel size with a unit; the σ in micrometers is kept for provenance.
    """
    lengths = parse_lengths(value, name)
    if lengths.unit is None:
        vox = lengths.values
        um = None
        if voxel_size is not None and voxel_size.unit is not None:
            um = tuple(v * s for v, s in zip(vox, voxel_size.micrometers))  # type: ignore[arg-type]
        return Sigma(vox, um)  # type: ignore[arg-type]
    if voxel_size is None:
        raise UnitError(
            f"{name} {value!r} has a unit but the input has no voxel size; give --voxel-size z,y,x (µm) "
            f"(flow parameter voxel_size) or give {name} in voxels"
        )
    if voxel_size.unit is None:
        raise UnitError(f"{name} {value!r} has a unit but the input's voxel size has none; give {name} in voxels")
    um = tuple(v * um_per_unit(lengths.unit) for v in lengths.values)
    vox = tuple(u / s for u, s in zip(um, voxel_size.micrometers))  # type: ignore[arg-type]
    return Sigma(vox, um)  # type: ignore[arg-type]


def fwhm_as_sigma(fwhm: Any, name: str) -> str | list[float]:
    """A FWHM (voxels or with a unit) as the same Gaussian's σ, in the same form: ``"1.2um"`` -> ``"0.509...um"``.

    Lets the CLI turn ``--fwhm-*`` into the flow's ``sigma_*`` parameter before the voxel size is known.
    """
    lengths = parse_lengths(fwhm, name)
    vals = [v / FWHM_PER_SIGMA for v in lengths.values]
    if lengths.unit is None:
        return vals
    return f"{','.join(repr(v) for v in vals)}{lengths.unit}"


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def format_lengths(values: Sequence[float], unit: str | None = None) -> str:
    """z,y,x values as a user types them, 4 significant digits: ``(21.2766,) * 3`` -> ``"21.28"``,
    ``(1, 2, 2), "um"`` -> ``"1,2,2um"``. Three equal values are written once."""
    vals = [f"{float(v):.4g}" for v in values]
    text = vals[0] if len(set(vals)) == 1 else ",".join(vals)
    return text + (unit or "")
