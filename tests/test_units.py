"""σ, FWHM and voxel sizes with units (tasks/units.py): parsing, conversion to voxels, one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import assert_exact, reference_dog
from tasks import units
from tasks import dog

VS = units.Lengths((2.0, 0.5, 0.25), "micrometer")  # anisotropic, like light-sheet data


@pytest.mark.parametrize("text", ["0.5um", "0.5 µm", "0.5μm", "0.5 micrometer", "500nm", "0.0005mm", "[0.5um]"])
def test_one_physical_value_is_the_same_length_on_every_axis(text):
    s = units.sigma_in_voxels(text, VS, "sigma_small")
    assert s.micrometers == pytest.approx((0.5, 0.5, 0.5))
    assert s.voxels == pytest.approx((0.25, 1.0, 2.0))


def test_three_values_with_one_unit_and_numbers_are_voxels():
    assert units.sigma_in_voxels("1,2,2um", VS, "s").voxels == pytest.approx((0.5, 4.0, 8.0))
    assert units.sigma_in_voxels("1um, 2um, 2um", VS, "s").voxels == pytest.approx((0.5, 4.0, 8.0))
    assert units.sigma_in_voxels("1, 2, 2 um", VS, "s").voxels == pytest.approx((0.5, 4.0, 8.0))
    plain = units.sigma_in_voxels("1,3,3", VS, "s")
    assert plain.voxels == (1.0, 3.0, 3.0) and plain.micrometers == pytest.approx((2.0, 1.5, 0.75))
    assert units.sigma_in_voxels(2, None, "s") == units.Sigma((2.0, 2.0, 2.0), None)
    assert units.sigma_in_voxels([1, 2, 3], None, "s").voxels == (1.0, 2.0, 3.0)


def test_fwhm_with_unit():
    f = 2 * math.sqrt(2 * math.log(2))
    s = units.sigma_in_voxels(units.fwhm_as_sigma(f"{f}um", "fwhm_small"), VS, "sigma_small")
    assert s.micrometers == pytest.approx((1.0, 1.0, 1.0)) and s.voxels == pytest.approx((0.5, 2.0, 4.0))
    as_sigma = units.fwhm_as_sigma(f"{f},{2 * f},{2 * f} µm", "fwhm_small")  # the CLI's --fwhm-* -> sigma_*
    assert units.sigma_in_voxels(as_sigma, VS, "s").micrometers == pytest.approx((1.0, 2.0, 2.0))
    assert units.fwhm_as_sigma(f, "fwhm_small") == pytest.approx([1.0, 1.0, 1.0])


def test_micrometers_against_scipy_with_sigma_in_voxels():
    """σ = 1 µm / 3 µm on voxels (2, 0.5, 0.25) µm is σ = (0.5, 2, 4) / (1.5, 6, 12) voxels in scipy."""
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 1000, size=(10, 40, 60)).astype(np.uint16)
    small = units.sigma_in_voxels("1um", VS, "sigma_small")
    large = units.sigma_in_voxels("3 µm", VS, "sigma_large")
    result = dog.difference_of_gaussians(vol, small.voxels, large.voxels)
    assert_exact(result, vol, [0.5, 2.0, 4.0], [1.5, 6.0, 12.0])
    assert not np.allclose(reference_dog(vol, [1.0] * 3, [3.0] * 3), result, atol=1)  # voxels ≠ µm here


def test_voxel_size_forms_and_metadata():
    assert units.parse_voxel_size("2,0.406,0.406") == units.Lengths((2.0, 0.406, 0.406), "micrometer")
    assert units.parse_voxel_size("406nm") == units.Lengths((406.0,) * 3, "nanometer")
    assert units.parse_voxel_size(None) is None and units.parse_voxel_size("") is None
    md = ((2000.0, 406.0, 406.0), "nanometer")
    assert units.resolve_voxel_size(None, *md) == units.Lengths((2000.0, 406.0, 406.0), "nanometer")
    assert units.resolve_voxel_size("2,0.406,0.406", *md).unit == "nanometer"  # same size: the metadata's unit
    assert units.resolve_voxel_size("2,0.406,0.406", None, None).micrometers == pytest.approx((2.0, 0.406, 0.406))
    assert units.resolve_voxel_size(None, None, None) is None


@pytest.mark.parametrize(
    "call, expect",
    [
        (lambda: units.sigma_in_voxels("0.5parsec", VS, "sigma_small"), "unknown length unit 'parsec'"),
        (lambda: units.sigma_in_voxels("0.5um", None, "sigma_small"), "has a unit but the input has no voxel size"),
        (lambda: units.sigma_in_voxels("1um,2nm,2", VS, "sigma_small"), "give one unit for all values"),
        (lambda: units.sigma_in_voxels("1um,2,2", VS, "sigma_small"), "give one unit for all values"),
        (lambda: units.sigma_in_voxels("0um", VS, "sigma_small"), "sigma_small must be > 0"),
        (lambda: units.sigma_in_voxels("1,2", VS, "sigma_small"), "needs 1 or 3 values"),
        (lambda: units.sigma_in_voxels("abc", VS, "sigma_small"), "must be a number"),
        (lambda: units.sigma_in_voxels(True, VS, "sigma_small"), "must be a number"),
        (lambda: units.resolve_voxel_size("1,0.5,0.5", (2.0, 0.406, 0.406), "micrometer"), "contradicts the input's metadata"),
        (lambda: units.resolve_voxel_size("1,0.5,0.5", (2.0, 0.406, 0.406), None), "without a unit"),
        (lambda: units.sigma_in_voxels("1um", units.Lengths((1.0,) * 3, None), "sigma_small"), "voxel size has none"),
    ],
)
def test_bad_values_are_one_line_errors(call, expect):
    with pytest.raises(units.UnitError) as info:
        call()
    msg = str(info.value)
    assert expect in msg and len(msg.splitlines()) == 1, msg
