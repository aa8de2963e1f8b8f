"""Build definition and loader of the CPU extension ``sparsefast._C_cpu`` (sources in ``csrc/cpu/``).

Used two ways:

* ``setup.py`` execs this file standalone and calls :func:`extensions` (so nothing here imports the
  ``sparsefast`` package at module level);
* :func:`load` returns the compiled module: the one built by ``pip install -e .`` if it is importable
  and current (same ``ABI_VERSION``), else a ninja JIT build (``torch.utils.cpp_extension.load``,
  cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; rebuilt when a source
  changes).

One build runs on any x86-64 CPU: no ``-march=native``; ``kernels.cpp`` compiles the kernels for
generic x86-64, AVX2+FMA and AVX-512 with ``#pragma GCC target`` and picks one at run time.
Threads come from torch's own OpenMP pool (``at::parallel_for``). Its OpenMP implementation is inline
in ATen's headers (``#pragma omp parallel``), so the extension must be compiled with ``-fopenmp``:
without it the pragma is ignored and every "parallel" loop runs on one thread (seen: 2 threads set,
CPU time == wall time). Linking ``-fopenmp`` names ``libgomp.so.1``, which resolves to the copy torch
already loaded (same soname), so there is one OpenMP runtime and one pool. Compilers without OpenMP
(e.g. Apple clang) get ``-fopenmp-simd`` only and run single-threaded; :meth:`describe` says so.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

NAME = "sparsefast._C_cpu"
JIT_NAME = "sparsefast_C_cpu"
#: must equal ``kAbiVersion`` in csrc/cpu/binding.cpp
ABI_VERSION = 12
SOURCES = ("csrc/cpu/binding.cpp", "csrc/cpu/kernels.cpp")
HEADERS = ("csrc/cpu/kernels.h", "csrc/cpu/kernels_impl.h")
_OPENMP = sys.platform.startswith("linux") and os.environ.get("SPARSEFAST_CPU_NO_OPENMP", "0") in ("", "0")
CFLAGS = [
    "-O3",
    "-ffp-contract=fast",      # fuse a*b+c into FMA in the vector-extension kernels
    "-fopenmp-simd",
    "-fno-math-errno",
    "-Wno-psabi",
    "-Wno-maybe-uninitialized",
] + (["-fopenmp"] if _OPENMP else [])
LDFLAGS = ["-fopenmp"] if _OPENMP else []

_ROOT = Path(__file__).resolve().parent.parent
_lock = threading.Lock()
_module = None
_error: str | None = None


def _source_paths(root: Path) -> list[Path]:
    return [root / s for s in SOURCES]


def extensions(root: Path) -> list:
    """``CppExtension`` list for setup.py (paths relative to the project root when possible)."""
    from torch.utils.cpp_extension import CppExtension

    root = Path(root).resolve()
    srcs = []
    for p in _source_paths(root):
        try:
            srcs.append(os.path.relpath(p, Path.cwd()))
        except ValueError:  # different drive (Windows)
            srcs.append(str(p))
    if not all((root / s).exists() for s in SOURCES):
        return []
    return [CppExtension(NAME, srcs, include_dirs=[str(root / "csrc" / "cpu")],
                         extra_compile_args={"cxx": list(CFLAGS)}, extra_link_args=list(LDFLAGS))]


def _jit_build():
    from torch.utils.cpp_extension import load as _load

    missing = [s for s in (*SOURCES, *HEADERS) if not (_ROOT / s).exists()]
    if missing:
        raise RuntimeError(f"sources not found (not a source checkout?): {', '.join(missing)}")
    return _load(name=JIT_NAME, sources=[str(p) for p in _source_paths(_ROOT)],
                 extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), extra_include_paths=[str(_ROOT / "csrc" / "cpu")],
                 verbose=os.environ.get("SPARSEFAST_VERBOSE_BUILD", "0") not in ("", "0"))


def _import_prebuilt():
    """(module or None, why not or None): the module ``pip install`` built, if it imports and is
    current (same ``ABI_VERSION``, not older than the sources); ``SPARSEFAST_CPU_JIT=1`` skips it."""
    if os.environ.get("SPARSEFAST_CPU_JIT", "0") not in ("", "0"):
        return None, None
    import importlib

    try:
        mod = importlib.import_module(NAME)
    except ImportError as e:
        return None, f"no prebuilt {NAME} ({e})"
    if getattr(mod, "ABI_VERSION", None) == ABI_VERSION and not _stale(mod):
        return mod, None
    return None, (f"prebuilt {NAME} is stale (ABI {getattr(mod, 'ABI_VERSION', '?')}, want {ABI_VERSION}, "
                  "or sources newer); rebuilding with ninja")


_probed = False


def loaded_or_prebuilt():
    """The extension module if it is loaded or a current prebuilt one imports; ``None`` otherwise.
    Never builds (a JIT build takes minutes): for optional fast paths such as
    :func:`sparsefast.backends.base.masked`."""
    global _module, _probed
    if _module is not None or _probed or _error is not None:
        return _module
    with _lock:
        _probed = True
        if _module is None:
            _module = _import_prebuilt()[0]
    return _module


def load():
    """The compiled extension module; raises ``RuntimeError`` with the real error if it cannot be
    imported nor built. ``SPARSEFAST_CPU_JIT=1`` skips the prebuilt module."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        mod, why = _import_prebuilt()
        if mod is not None:
            _module = mod
            return mod
        problems = [why] if why else []
        try:
            _module = _jit_build()
            return _module
        except Exception as e:  # noqa: BLE001 - keep the real error for unavailable_reason()
            _error = (f"could not build the CPU extension ({type(e).__name__}: {str(e).strip()[-2000:]})"
                      + (f"; {'; '.join(problems)}" if problems else ""))
            raise RuntimeError(_error) from e


def _stale(mod) -> bool:
    """True when the prebuilt module is older than a source file (editable installs during development)."""
    f = getattr(mod, "__file__", None)
    if not f or not os.path.exists(f):
        return False
    built = os.path.getmtime(f)
    try:
        return any((_ROOT / s).exists() and os.path.getmtime(_ROOT / s) > built + 1 for s in (*SOURCES, *HEADERS))
    except OSError:
        return False
