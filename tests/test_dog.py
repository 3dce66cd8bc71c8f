"""Exactness, threading, validation and memory tests for tasks.dog (no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from conftest import is_populated_mapping, reference_dog, reference_gaussian, tolerance
from datasets import random_volume
from tasks import buffers, defaults, dog, fft
from tasks.testing import traced_peak

SEED_SMALL, SEED_LARGE = defaults.SEED_SIGMA_SMALL, defaults.SEED_SIGMA_LARGE
BACKENDS = fft.available()      # every installed FFT backend is tested


def tol64(v):
    return 1e-10 * max(1.0, float(np.max(np.abs(v))))


# ----------------------------------------------------------------------------- exactness

sig_st = st.floats(min_value=0.2, max_value=7.0, allow_nan=False)
shape_st = st.tuples(*[st.integers(1, 13)] * 3)


@st.composite
def cases(draw):
    shape = draw(shape_st)
    per_axis = draw(st.booleans())
    s1 = tuple(draw(sig_st) for _ in range(3)) if per_axis else draw(sig_st)
    s2 = tuple(draw(sig_st) for _ in range(3)) if draw(st.booleans()) else draw(sig_st)
    return dict(
        shape=shape, s1=s1, s2=s2,
        mode=draw(st.sampled_from(dog.MODES)),
        precision=draw(st.sampled_from(dog.PRECISIONS)),
        dtype=draw(st.sampled_from(["uint16", "float32", "float64", "int16"])),
        truncate=draw(st.sampled_from([4.0, 2.5, 1.0])),
        method=draw(st.sampled_from([None, "transform", "direct"])),
        slab=draw(st.sampled_from([None, 0.3, 0.55])),
        fft=draw(st.sampled_from(BACKENDS)),
        threads=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_tuned(c, fn):
    with dog.tuned(method=c["method"], slab_fraction=c["slab"], fft=c["fft"]):
        return fn()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_dog_matches_scipy(c):
    v = random_volume(c["shape"], c["dtype"], c["seed"])
    got = run_tuned(c, lambda: dog.difference_of_gaussians(
        v, c["s1"], c["s2"], truncate=c["truncate"], mode=c["mode"], precision=c["precision"],
        threads=c["threads"]))
    want = reference_dog(v, c["s1"], c["s2"], c["truncate"], c["mode"])
    assert got.dtype == np.dtype(c["precision"]) and got.shape == v.shape
    tol = tolerance(v) if c["precision"] == "float32" else tol64(v)
    assert np.max(np.abs(got - want)) <= tol


@settings(max_examples=25, deadline=None)
@given(cases())
def test_gaussian_matches_scipy(c):
    v = random_volume(c["shape"], c["dtype"], c["seed"])
    got = run_tuned(c, lambda: dog.gaussian(v, c["s1"], truncate=c["truncate"], mode=c["mode"],
                                              precision=c["precision"], threads=c["threads"]))
    want = reference_gaussian(v, c["s1"], c["truncate"], c["mode"])
    tol = tolerance(v) if c["precision"] == "float32" else tol64(v)
    assert np.max(np.abs(got - want)) <= tol


_SEED_V = random_volume((24, 70, 90), "uint16", 7)


@pytest.fixture(scope="module")
def seed_reference():
    return {mode: reference_dog(_SEED_V, SEED_SMALL, SEED_LARGE, mode=mode) for mode in dog.MODES}


@pytest.mark.parametrize("mode", dog.MODES)
@pytest.mark.parametrize("method, backend", [(None, b) for b in BACKENDS] + [("transform", b) for b in BACKENDS]
                         + [("direct", "pocketfft")])
def test_seed_sigma_moderate_shape(mode, method, backend, seed_reference):
    """The production sigmas (radii 85 and 340 > every axis here), full uint16 range, every FFT backend."""
    with dog.tuned(method=method, fft=backend):
        got = dog.difference_of_gaussians(_SEED_V, SEED_SMALL, SEED_LARGE, mode=mode, threads=2)
    assert np.max(np.abs(got - seed_reference[mode])) <= tolerance(_SEED_V)


def test_seed_sigma_larger_than_radius_axes_slabbed():
    """Axes longer than the small radius, with several slabs (halo windows in the interior)."""
    v = random_volume((20, 200, 230), "uint16", 3)
    want = reference_dog(v, SEED_SMALL, (SEED_LARGE, 30.0, SEED_LARGE))
    for backend in BACKENDS:
        with dog.tuned(slab_fraction=0.3, fft=backend):
            got = dog.difference_of_gaussians(v, SEED_SMALL, (SEED_LARGE, 30.0, SEED_LARGE), threads=2)
        assert np.max(np.abs(got - want)) <= tolerance(v), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_precision_seed(backend):
    v = random_volume((16, 60, 50), "float32", 11)
    with dog.tuned(fft=backend):
        got = dog.difference_of_gaussians(v, SEED_SMALL, SEED_LARGE, precision="float64", threads=2)
    want = reference_dog(v, SEED_SMALL, SEED_LARGE)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(v))


def test_anisotropic_and_order_not_checked():
    v = random_volume((10, 40, 33), "float64", 5)
    s1, s2 = (4.0, 1.0, 0.3), (0.5, 9.0, 2.0)
    got = dog.difference_of_gaussians(v, s2, s1)   # "large" first: allowed, plain G(a) - G(b)
    assert np.max(np.abs(got - reference_dog(v, s2, s1))) <= tolerance(v)


def test_other_ndims():
    rng = np.random.default_rng(0)
    for shape in [(50,), (30, 41), (3, 4, 5, 6)]:
        v = rng.standard_normal(shape) * 10
        for mode in ("nearest", "wrap"):
            got = dog.difference_of_gaussians(v, 1.5, 4.0, mode=mode)
            assert np.max(np.abs(got - reference_dog(v, 1.5, 4.0, mode=mode))) <= tolerance(v)


def test_identity_radius_zero_and_out_buffer():
    v = random_volume((5, 6, 7), "uint16", 1)
    np.testing.assert_array_equal(dog.gaussian(v, 0.1), v.astype(np.float32))
    out = np.full(v.shape, np.nan, dtype=np.float32)
    res = dog.difference_of_gaussians(v, 0.1, 2.0, out=out)
    assert res is out
    assert np.max(np.abs(out - reference_dog(v, 0.1, 2.0))) <= tolerance(v)


def test_empty_volume():
    assert dog.difference_of_gaussians(np.zeros((0, 4, 4), np.uint16), 1, 2).shape == (0, 4, 4)


# ----------------------------------------------------------------------------- threads

def test_threads_equal_results():
    v = random_volume((30, 80, 90), "uint16", 2)
    a = dog.difference_of_gaussians(v, SEED_SMALL, SEED_LARGE, threads=1)
    b = dog.difference_of_gaussians(v, SEED_SMALL, SEED_LARGE, threads=2)
    c = dog.difference_of_gaussians(v, SEED_SMALL, SEED_LARGE, threads=3)
    np.testing.assert_allclose(a, b, rtol=0, atol=tolerance(v) / 10)
    np.testing.assert_allclose(a, c, rtol=0, atol=tolerance(v) / 10)


@pytest.mark.parametrize("lines", [1, 3, 5])
@pytest.mark.parametrize("mode", ["nearest", "constant", "wrap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_blocks_pair_lines_exactly(lines, mode, backend):
    """Blocks of an odd number of lines leave one complex line half empty, along every axis (strided lines
    are loaded sample by sample, contiguous ones line by line), and blocks straddle rows of the volume."""
    v = random_volume((9, 13, 11), "uint16", lines)
    with dog.tuned(block_lines=lines, method="transform", fft=backend):
        got = dog.difference_of_gaussians(v, 1.5, (4.0, 2.0, 3.0), mode=mode, threads=1)
    assert np.max(np.abs(got - reference_dog(v, 1.5, (4.0, 2.0, 3.0), mode=mode))) <= tolerance(v)


def _tasks():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))


class _ThreadSampler:
    """Samples this process's OS task count every 0.5 ms while running (it is one of them itself)."""

    def __init__(self):
        self.counts, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.counts.append(_tasks())
            time.sleep(0.0005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mode, method, backend", [("nearest", "transform", b) for b in BACKENDS] + [
    ("reflect", "transform", "pocketfft"), ("wrap", "transform", BACKENDS[-1]), ("nearest", "direct", "pocketfft")])
def test_never_more_compute_threads_than_asked(threads, mode, method, backend):
    """Counted for real: Python threads and OS tasks alive during the call (helpers, FFT or MKL pools)."""
    v = random_volume((12, 40, 44), "uint16", 9)
    with dog.tuned(method=method, fft=backend):
        dog.difference_of_gaussians(v[:4, :8, :8], SEED_SMALL, SEED_LARGE, mode=mode, threads=1)  # plans, loads
        py0, os0 = threading.active_count(), _tasks()
        with _ThreadSampler() as sampler:
            got = dog.difference_of_gaussians(v, SEED_SMALL, SEED_LARGE, mode=mode, threads=threads)
    assert np.max(np.abs(got - reference_dog(v, SEED_SMALL, SEED_LARGE, mode=mode))) <= tolerance(v)
    assert sampler.counts and max(sampler.counts) - os0 - 1 <= threads - 1   # -1: the sampler itself
    assert threading.active_count() == py0                 # helpers are gone after the call


_POOL_PROBE = """
import json, sys, threading, time
import numpy as np
from tasks import dog
def tasks():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("Threads:"))
v = np.random.default_rng(0).integers(0, 4000, (16, 96, 96)).astype(np.uint16)
counts, stop = [], threading.Event()
def sample():
    while not stop.is_set():
        counts.append(tasks()); time.sleep(0.0005)
with dog.tuned(fft=sys.argv[1]):
    base = tasks()
    th = threading.Thread(target=sample); th.start()
    for _ in range(3):
        dog.difference_of_gaussians(v, 2.0, 9.0, threads=1)
    stop.set(); th.join()
print(json.dumps({"base": base, "max": max(counts), "backend": dog.fft_backend()}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_1_uses_one_thread_whatever_the_pool_settings_say(backend):
    """A fresh process with MKL/OpenMP asked for 8 threads: threads=1 still runs on the calling thread only."""
    env = dict(os.environ, MKL_NUM_THREADS="8", OMP_NUM_THREADS="8", OPENBLAS_NUM_THREADS="8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _POOL_PROBE, backend], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["backend"] == backend
    assert got["max"] - got["base"] <= 1, got      # the sampler thread only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_backend_transforms_in_place_unnormalised(backend, axis, dtype):
    """Every backend: forward and inverse DFT along ``axis`` of a 2-D batch, in place, no 1/M either way."""
    M, lines = 30, 7
    buf = fft.aligned(M * lines, dtype).reshape((lines, M) if axis == 1 else (M, lines))
    fwd, inv = fft.BACKENDS[backend]().plan(buf, axis)
    x = np.random.default_rng(1).standard_normal(buf.shape) + 1j
    buf[...] = x
    fwd()
    rtol = 1e-5 if dtype == np.complex64 else 1e-12
    np.testing.assert_allclose(buf, np.fft.fft(x, axis=axis), rtol=rtol, atol=rtol * M)
    inv()
    np.testing.assert_allclose(buf, M * x, rtol=rtol, atol=rtol * M)


def test_selector_lengths_and_forcing(monkeypatch, tmp_path):
    monkeypatch.setenv("DOGFLOW_CACHE_DIR", str(tmp_path))
    assert fft.smooth_lengths(223) == [225, 240, 243, 250, 256]
    assert fft.smooth_lengths(405) == [405, 432, 450, 480, 512]
    assert all(223 <= n <= 1.3 * 223 for n in fft.smooth_lengths(223))
    for backend in BACKENDS:
        M, name = fft.Selector(only=backend).choose(223, 0, np.complex64)
        assert name == backend and M in fft.smooth_lengths(223)
    M, name = fft.Selector().choose(100, 1, np.complex64, fixed=True)
    assert M == 100 and name in BACKENDS
    if len(BACKENDS) > 1:    # measured picks are cached on disk per host
        assert any(f.startswith("fft-picks-") for f in os.listdir(tmp_path))
    monkeypatch.setenv("DOGFLOW_FFT", "pocketfft")
    assert fft.reset().only == "pocketfft"
    monkeypatch.setenv("DOGFLOW_FFT", "nonsense")
    with pytest.raises(ValueError, match="DOGFLOW_FFT"):
        fft.forced()
    monkeypatch.delenv("DOGFLOW_FFT")
    fft.reset()
    with pytest.raises(ValueError, match="not installed"):
        with dog.tuned(fft="nonsense"):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_fft_backend_is_reported(backend):
    v = random_volume((6, 20, 24), "uint16", 2)
    with dog.tuned(fft=backend):
        dog.difference_of_gaussians(v, 1.5, 4.0, threads=2)
    assert dog.fft_backend() == backend


def test_default_threads(monkeypatch):
    import os
    n = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("DOGFLOW_THREADS", raising=False)
    assert dog.default_threads() == n
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert dog.default_threads() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1000")
    monkeypatch.setenv("DOGFLOW_THREADS", "0")
    assert dog.default_threads() == 1
    monkeypatch.setenv("DOGFLOW_THREADS", "junk")
    assert dog.default_threads() == n


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma_small=0), "sigma_small"),
    (dict(sigma_small=-1), "sigma_small"),
    (dict(sigma_large=float("inf")), "sigma_large"),
    (dict(sigma_large=float("nan")), "sigma_large"),
    (dict(sigma_small=(1, 2)), "one value per axis"),
    (dict(sigma_small="abc"), "sigma_small"),
    (dict(truncate=0), "truncate"),
    (dict(truncate=-2), "truncate"),
    (dict(mode="edge"), "mode"),
    (dict(precision="float16"), "precision"),
    (dict(threads=0), "threads"),
    (dict(threads=1.5), "threads"),
    (dict(out=np.zeros((4, 5, 6), np.float64)), "out"),
    (dict(out=np.zeros((4, 5, 5), np.float32)), "out"),
])
def test_validation(kwargs, match):
    args = dict(volume=np.zeros((4, 5, 6), np.uint16), sigma_small=1.0, sigma_large=2.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as ei:
        dog.difference_of_gaussians(**args)
    assert "\n" not in str(ei.value)


def test_validation_volume_and_overlap():
    with pytest.raises(ValueError, match="real numeric"):
        dog.difference_of_gaussians(np.zeros((3, 3, 3), complex), 1, 2)
    with pytest.raises(ValueError, match="dimension"):
        dog.difference_of_gaussians(np.float32(3), 1, 2)
    v = np.zeros((3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        dog.difference_of_gaussians(v, 1, 2, out=v)
    with pytest.raises(ValueError, match="sigma"):
        dog.gaussian(v, 0)


# ----------------------------------------------------------------------------- memory

def test_peak_memory_bytes_bound():
    for shape in [(413, 2048, 2048), (413, 512, 512), (96, 320, 352), (8, 8, 8)]:
        vol32 = int(np.prod(shape)) * 4
        for dt in ("uint16", "float32"):
            b = dog.peak_memory_bytes(shape, dt)
            assert int(np.prod(shape)) * np.dtype(dt).itemsize + vol32 < b
            assert b <= max(2.5 * vol32, 3 * vol32 if dt == "float32" else 0) + 76 * 2**20
    big = dog.peak_memory_bytes((413, 2048, 2048), "uint16")
    assert big <= 2.5 * 413 * 2048 * 2048 * 4
    # more threads work on larger blocks (the GIL): their buffers count, beyond 13 threads for a full position
    assert dog.peak_memory_bytes((413, 2048, 2048), "uint16", threads=13) == big
    assert big < dog.peak_memory_bytes((413, 2048, 2048), "uint16", threads=16) <= 2.5 * 413 * 2048 * 2048 * 4
    assert dog.peak_memory_bytes((40, 160, 176), "uint16", threads=8) > dog.peak_memory_bytes((40, 160, 176), "uint16")
    assert dog.peak_memory_bytes((10, 10, 10), "float64", "float64") > dog.peak_memory_bytes((10, 10, 10), "float32")


@pytest.mark.parametrize("dtype,threads", [("uint16", 2), ("float32", 2), ("uint16", 8)])
def test_measured_peak_below_bound(dtype, threads):
    shape = (40, 160, 176)
    v = random_volume(shape, dtype, 4)
    dog.difference_of_gaussians(v[:4, :20, :20], 2, 8, threads=2)   # warm caches outside the trace
    out, peak = traced_peak(lambda: dog.difference_of_gaussians(v, SEED_SMALL, SEED_LARGE, threads=threads))
    bound = dog.peak_memory_bytes(shape, dtype, threads=threads)
    assert out.shape == shape and out.dtype == np.float32
    assert peak + v.nbytes <= bound, (peak + v.nbytes, bound)


def test_large_result_is_a_writable_populated_mapping(monkeypatch):
    monkeypatch.setattr(buffers, "POPULATE_MIN", 1)
    v = random_volume((6, 30, 40), "uint16", 5)
    got = dog.difference_of_gaussians(v, 1.5, 6.0, threads=2)
    assert got.flags.writeable and got.dtype == np.float32 and got.shape == v.shape and is_populated_mapping(got)
    assert np.max(np.abs(got - reference_dog(v, 1.5, 6.0))) <= tolerance(v)
    got[0, 0, 0] = 1.0


@pytest.mark.parametrize("mode", ["nearest", "constant"])
def test_slab_window_wider_than_one_sigma(mode):
    """Slabbed first axis where the blur filtered alone has a smaller radius than its window."""
    v = random_volume((32, 6, 36), "uint16", 8)
    s1, s2 = (13.8, 2.49, 8.61), 0.205
    want = reference_dog(v, s1, s2, 2.5, mode)
    for backend in BACKENDS:
        with dog.tuned(slab_fraction=0.2, method="transform", fft=backend):
            got = dog.difference_of_gaussians(v, s1, s2, truncate=2.5, mode=mode, threads=3)
        assert np.max(np.abs(got - want)) <= tolerance(v), backend
