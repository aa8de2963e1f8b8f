"""How ``sparsefast._C`` (the CUDA extension, sources in ``csrc/``) is built.

Used two ways, with the same sources and flags:

* by ``setup.py`` (exec'd standalone, so this module never imports the ``sparsefast`` package):
  :func:`extensions` returns the ``CUDAExtension`` when torch has CUDA and nvcc is found, else ``[]``;
* at run time by the ``cuda`` backend: :func:`load` imports the prebuilt ``sparsefast._C`` or JIT-builds
  it with ninja (``torch.utils.cpp_extension.load``), cached under ``$SPARSEFAST_CACHE`` or
  ``~/.cache/sparsefast/``.

Targets: ``TORCH_CUDA_ARCH_LIST`` when set, else ``"8.0;9.0a"`` (A100 ``mma.sp``; H100/H200 ``sm_90a``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_ARCH_LIST = "8.0;9.0a"
EXT_NAME = "sparsefast._C"
_SOURCES = ("csrc/sf_bindings.cpp", "csrc/sf24.cu", "csrc/sf24_sm90.cu", "csrc/csr.cu")
#: must equal ``ABI_VERSION`` in csrc/sf_bindings.cpp (an installed build with another version is stale)
ABI_VERSION = 1

CXX_FLAGS = ["-O3"]  # torch picks the C++ standard (C++20 for torch >= 2.14)
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]


def _root_default() -> Path:
    return Path(__file__).resolve().parent.parent


def sources(root: Path | None = None) -> list[str]:
    root = Path(root) if root is not None else _root_default()
    return [str(root / s) for s in _SOURCES]


def include_dirs(root: Path | None = None) -> list[str]:
    root = Path(root) if root is not None else _root_default()
    return [str(root / "csrc" / "include")]


def nvcc_path() -> str | None:
    """The nvcc torch will use (``CUDA_HOME``/bin/nvcc), or ``None``."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001
        CUDA_HOME = os.environ.get("CUDA_HOME")
    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _has_toolkit(home: str | os.PathLike | None) -> bool:
    return bool(home) and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists()


def _fix_cuda_home() -> None:
    """torch guesses CUDA_HOME from ``which nvcc`` when the variable is unset; a wrapper script such as
    /usr/local/bin/nvcc then yields a prefix without headers. Point torch (and the environment) at a real
    toolkit: $CUDA_HOME, /usr/local/cuda, or the prefix of the resolved nvcc."""
    try:
        import torch.utils.cpp_extension as ce
    except Exception:  # noqa: BLE001
        return
    if _has_toolkit(ce.CUDA_HOME):
        return
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nv = shutil.which("nvcc")
    if nv:
        candidates.append(str(Path(os.path.realpath(nv)).parent.parent))
    for home in candidates:
        if _has_toolkit(home):
            ce.CUDA_HOME = str(home)
            os.environ["CUDA_HOME"] = str(home)
            return


def why_not_buildable() -> str | None:
    """``None`` when the CUDA extension can be built here, else why not."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"torch is not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no torch.version.cuda)"
    _fix_cuda_home()
    if nvcc_path() is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def _ensure_arch_list() -> None:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def extensions(root: Path) -> list:
    """``[CUDAExtension('sparsefast._C', ...)]`` when buildable, else ``[]`` (pure-Python install)."""
    reason = why_not_buildable()
    if reason is not None:
        print(f"sparsefast: not building {EXT_NAME}: {reason}; it is JIT-built on first use on a CUDA machine")
        return []
    _ensure_arch_list()
    from torch.utils.cpp_extension import CUDAExtension

    root = Path(root)
    return [CUDAExtension(
        name=EXT_NAME,
        # setuptools wants paths relative to setup.py
        sources=[os.path.relpath(s, root) for s in sources(root)],
        include_dirs=include_dirs(root),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )]


_loaded = None


def load(verbose: bool = False):
    """The compiled module: ``sparsefast._C`` if installed, else a ninja JIT build (cached).

    Raises ``ImportError``/``RuntimeError`` with the real reason (no CUDA torch, no nvcc, a compile error)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        import importlib

        mod = importlib.import_module(EXT_NAME)
        if getattr(mod, "ABI_VERSION", None) == ABI_VERSION:
            _loaded = mod
            return _loaded
        first_error = ImportError(f"installed {EXT_NAME} has ABI_VERSION {getattr(mod, 'ABI_VERSION', None)}, "
                                  f"sources have {ABI_VERSION} (stale build)")
    except ImportError as e:
        first_error = e
    reason = why_not_buildable()
    if reason is not None:
        raise ImportError(f"{EXT_NAME} is not installed ({first_error}) and cannot be JIT-built: {reason}")
    if not all(Path(s).exists() for s in sources()):
        raise ImportError(f"{EXT_NAME} is not installed and the csrc/ sources are not shipped with this install")
    _ensure_arch_list()
    from torch.utils.cpp_extension import load as _jit_load

    cache = Path(os.environ.get("SPARSEFAST_CACHE", Path.home() / ".cache" / "sparsefast"))
    arch_tag = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", "_").replace(".", "").replace(" ", "")
    build_dir = cache / f"cuda_{arch_tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _loaded = _jit_load(
        name="sparsefast_C",
        sources=sources(),
        extra_include_paths=include_dirs(),
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(build_dir),
        verbose=verbose,
    )
    return _loaded
