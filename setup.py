"""Build script. The package is pure Python; compiled extensions are added where they can build:

* ``sparsefast._C_cpu`` (``csrc/cpu/``): C++ CPU kernels — built when torch is importable at build time
  (``pip install --no-build-isolation -e .``); otherwise JIT-built with ninja on first use.
* ``sparsefast._C`` (``csrc/*.cu``): CUDA kernels — built when torch has CUDA and nvcc is found
  (``CUDA_HOME``); honours ``TORCH_CUDA_ARCH_LIST`` (default sm_80 and sm_90a); otherwise JIT-built on
  first use on a CUDA machine.

The extension definitions live in ``sparsefast/_build_cpu.py`` and ``sparsefast/_build_cuda.py`` so the
same source lists and flags serve setup.py and the JIT loaders. ``SPARSEFAST_NO_EXT=1`` skips them.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load(name):
    path = ROOT / "sparsefast" / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"_sparsefast_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ext_modules, cmdclass = [], {}
if os.environ.get("SPARSEFAST_NO_EXT", "0") in ("", "0"):
    try:
        from torch.utils.cpp_extension import BuildExtension
    except Exception as e:  # torch not importable in this build environment: pure-Python install
        print(f"sparsefast: torch not importable at build time ({e}); extensions will be JIT-built on first use")
    else:
        for name in ("_build_cpu", "_build_cuda"):
            mod = _load(name)
            if mod is not None:
                ext_modules += mod.extensions(ROOT)
        if ext_modules:
            cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
