"""The CUDA tools the report runs (nvcc, cuobjdump, c++filt: :func:`find_tool`), name demangling and
shortening, and the ``cuobjdump`` reads of a cubin / object / ``.so``."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .parsers import parse_elf_max_threads, parse_resource_usage, parse_sass

# ------------------------------------------------------------------------------------------------
# tools
# ------------------------------------------------------------------------------------------------
def _triton_bin(name: str) -> str | None:
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except Exception:  # noqa: BLE001
        return None
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() and os.access(p, os.X_OK) else None


def find_tool(name: str) -> str | None:
    """``name`` (nvcc, cuobjdump, nvdisasm, c++filt) from $CUDA_HOME/bin, /usr/local/cuda/bin, PATH,
    or the copy Triton ships."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            p = Path(home) / "bin" / name
            if p.exists() and os.access(p, os.X_OK):
                return str(p)
    w = shutil.which(name)
    if w:
        return w
    return _triton_bin(name)


def _find_tool(name: str) -> str | None:
    """:func:`find_tool` as the package exports it, looked up at each call, so that replacing
    ``sparsefast.kernel_report.find_tool`` (the tests do) reaches every report, as it did when the report
    was one module."""
    pkg = sys.modules.get(__package__ or "")
    return getattr(pkg, "find_tool", find_tool)(name)


def _run(cmd: Sequence[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def demangle(names: Iterable[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (``c++filt`` / ``cu++filt``), identity where unavailable."""
    names = list(dict.fromkeys(names))
    tool = _find_tool("cu++filt") or _find_tool("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    try:
        res = _run([tool], input="\n".join(names) + "\n", timeout=60)
        outs = res.stdout.splitlines()
        if res.returncode == 0 and len(outs) == len(names):
            return dict(zip(names, outs))
    except Exception:  # noqa: BLE001
        pass
    return {n: n for n in names}


_SHORT = [(r"\(anonymous namespace\)::", ""), (r"\bsf::", ""), (r"__nv_bfloat16", "bf16"), (r"__half\b", "fp16"),
          (r"\bfloat\b", "fp32"), (r"\s+", ""), (r",", ", ")]


def short_name(demangled: str) -> str:
    """Readable kernel name: no namespaces / parameter list, short dtype names."""
    s = demangled
    # drop the parameter list: the last top-level "(...)"
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        c = s[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                if i > 0 and not s[:i].endswith("anonymous namespace"):
                    s = s[:i]
                break
    if s.startswith("void "):
        s = s[5:]
    for rx, rep in _SHORT:
        s = re.sub(rx, rep, s)
    return s


def cuobjdump_reads(cuobjdump: str, path: str, arch_flag: str | None = None,
                    timeout: float = 300) -> tuple[dict, dict, dict, str]:
    """(resource usage, SASS opcode counters, max threads, error text) of a cubin / object / .so."""
    a = ["-arch", arch_flag] if arch_flag else []
    errs = []
    res = _run([cuobjdump, "--dump-resource-usage", *a, path], timeout=timeout)
    if res.returncode != 0:
        errs.append(f"cuobjdump --dump-resource-usage: {res.stderr.strip()[:300]}")
    usage = parse_resource_usage(res.stdout)
    sres = _run([cuobjdump, "-sass", *a, path], timeout=timeout)
    if sres.returncode != 0:
        errs.append(f"cuobjdump -sass: {sres.stderr.strip()[:300]}")
    sass = parse_sass(sres.stdout)
    eres = _run([cuobjdump, "-elf", *a, path], timeout=timeout)
    threads = parse_elf_max_threads(eres.stdout) if eres.returncode == 0 else {}
    return usage, sass, threads, "; ".join(errs)
