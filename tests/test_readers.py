"""A real layout-3 (sharded) output opened by the tools people use: bioio (+ bioio-ome-zarr), ome-zarr (napari's
reader) and ome-zarr-models (validation). Versions are pinned in pyproject.toml's test extra."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from datasets import make_bioformats2raw
from tasks import sharding
from tasks import pyramid
from tasks.filters import DoG, FilterParams
from tasks.output import Output, OutputSpec, level_path
from tasks.inputs import open_dataset

SHAPE = (5, 44, 38)


def check_with_readers(out, n_positions, n_channels, levels, voxel_size, dog_of):
    """Open ``out`` with every reader; ``dog_of(p, c)`` is the expected full-resolution channel (or None)."""
    from bioio import BioImage
    import bioio_ome_zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(str(out), mode="r"))  # raises on any schema violation

    img = BioImage(str(out), reader=bioio_ome_zarr.Reader)
    assert img.scenes == tuple(f"position {p}" for p in range(n_positions))
    for p in range(n_positions):
        img.set_scene(p)
        assert img.resolution_levels == tuple(range(len(levels)))
        pps = img.physical_pixel_sizes
        assert (pps.Z, pps.Y, pps.X) == pytest.approx(voxel_size)
        data = img.get_image_data("CZYX")
        assert data.shape == (n_channels, *levels[0])
        for c in range(n_channels):
            if dog_of(p, c) is not None:
                np.testing.assert_array_equal(data[c], dog_of(p, c))
        img.set_resolution_level(len(levels) - 1)
        assert img.get_image_data("CZYX").shape == (n_channels, *levels[-1])
        img.set_resolution_level(0)
    assert img.channel_names == [f"DoG of channel {c}" for c in range(n_channels)]

    nodes = list(Reader(parse_url(str(out)))())
    assert nodes and nodes[0].load(Multiscales) is not None
    assert [tuple(d.shape) for d in nodes[0].data] == [(n_channels, *s) for s in levels]
    assert nodes[0].metadata["name"] == "position 0"
    assert [a["unit"] for a in nodes[0].metadata["axes"][1:]] == ["micrometer"] * 3
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0][0]), zarr.open_array(str(out / "0" / "0"))[0])


def test_output_opens_in_bioio_ome_zarr_and_validates(tmp_path, monkeypatch):
    # small inner chunks and shards, so that this small output has several shards of several inner chunks each,
    # partial ones at the edges, as a full position has
    monkeypatch.setattr(pyramid, "CHUNK_ZYX", (2, 16, 16))
    monkeypatch.setattr(sharding, "SHARD_BYTES", 4 * 2 * 48 * 48)
    inp = tmp_path / "in.zarr"
    make_bioformats2raw(inp, positions=2, channels=3, shape=SHAPE)
    ds = open_dataset(inp)
    params = FilterParams(str(inp), DoG((1.0, 1.5, 1.5), (2.0, 3.0, 3.0), 4.0, "nearest"), "float32")
    out = tmp_path / "out.zarr"
    spec = OutputSpec.for_dataset(params, ds, max_plane=20)
    Output(out).prepare(spec, channels=[0, 2])
    expected = {}
    for p in range(2):
        for c in (0, 2):
            expected[p, c] = params.apply(ds.read(p, c), threads=1)
            Output(out).write_levels(p, c, expected[p, c], "float32")
    assert spec.levels == [SHAPE, (5, 22, 19), (5, 11, 10)]
    level0 = Output(out).level(0)
    assert level0.chunks == (1, 2, 16, 16) and level0.shards == (1, 2, 48, 48)  # 9 inner chunks per shard
    shard_files = [f for f in (out / level_path(0, 0) / "c").rglob("*") if f.is_file()]
    assert len(shard_files) == 2 * 3  # channels 0 and 2, 3 shards along z each
    check_with_readers(out, 2, 3, spec.levels, (2.0, 0.406, 0.406), lambda p, c: expected.get((p, c)))
    # the one-line numpy access the README documents
    np.testing.assert_array_equal(zarr.open_array(str(out / "1" / "0"))[:][2], expected[1, 2])
