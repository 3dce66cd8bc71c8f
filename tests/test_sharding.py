"""Sharded arrays (tasks/sharding.py): the shard-shape rule, the whole-shard writer against zarr's own sharding
codec on real stores on disk, and the output footprint that ``dogflow plan`` prints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from tasks import pyramid, sharding

SEED = (413, 2048, 2048)


def test_a_full_seed_position_is_at_most_16_files_per_channel_with_viewer_sized_chunks():
    levels = pyramid.level_shapes(SEED)
    assert levels == [SEED, (413, 1024, 1024)]
    shards = [sharding.shard_shape((3, *zyx), pyramid.chunk_shape(zyx), 4) for zyx in levels]
    assert shards == [(1, 64, 2048, 2048), (1, 256, 1024, 1024)]
    files = [math.prod(sharding.grid((1, *zyx), s)) for zyx, s in zip(levels, shards)]
    assert files == [7, 2]  # 560 chunk files unsharded
    assert pyramid.chunk_shape(SEED) == (1, 64, 256, 256)
    # 2-byte output: twice the planes per shard
    assert [sharding.shard_shape((3, *zyx), pyramid.chunk_shape(zyx), 2) for zyx in levels] == [
        (1, 128, 2048, 2048), (1, 448, 1024, 1024)]


@pytest.mark.parametrize("shape,itemsize", [((3, 413, 2048, 2048), 4), ((2, 100, 8192, 8192), 4), ((1, 7, 300, 5000), 2),
                                            ((4, 5, 44, 38), 4), ((1, 1000, 100, 100), 4), ((2, 64, 256, 256), 8)])
def test_shards_are_whole_chunks_of_one_channel_within_the_byte_budget(shape, itemsize):
    chunks = pyramid.chunk_shape(shape[1:])
    s = sharding.shard_shape(shape, chunks, itemsize)
    assert s[0] == 1 and all(a % c == 0 for a, c in zip(s, chunks))
    assert math.prod(s) * itemsize <= sharding.SHARD_BYTES or s == chunks
    assert all(a <= -(-n // c) * c for a, n, c in zip(s, shape, chunks))  # never beyond the array's chunks
    # the axes below a split axis span the whole array (a shard is one contiguous block of rows/planes)
    split = [ax for ax in range(1, 4) if s[ax] < shape[ax]]
    assert all(s[ax] >= shape[ax] for ax in range(max(split, default=0) + 1, 4))


def _pair(tmp_path, shape, chunks, shards, dtype):
    kw = dict(shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0,
              compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
    ref = zarr.create_array(str(tmp_path / "zarr.zarr"), **kw).with_config({"write_empty_chunks": True})
    ours = zarr.create_array(str(tmp_path / "ours.zarr"), **kw)
    return ref, ours


def _files(root: Path) -> list[tuple[str, int]]:
    return sorted((str(f.relative_to(root)), f.stat().st_size) for f in (root / "c").rglob("*") if f.is_file())


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16"])
@pytest.mark.parametrize("shape,chunks,shards", [
    ((3, 13, 41, 37), (1, 4, 16, 16), (1, 8, 32, 48)),   # partial edge shards and edge chunks on every axis
    ((2, 70, 20, 30), (1, 8, 20, 30), (1, 64, 20, 30)),  # a last shard with inner chunks wholly outside the array
    ((2, 5, 44, 38), (1, 5, 44, 38), (1, 5, 44, 38)),    # one chunk per shard
])
def test_whole_shards_decode_as_zarr_writes_them(tmp_path, dtype, shape, chunks, shards):
    """The writer's shards hold what zarr's sharding codec writes for the same data: the same decoded values
    (read by zarr), the same shard files with the same sizes (same inner encoding); the other channel stays
    unwritten."""
    ref, ours = _pair(tmp_path, shape, chunks, shards, dtype)
    data = (np.random.default_rng(0).normal(size=shape[1:]) * 300).astype(dtype)
    ref[1] = data
    n = sharding.write_whole_shards(ours, (1,), data, threads=3)
    assert n == math.prod(sharding.grid(shape[1:], shards[1:]))
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "zarr.zarr")
    got = zarr.open_array(str(tmp_path / "ours.zarr"), mode="r")
    np.testing.assert_array_equal(got[1], data)
    assert not np.any(got[0])
    # an inner chunk alone (what a viewer's tile needs), through zarr's partial read of the shard index
    c = chunks[1:]
    np.testing.assert_array_equal(got[1, : c[0], : c[1], : c[2]], data[: c[0], : c[1], : c[2]])


def test_rewriting_reads_nothing_and_replaces_torn_shards(tmp_path, monkeypatch):
    """A rewrite reads no shard back (no store get of a data key) and succeeds over a
    torn shard and a crashed writer's temporary file, where zarr's own write fails on the torn shard's index."""
    shape, chunks, shards = (2, 20, 40, 40), (1, 8, 16, 16), (1, 8, 48, 48)
    ref, ours = _pair(tmp_path, shape, chunks, shards, "float32")
    first = np.random.default_rng(1).normal(size=shape[1:]).astype(np.float32)
    second = first * 2 + 1
    for a in (ref, ours):
        sharding.write_whole_shards(a, (0,), first)
    torn = [tmp_path / name / ref.metadata.encode_chunk_key((0, 1, 0, 0)) for name in ("zarr.zarr", "ours.zarr")]
    for t in torn:
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])  # a writer killed half way through
    leftover = torn[1].with_name(f".{torn[1].name}.otherhost.4242.tmp")
    leftover.write_bytes(b"partial")
    with pytest.raises(ValueError, match="checksum"):  # zarr reads the old shard first
        ref[0] = second

    reads = []
    get = LocalStore.get

    async def counting_get(self, key, *args, **kw):
        reads.append(key)
        return await get(self, key, *args, **kw)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    sharding.write_whole_shards(ours, (0,), second)
    assert not [k for k in reads if "/c/" in f"/{k}"], reads
    monkeypatch.undo()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr"), mode="r")[0], second)
    assert not leftover.exists() and not list((tmp_path / "ours.zarr").rglob("*.tmp"))


def test_arrays_it_does_not_know_are_written_by_zarr(tmp_path):
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(2, 6, 10, 10), chunks=(1, 3, 5, 5), dtype="float32")
    data = np.arange(600, dtype=np.float32).reshape(6, 10, 10)
    assert sharding.write_whole_shards(plain, (1,), data) == 0
    np.testing.assert_array_equal(plain[1], data)
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 6, 10, 10), chunks=(1, 3, 5, 5),
                            shards=(1, 6, 10, 10), dtype="float32")
    assert sharding.write_whole_shards(mem, (0,), data) == 0
    np.testing.assert_array_equal(mem[0], data)


def test_footprint_of_a_seed_run():
    levels = pyramid.level_shapes(SEED)
    fp = sharding.footprint(levels, pyramid.chunk_shape, "float32", positions=840, channels=3)
    assert fp.data_files_per_channel == 9
    # per position: 3 x (9 shards + marker + preview), the position group's and both levels' zarr.json
    assert fp.files_per_position == 3 * 11 + 1 + 2
    assert fp.bytes_per_position == 3 * 4 * (413 * 2048 * 2048 + 413 * 1024 * 1024)
    assert fp.run_files == 840 * fp.files_per_position + 2 and fp.run_bytes == 840 * fp.bytes_per_position
    half = sharding.footprint(levels, pyramid.chunk_shape, "float16", positions=840, channels=3)
    assert half.bytes_per_position * 2 == fp.bytes_per_position and half.data_files_per_channel == 5
    lines = fp.lines(ratio=1.89)
    assert len(lines) == 3 and "26.0 GB uncompressed" in lines[1] and "about 13.7 GB stored" in lines[1] and "30242 files" in lines[2]
