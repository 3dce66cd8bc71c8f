"""FFT backends of the engine: in-place complex transforms of 2-D batches of contiguous lines.

The engine transforms its lines in per-thread 2-D buffers (C order, complex64 or complex128): ``(L, M)``
along axis 1 (lines as rows) or ``(M, L)`` along axis 0 (samples as rows, for passes whose lines are strided
in memory), forward and back, both **unnormalised** (``X[k] = sum_t x[t] exp(-2 pi i k t / M)`` and
``x[t] = sum_k X[k] exp(+2 pi i k t / M)``: the engine folds ``1 / M`` into its transfer functions). Every
backend computes exactly that transform (to its own float round-off), on one thread.

* ``pocketfft`` (``scipy.fft``, always there): ``workers=1``, ``overwrite_x=True`` (the result is the buffer).
* ``fftw`` (``pyfftw``, where installed): plans made once per buffer, length and direction with
  ``FFTW_MEASURE`` (at most :data:`PLAN_SECONDS` of measuring per plan), ``threads=1``. Plans are measured into FFTW's *wisdom*, which is kept on disk per host
  (:func:`cache_dir`), so a new process plans from wisdom instead of measuring again.
* ``mkl`` (``mkl_fft``, where installed): MKL's sequential threading layer is selected before its first use,
  so that an MKL call runs on the engine thread that made it, whatever ``MKL_NUM_THREADS`` or
  ``OMP_NUM_THREADS`` say.

Which length and backend a pass uses is measured on the machine it runs on (:class:`Selector`): the first
time lines needing ``target`` samples are transformed in a layout, every installed backend transforms a batch
of each candidate length and the fastest per line is kept (the libraries rank differently per length and on
strided lines). Picks are cached per process and on disk per host (the file beside the wisdom), so the
calibration runs once per host and geometry. ``DOGFLOW_FFT=pocketfft|fftw|mkl`` forces one backend (an
error if it is not installed). :func:`backend_used` names the backends the calling thread's last engine
call used (the provenance records it).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft

__all__ = ["BACKENDS", "Backend", "available", "backend_used", "cache_dir", "forced", "selector"]

ENV = "DOGFLOW_FFT"
ALIGN = 64     # bytes: AVX-512 vectors (FFTW plans SIMD code only for aligned buffers)


def cache_dir() -> str:
    """Per-user cache folder for FFTW wisdom and backend picks: ``$DOGFLOW_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dogflow``, else ``~/.cache/dogflow``."""
    d = os.environ.get("DOGFLOW_CACHE_DIR")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dogflow")
    return d


def _host_key() -> str:
    """What FFT timings depend on: the CPU model and the interpreter's platform."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    safe = "".join(ch if ch.isalnum() else "-" for ch in f"{model}-{platform.machine()}")
    return safe.strip("-")[:120] or "host"


def aligned(n: int, dtype) -> np.ndarray:
    """Zeroed 1-D array of ``n`` items whose data starts on an :data:`ALIGN`-byte boundary.

    Zeroed, not empty: a batch's unused lines are transformed too by plan-based backends, and
    uninitialised memory could hold denormals or NaNs (slow, though they never reach a kept output)."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n * dtype.itemsize].view(dtype)


# --------------------------------------------------------------------------- backends

class Backend:
    """One FFT library. Subclasses state how they transform ``buf`` (a 2-D C-contiguous complex array) along
    ``axis`` in place; :meth:`plan` returns the (forward, inverse) callables for one buffer and geometry."""

    name = ""

    @classmethod
    def installed(cls) -> bool:
        return True

    def plan(self, buf: np.ndarray, axis: int):
        raise NotImplementedError


class Pocketfft(Backend):
    name = "pocketfft"

    def plan(self, buf, axis):
        # in place for a C-contiguous complex buffer; checked once per buffer, not per call
        if not np.shares_memory(sfft.fft(buf, axis=axis, overwrite_x=True, workers=1), buf):  # pragma: no cover
            raise RuntimeError("scipy.fft does not transform this buffer in place")

        def forward():
            sfft.fft(buf, axis=axis, overwrite_x=True, workers=1)

        def inverse():
            sfft.ifft(buf, axis=axis, norm="forward", overwrite_x=True, workers=1)

        return forward, inverse


def _import_pyfftw():
    """``import pyfftw`` without the dask.array import its ``interfaces`` package makes when dask is
    installed (1-2 s, for a dask wrapper the engine does not use): that import is made to fail meanwhile."""
    import sys
    if "pyfftw" in sys.modules or "dask.array.fft" in sys.modules:
        import pyfftw
        return pyfftw
    sys.modules["dask.array.fft"] = None     # `from dask.array.fft import ...` raises ImportError
    try:
        import pyfftw
    finally:
        del sys.modules["dask.array.fft"]
    return pyfftw


PLAN_SECONDS = 0.05   # FFTW's measuring time per plan: unbounded, a host's first calibration of the full
                      # position's lengths took about a minute; the plans found within 50 ms are kept


class Fftw(Backend):
    name = "fftw"
    _lock = threading.Lock()
    _wisdom_loaded = False
    _wisdom_dirty = False

    @classmethod
    def installed(cls):
        return importlib.util.find_spec("pyfftw") is not None

    @classmethod
    def _wisdom_path(cls):
        return os.path.join(cache_dir(), f"fftw-wisdom-{_host_key()}.json")

    @classmethod
    def _load_wisdom(cls):
        pyfftw = _import_pyfftw()
        if cls._wisdom_loaded:
            return
        cls._wisdom_loaded = True
        try:
            with open(cls._wisdom_path()) as fh:
                pyfftw.import_wisdom(tuple(bytes.fromhex(w) for w in json.load(fh)))
        except (OSError, ValueError, TypeError):
            pass

    @classmethod
    def save_wisdom(cls):
        """Write this process's wisdom to the cache (atomically) if it planned anything new."""
        pyfftw = _import_pyfftw()
        with cls._lock:
            if not cls._wisdom_dirty:
                return
            cls._wisdom_dirty = False
            _write_json(cls._wisdom_path(), [w.hex() for w in pyfftw.export_wisdom()])

    def plan(self, buf, axis):
        pyfftw = _import_pyfftw()
        with self._lock:
            self._load_wisdom()
            saved = buf.copy()      # FFTW_MEASURE overwrites the buffer while it measures
            plans = []
            for direction in ("FFTW_FORWARD", "FFTW_BACKWARD"):
                try:        # from wisdom (this process's or the cache's): no measuring
                    plan = pyfftw.FFTW(buf, buf, axes=(axis,), direction=direction, threads=1,
                                       flags=("FFTW_MEASURE", "FFTW_DESTROY_INPUT", "FFTW_WISDOM_ONLY"))
                except RuntimeError:
                    plan = pyfftw.FFTW(buf, buf, axes=(axis,), direction=direction, threads=1,
                                       flags=("FFTW_MEASURE", "FFTW_DESTROY_INPUT"),
                                       planning_timelimit=PLAN_SECONDS)
                    type(self)._wisdom_dirty = True
                plans.append(plan)
            buf[...] = saved
        fwd, inv = plans
        return fwd.execute, inv.execute     # unnormalised both ways (execute() never scales)


class Mkl(Backend):
    name = "mkl"
    _ready = False

    @classmethod
    def installed(cls):
        return importlib.util.find_spec("mkl_fft") is not None

    @classmethod
    def _sequential(cls):
        """MKL's sequential threading layer: every MKL call runs on its calling thread only."""
        if cls._ready:
            return
        import mkl_fft._pydfti  # noqa: F401  (loads libmkl_rt)
        for soname in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"):
            try:
                rt = ctypes.CDLL(soname)
                break
            except OSError:
                continue
        else:  # pragma: no cover
            raise RuntimeError("mkl_fft is installed but libmkl_rt could not be loaded")
        layer = rt.MKL_Set_Threading_Layer(1)       # MKL_THREADING_SEQUENTIAL
        if layer != 1:                             # MKL was already initialised with threads
            rt.MKL_Set_Num_Threads_Local(1)
        cls._ready = True

    def plan(self, buf, axis):
        import mkl_fft
        self._sequential()

        def forward():
            mkl_fft.fft(buf, axis=axis, out=buf)

        def inverse():
            mkl_fft.ifft(buf, axis=axis, norm="forward", out=buf)

        return forward, inverse


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (Pocketfft, Fftw, Mkl)}


@functools.lru_cache(maxsize=1)
def available() -> tuple[str, ...]:
    """Names of the installed backends (pocketfft always first)."""
    return tuple(name for name, cls in BACKENDS.items() if cls.installed())


def warm() -> None:
    """Import the installed backends' libraries and FFTW's cached wisdom now (at engine import: a Dask
    worker's preload), not in the first transform."""
    if "fftw" in available():
        Fftw._load_wisdom()
    if "mkl" in available():
        Mkl._sequential()


def forced() -> str | None:
    """The backend ``$DOGFLOW_FFT`` forces, or None; ValueError for a name that is not installed."""
    name = os.environ.get(ENV, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, got {name!r}")
    if not BACKENDS[name].installed():
        raise ValueError(f"{ENV}={name}, but that backend is not installed")
    return name


def _write_json(path, obj):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(obj, fh)
        os.replace(tmp, path)
    except OSError:     # a read-only or full cache only costs a calibration next time
        pass


# --------------------------------------------------------------------------- selection

def smooth_lengths(target: int, count: int = 4, slack: float = 1.3) -> list[int]:
    """The ``count`` smallest 5-smooth lengths (``2**i 3**j 5**k``) in ``[target, slack * target]``
    (at least the smallest one at or above ``target``), and the smallest ``2**i`` or ``3 * 2**i`` there."""
    out = []
    p2 = 1
    hi = max(target, int(slack * target))
    while p2 <= 2 * hi:
        p3 = p2
        while p3 <= 2 * hi:
            p5 = p3
            while p5 <= 2 * hi:
                if p5 >= target:
                    out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    out = sorted(set(out))
    picked = [n for n in out[:count] if n <= hi] or out[:1]
    # and the smallest 2**i or 3 * 2**i in range: FFTW's fastest (405 -> 512: 0.56 of pocketfft at 405)
    binary = [n for n in out if n <= hi and n // (n & -n) in (1, 3)]
    return sorted(set(picked + binary[:1]))


@dataclass
class Selector:
    """Picks, by measurement, the transform length and backend for lines that need at least ``target``
    samples: among the four smallest 5-smooth lengths up to 1.3x the target and the smallest power of two (or
    three times one) there (libraries differ: FFTW is fastest on
    lengths with many factors of 2, pocketfft on the smallest), and every installed backend, the pair of
    least CPU time per line of a forward plus inverse transform, in the layout the pass uses.

    ``only``: restrict to one backend (tests, :data:`ENV`). ``fixed``: the length is given (mode 'wrap').
    Picks are kept in memory and in a per-host JSON file in :func:`cache_dir` (machines of one CPU model
    share the figures)."""

    only: str | None = None
    picks: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool = False

    @property
    def path(self):
        return os.path.join(cache_dir(), f"fft-picks-{_host_key()}.json")

    def _load(self):
        if self.loaded:
            return
        self.loaded = True
        try:
            with open(self.path) as fh:
                self.picks.update(json.load(fh))
        except (OSError, ValueError):
            pass

    def choose(self, target: int, axis: int, dtype, fixed: bool = False, smallest=None) -> tuple[int, str]:
        """(length M >= target, backend) for in-place transforms of lines in a (lines, M) batch along axis 1
        or a (M, lines) batch along axis 0. ``smallest(target)``: the length used without measuring
        (pocketfft alone: the smallest 5-smooth length)."""
        names = (self.only,) if self.only else available()
        if names == ("pocketfft",):
            return (target if fixed else (smallest or (lambda t: smooth_lengths(t, 1)[0]))(target)), "pocketfft"
        lengths = [target] if fixed else smooth_lengths(target)
        key = f"{target}{'=' if fixed else '+'}:{'samples' if axis == 0 else 'lines'}:" \
              f"{np.dtype(dtype).name}:{','.join(names)}:{','.join(map(str, lengths))}"
        with self.lock:
            self._load()
            got = self.picks.get(key)
            if got is not None:
                return int(got[0]), got[1]
            got = self.picks[key] = _calibrate(names, lengths, axis, dtype)
            merged = {}
            try:
                with open(self.path) as fh:
                    merged = json.load(fh)
            except (OSError, ValueError):
                pass
            merged.update(self.picks)
            _write_json(self.path, merged)
        if "fftw" in names:
            Fftw.save_wisdom()
        return got


BATCH_BYTES = 1 << 20   # calibration batches: about what one engine block transforms


def _calibrate(names, lengths, axis, dtype, repeat=5):
    """(M, backend) of least CPU time per line for a forward + inverse transform of a ~1 MiB batch,
    best of ``repeat``."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    best = {}
    for M in lengths:
        lines = max(2, BATCH_BYTES // (dtype.itemsize * M))
        buf = aligned(lines * M, dtype).reshape((lines, M) if axis == 1 else (M, lines))
        for name in names:
            buf[...] = rng.standard_normal(buf.shape)
            fwd, inv = BACKENDS[name]().plan(buf, axis)
            fwd(), inv()          # warm: first-call set-up is not what the engine pays per block
            t = np.inf
            for _ in range(repeat):
                buf *= 1.0 / M
                c = time.thread_time()
                fwd()
                inv()
                t = min(t, time.thread_time() - c)
            best[(M, name)] = t / lines
    return list(min(best, key=best.get))


_selector = None
_used = threading.local()


def selector() -> Selector:
    """The process's selector (honours :data:`ENV`, read on first use)."""
    global _selector
    if _selector is None:
        _selector = Selector(only=forced())
    return _selector


def reset(only: str | None = None) -> Selector:
    """A fresh process-wide selector: ``only`` forces one backend (tests), None measures (and reads ENV)."""
    global _selector
    _selector = Selector(only=only if only is not None else forced())
    return _selector


def record_used(names) -> None:
    _used.names = tuple(sorted(set(names)))


def backend_used() -> str:
    """Backend(s) of the calling thread's last engine call, ``'+'``-joined (e.g. ``'fftw'``, or
    ``'fftw+pocketfft'`` when lengths differed); before any call, the forced or preferred one."""
    names = getattr(_used, "names", ())
    if names:
        return "+".join(names)
    sel = selector()
    return sel.only or ("+".join(n for n in available() if n != "pocketfft") or "pocketfft")
