"""Building and loading the C++ CPU kernels (``csrc/``): a persistent, locked, per-source-hash cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from deepshift.backends.cpu import cache

# The translation units (built in parallel, linked into one module) and the headers they share.
_UNITS = ("bindings.cpp", "isa.cpp", "linear.cpp", "lut.cpp", "conv.cpp", "elementwise.cpp",
          "epilogue512.cpp", "frozen.cpp", "decoder.cpp")
_SOURCES = (*_UNITS, "common.h", "kernels.h", "epilogue_lanes.h", "ops.h", "frozen.h", "epilogue.h",
            "decoder.h")


_CSRC = Path(__file__).resolve().parent / "csrc"


_lock = threading.RLock()


_state: dict[str, Any] = {"tried": False, "ext": None, "error": None}


_on_load: list = []


def on_load(hook) -> None:
    """Call ``hook(ext)`` once the extension is loaded (now, if it already is): the frozen ops'
    C++ kernels are registered this way (see register.py)."""
    _on_load.append(hook)
    if _state["ext"] is not None:
        hook(_state["ext"])


def native_disabled() -> bool:
    """True when ``DEEPSHIFT_NO_NATIVE`` is set (to anything but "" or "0")."""
    return os.environ.get("DEEPSHIFT_NO_NATIVE", "") not in ("", "0")


def build_dir() -> Path:
    """Root of the persistent build cache: ``$DEEPSHIFT_BUILD_DIR`` or ``~/.cache/deepshift``."""
    env = os.environ.get("DEEPSHIFT_BUILD_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepshift"


# -ffp-contract=off: a multiply followed by an add must stay two roundings (never an FMA), as in torch.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def _source_digest() -> str:
    h = hashlib.sha256()
    h.update(repr(_CFLAGS).encode())
    for name in _SOURCES:
        h.update((_CSRC / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold the build folder's lock for one process at a time; a killed holder never blocks others.

    torch's own lock (a ``lock`` file that its holder deletes when done) stays behind when the
    holder is killed mid-build (kill -9, OOM, a CI timeout), and every later process then waits
    for it forever, silently. ``flock`` is released by the kernel when its holder dies, and every
    deepshift process takes it before torch's, so a ``lock`` file found while holding it is stale.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's lock alone
        yield
        return
    with open(directory / "deepshift.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build():
    """Compile (or load the cached build of) the extension; raises on any failure."""
    from torch.utils import cpp_extension

    name = f"deepshift_cpu_{_source_digest()}"
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        if not (directory / f"{name}.so").exists():
            print(f"deepshift: building the native CPU kernels (once, about a minute) in {directory}",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(
            name=name,
            sources=[str(_CSRC / name) for name in _UNITS],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=os.environ.get("DEEPSHIFT_BUILD_VERBOSE", "") not in ("", "0"),
        )


def load_extension():
    """The compiled extension module, or None (disabled, or the build failed: warned once)."""
    if native_disabled():
        return None
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["ext"] = _build()
                for hook in _on_load:
                    hook(_state["ext"])
            except Exception as exc:  # no compiler, build error, import error: use the reference
                _state["ext"] = None
                _state["error"] = exc
                warnings.warn(
                    f"deepshift: native CPU kernels unavailable ({type(exc).__name__}: {exc}); "
                    "using the pure-torch reference ops (slower). Set DEEPSHIFT_NO_NATIVE=1 to "
                    "silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["ext"]


def native_available() -> bool:
    """True when the native kernels are (or can be) built and loaded; builds them if needed."""
    return load_extension() is not None


def reset_state() -> None:
    """Forget the loaded extension, the build failure and the caches (tests)."""
    with _lock:
        _state.update(tried=False, ext=None, error=None)
        cache.clear_cache()


ISAS = ("avx512", "avx2", "portable")
"""The kernels' instruction-set paths, best first ("avx512": AVX-512 F/BW/VL)."""


ISA_CODES = {"avx512": 2, "avx2": 1, "portable": 0}
"""Each path's code in the extension (``set_isa``, ``current_isa``)."""


_ISA_NAMES = {code: name for name, code in ISA_CODES.items()}


def current_isa() -> str:
    """The instruction-set path the kernels run now (one of ``ISAS``), or ``"reference"`` without
    the native kernels."""
    ext = load_extension()
    return "reference" if ext is None else _ISA_NAMES[ext.current_isa()]


def set_fused(enabled: bool) -> None:
    """Switch the frozen layers' fused native forward on (the default) or off: off, each frozen op
    composes the smaller ops (quantize_input, the shift op, scale_output), each on its own kernel.
    Results are equal either way; benchmarks and tests compare the two."""
    cache.set_fused(enabled)
    ext = load_extension()
    if ext is not None:
        ext.set_fast_path(bool(enabled))


def set_isa(isa: str) -> str:
    """Force the kernels' instruction set: one of ``ISAS`` or ``"auto"`` (the best this CPU has);
    returns the one used (a path the CPU lacks falls back to the best one below it)."""
    ext = load_extension()
    if ext is None:
        return "reference"
    code = -1 if isa == "auto" else ISA_CODES[isa]
    cache.clear_cache()  # prepared forwards and layouts were chosen for the previous path
    return _ISA_NAMES[ext.set_isa(code)]
