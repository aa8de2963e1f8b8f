"""CUDA (``csrc/*.cu``): ``nvcc -cubin -Xptxas -v`` per target (:func:`cuda_report`), or ``cuobjdump``
on already built binaries (:func:`cuda_objects_report`); expectations from ``// kernel-report:`` lines."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .expect import match_annotations, parse_annotations, validate_expect
from .model import DEFAULT_ARCHS, ERROR, SKIPPED, KernelResult, evaluate
from .parsers import (parse_ptxas_verbose, ptx_features, ptx_functions, sass_features, tensor_core_kind,
                      vector_load_count)
from .tools import _find_tool, _run, cuobjdump_reads, demangle, short_name

# ------------------------------------------------------------------------------------------------
# CUDA (csrc)
# ------------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _gencode(arch: int) -> tuple[str, str]:
    """(nvcc -gencode value, cuobjdump -arch name): sm_90 -> sm_90a (wgmma / setmaxnreg need it)."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    comp = f"compute_{arch}a" if arch >= 90 else f"compute_{arch}"
    return f"arch={comp},code={sm}", sm


def csrc_annotations(csrc: Path) -> list[tuple[str, dict, str]]:
    """Every ``// kernel-report:`` line under ``csrc`` (``*.cu``, ``*.cuh``, ``*.h``; not ``cpu/``)."""
    out = []
    for f in sorted(csrc.rglob("*")):
        if f.suffix in (".cu", ".cuh", ".h", ".hpp") and "cpu" not in f.relative_to(csrc).parts[:-1]:
            out += parse_annotations(f.read_text(errors="replace"), str(f.relative_to(csrc.parent)))
    return out


def _build_settings(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """(.cu sources, include dirs, nvcc flags) as :mod:`sparsefast._build_cuda` builds them."""
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_sf_build_cuda_report", root / "sparsefast" / "_build_cuda.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        srcs = [Path(s) for s in mod.sources(root) if s.endswith(".cu")]
        return srcs, list(mod.include_dirs(root)), [f for f in mod.NVCC_FLAGS if f != "-lineinfo"]
    except Exception:  # noqa: BLE001
        return (sorted((root / "csrc").glob("*.cu")), [str(root / "csrc" / "include")],
                ["-O3", "-std=c++17", "--expt-relaxed-constexpr"])


def _needs_torch(src: Path) -> bool:
    return re.search(r"#\s*include\s*[<\"](torch|ATen|c10)/", src.read_text(errors="replace")) is not None


def _rows_from_binary(backend_src: str, config: str, arch: int, usage: dict, sass: dict, threads: dict,
                      ptx_by_fn: dict[str, dict], ptxas: dict, annotations, note: str = "") -> list[KernelResult]:
    names = sorted(set(usage) | set(sass))
    dem = demangle(names)
    anon_notes = list((ptxas.get("") or {}).get("wgmma_serialized", []))
    rows = []
    for n in names:
        u = usage.get(n, {})
        full = dem.get(n, n)
        exp, rx_errs = match_annotations(annotations, short_name(full))
        if exp == {} and full != n:
            exp, rx_errs = match_annotations(annotations, full)
        exp, errs = validate_expect(exp)
        if exp.get("archs") and arch not in exp["archs"]:
            # e.g. an sm_90-only kernel whose sm_80 build is an empty stub: report it, check nothing
            exp = {k: v for k, v in exp.items() if k in ("threads", "dyn_smem")}
        kr = KernelResult("cuda", arch, short_name(full), config=config, source=backend_src)
        kr.regs = u.get("REG")
        kr.local_bytes = u.get("STACK", 0) + u.get("LOCAL", 0) if u else None
        kr.static_smem = u.get("SHARED")
        kr.threads = threads.get(n)
        pv = ptxas.get(n)
        if pv:
            kr.spill_stores, kr.spill_loads = pv.get("spill_stores"), pv.get("spill_loads")
            if kr.regs is None:
                kr.regs = pv.get("regs")
            kr.wgmma_serialized = list(pv.get("wgmma_serialized", []))
        if n in sass:
            kr.sass = sass_features(sass[n])
        if n in ptx_by_fn:
            kr.ptx = ptx_by_fn[n]
        kr.tensor_core = tensor_core_kind(kr.sass, kr.ptx)
        kr.vector_loads = vector_load_count(kr.sass, kr.ptx)
        if anon_notes and (kr.tensor_core or "").startswith("wgmma"):
            kr.wgmma_serialized += anon_notes  # a note naming no function: every wgmma kernel of the file
        kr.expect = exp
        kr.detail = note
        rows.append(evaluate(kr, rx_errs + errs))
    if anon_notes and not any(r.wgmma_serialized for r in rows):
        rows.append(evaluate(KernelResult("cuda", arch, "(ptxas)", config=config, source=backend_src,
                                          wgmma_serialized=anon_notes)))
    return rows


def cuda_report(archs: Sequence[int] = DEFAULT_ARCHS, root: Path | None = None, jobs: int | None = None,
                nvcc: str | None = None, keep_dir: str | None = None, timeout: float = 900) -> list[KernelResult]:
    """Compile each csrc ``.cu`` with ``nvcc -cubin -Xptxas -v`` per target (``sm_80``, ``sm_90a``) and
    report every kernel in it. One row per (file, target) with status ``skipped`` when nvcc or
    cuobjdump is missing, ``error`` when the compile fails."""
    root = Path(root) if root is not None else _repo_root()
    csrc = root / "csrc"
    srcs, incs, flags = _build_settings(root)
    srcs = [s for s in srcs if s.exists()]
    if not srcs:
        return [evaluate(KernelResult("cuda", 0, "(none)", source=str(csrc), status=SKIPPED,
                                      detail="no csrc/*.cu sources"))]
    nvcc = nvcc or _find_tool("nvcc")
    cuobjdump = _find_tool("cuobjdump")
    annotations = csrc_annotations(csrc) if csrc.exists() else []
    rel = lambda s: os.path.relpath(s, root)  # noqa: E731
    if nvcc is None or cuobjdump is None:
        why = "nvcc not found (set CUDA_HOME)" if nvcc is None else "cuobjdump not found (CUDA toolkit or triton)"
        return [evaluate(KernelResult("cuda", a, "(all kernels)", config=s.name, source=rel(s), status=SKIPPED,
                                      detail=why)) for s in srcs for a in archs]
    extra_inc: list[str] = []
    if any(_needs_torch(s) for s in srcs):
        try:
            from torch.utils.cpp_extension import include_paths
            extra_inc = list(include_paths())
        except Exception:  # noqa: BLE001
            extra_inc = []

    def one(src: Path, arch: int) -> list[KernelResult]:
        gen, sm = _gencode(arch)
        with tempfile.TemporaryDirectory(prefix="sf-nvcc-") as td:
            cubin = os.path.join(td, f"{src.stem}.{sm}.cubin")
            cmd = [nvcc, "-cubin", f"-gencode={gen}", *flags, *[f"-I{i}" for i in incs + extra_inc],
                   "-Xptxas", "-v", "--keep", "--keep-dir", td, "-o", cubin, str(src)]
            try:
                res = _run(cmd, timeout=timeout, cwd=td)
            except subprocess.TimeoutExpired:
                return [evaluate(KernelResult("cuda", arch, "(all kernels)", config=src.name, source=rel(src),
                                              status=ERROR, detail=f"nvcc timed out after {timeout:.0f} s"))]
            if res.returncode != 0:
                err = res.stderr.strip()
                if _needs_torch(src) and re.search(r"(ATen|c10)/cuda|cuda_runtime_api|torch/.*No such file", err):
                    return [evaluate(KernelResult(
                        "cuda", arch, "(all kernels)", config=src.name, source=rel(src), status=SKIPPED,
                        detail="includes torch CUDA headers that this torch (CPU build) lacks; report the built "
                               "extension instead: --cuda-objects <dir or .so>"))]
                errs = [ln for ln in err.splitlines() if "error" in ln.lower()] or err.splitlines()[-5:]
                return [evaluate(KernelResult("cuda", arch, "(all kernels)", config=src.name, source=rel(src),
                                              status=ERROR, detail="nvcc failed: " + " | ".join(errs[:5])[:2000]))]
            ptxas = parse_ptxas_verbose(res.stderr + res.stdout)
            ptx_by_fn: dict[str, dict] = {}
            for p in Path(td).glob("*.ptx"):
                for name, body in ptx_functions(p.read_text(errors="replace")).items():
                    ptx_by_fn[name] = ptx_features(body)
            if keep_dir:
                Path(keep_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(cubin, Path(keep_dir) / Path(cubin).name)
                for p in Path(td).glob("*.ptx"):
                    shutil.copy(p, Path(keep_dir) / f"{src.stem}.{sm}.ptx")
            usage, sass, threads, err = cuobjdump_reads(cuobjdump, cubin)
            return _rows_from_binary(rel(src), src.name, arch, usage, sass, threads, ptx_by_fn, ptxas,
                                     annotations, err)

    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as ex:
        futs = [ex.submit(one, s, a) for s in srcs for a in archs]
        out = [r for f in futs for r in f.result()]
    return out


def cuda_objects_report(path: str | os.PathLike, archs: Sequence[int] = DEFAULT_ARCHS,
                        root: Path | None = None) -> list[KernelResult]:
    """Report the kernels of already built CUDA binaries: ``path`` is a ``.so``/``.o``/``.fatbin``/
    ``.cubin``, or a directory searched for them (its ``.so`` files when it has any, else its ``.o``,
    ``.fatbin``, ``.cubin`` files). Uses ``cuobjdump`` only (no spill byte counts: local memory and
    ``STL``/``LDL`` stand in). A library or object without code for a requested target is an error; a
    cubin is reported for its own target only. Expectations from the ``// kernel-report:`` lines of
    ``root/csrc``."""
    root = Path(root) if root is not None else _repo_root()
    p = Path(path)
    if p.is_dir():
        found = [f for f in sorted(p.rglob("*")) if f.is_file()]
        files = [f for f in found if f.suffix == ".so"] or \
            [f for f in found if f.suffix in (".o", ".fatbin", ".cubin")]
    else:
        files = [p] if p.exists() else []
    if not files:
        return [evaluate(KernelResult("cuda", 0, "(none)", source=str(p), status=ERROR,
                                      detail=f"no .so/.o/.fatbin/.cubin found at {p}"))]
    annotations = csrc_annotations(root / "csrc") if (root / "csrc").exists() else []
    cuobjdump = _find_tool("cuobjdump")
    if cuobjdump is None:
        return [evaluate(KernelResult("cuda", a, "(all kernels)", config=f.name, source=str(f), status=SKIPPED,
                                      detail="cuobjdump not found (CUDA toolkit or triton)"))
                for f in files for a in archs]
    out: list[KernelResult] = []
    for f in files:
        listing = _run([cuobjdump, "--list-elf", str(f)], timeout=120)
        # nvcc 13 lists an sm_90a cubin inside a fatbinary as "<name>.N.sm_90.cubin", a bare cubin as "sm_90a"
        present = {int(x) for x in re.findall(r"\.sm_(\d+)a?\.cubin", listing.stdout)}
        bare = f.suffix == ".cubin"
        for arch in archs:
            if arch not in present:
                if not bare:
                    why = (f"cuobjdump cannot read {f.name}: {listing.stderr.strip()[:200]}" if listing.returncode
                           else f"no sm_{arch} code in {f.name} (has: "
                                f"{', '.join(f'sm_{a}' for a in sorted(present)) or 'none'})")
                    out.append(evaluate(KernelResult("cuda", arch, "(all kernels)", config=f.name, source=str(f),
                                                     status=ERROR, detail=why)))
                continue
            rows: list[KernelResult] = []
            err = ""
            for flag in ((None,) if bare else (f"sm_{arch}a", f"sm_{arch}") if arch >= 90 else (f"sm_{arch}",)):
                usage, sass, threads, err = cuobjdump_reads(cuobjdump, str(f), flag)
                rows = _rows_from_binary(str(f), f.name, arch, usage, sass, threads, {}, {}, annotations, err)
                if rows:
                    break
            out.extend(rows or [evaluate(KernelResult("cuda", arch, "(all kernels)", config=f.name, source=str(f),
                                                      status=ERROR, detail=f"no kernels read for sm_{arch}. {err}"))])
        if bare and not present & set(archs):
            out.append(evaluate(KernelResult("cuda", 0, "(all kernels)", config=f.name, source=str(f), status=SKIPPED,
                                              detail=f"{f.name} is for {', '.join(f'sm_{a}' for a in sorted(present)) or 'an unknown target'}, "
                                                     f"not a requested one")))
    return out
