"""Compile every GPU kernel ahead of time (no GPU needed): registers, spills, smem, occupancy, MMA.

``python -m sparsefast kernels --report`` AOT-compiles every Triton kernel in every autotune config
(the ``aot_compile_configs()`` of each module of ``sparsefast.backends.triton``) and every csrc CUDA
kernel (``nvcc -Xptxas -v``) for sm_80 and sm_90 / sm_90a, and prints per kernel and target: registers,
spill bytes, shared memory, estimated occupancy on A100 / H100, the tensor-core instruction found
(mma / mma.sp / wgmma / wgmma.sp) and the number of 128-bit global loads, checked against each kernel's
``expect`` (format: :mod:`sparsefast.kernel_report`). Exit status 1 when a check fails (a spill in a hot
kernel, a missing tensor-core instruction, a compile error); a missing compiler is a per-row status.

``--list`` prints the Triton entries without compiling them.
"""
from __future__ import annotations

import argparse
import sys
import time


def _archs(text: str) -> list[int]:
    out = []
    for tok in text.replace(";", ",").split(","):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("sm").rstrip("a")
        if not tok:
            continue
        if not tok.isdigit():
            raise argparse.ArgumentTypeError(f"bad arch {tok!r}: use e.g. 80,90")
        out.append(int(tok))
    if not out:
        raise argparse.ArgumentTypeError("no arch given")
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sparsefast kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="compile and report (the default action)")
    ap.add_argument("--list", action="store_true", help="list the Triton kernel entries without compiling")
    ap.add_argument("--only", choices=("triton", "cuda"), help="one backend only (default: both)")
    ap.add_argument("--arch", type=_archs, default=[80, 90], help="targets, e.g. 80,90 (default) or 90")
    ap.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    ap.add_argument("--cuda-objects", metavar="DIR_OR_SO",
                    help="report the kernels of already built CUDA binaries (.so/.o/.cubin or a directory) "
                         "with cuobjdump instead of compiling csrc/ with nvcc")
    ap.add_argument("--providers", metavar="MOD:FN,...",
                    help="Triton spec providers (default: every sparsefast.backends.triton module with "
                         "aot_compile_configs)")
    ap.add_argument("--select", metavar="REGEX",
                    help="Triton: only entries whose '<provider> <kernel> [<config label>]' matches (re.search)")
    ap.add_argument("--exclude", metavar="REGEX", help=r"Triton: skip entries matching this (e.g. '\b(fp32|fp16)\b')")
    ap.add_argument("--sass", action="store_true",
                    help="Triton: also disassemble each cubin for SASS counts (STL/LDL, LDG.E.128; ~0.3 s each)")
    ap.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile processes (default: cores, max 4)")
    ap.add_argument("--keep", metavar="DIR", help="keep the PTX and cubins here")
    ap.add_argument("--require-compiled", action="store_true",
                    help="exit 1 also when a kernel could not be compiled for lack of a tool (CI)")
    ap.add_argument("--strict", action="store_true", help="exit 1 on warnings and on compiles not run for time")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="time budget in seconds for the Triton compiles (default 1800); what is left when it "
                         "runs out is listed as not run")
    ap.add_argument("--width", type=int, default=60, help="kernel-name column width")
    return ap


def _list(providers: list[str] | None) -> int:
    """Print the entries each provider returns, in a child process without TRITON_INTERPRET."""
    import json
    import subprocess

    from .. import kernel_report as kr

    provs = providers or kr.default_triton_providers()
    code = (
        "import importlib, json, sys\n"
        "from sparsefast import kernel_report as kr\n"
        "for prov in sys.argv[1:]:\n"
        "    m, _, f = prov.partition(':')\n"
        "    try:\n"
        "        entries = list(getattr(importlib.import_module(m), f or 'aot_compile_configs')())\n"
        "    except Exception as e:\n"
        "        print(json.dumps([prov, 'ERROR', f'{type(e).__name__}: {e}'])); continue\n"
        "    for e in entries:\n"
        "        d = kr._spec_fields(e)\n"
        "        print(json.dumps([prov, kr._kernel_name(d['kernel']), kr._config_label(d), d.get('expect') or {}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, *provs], env=kr._clean_env(), capture_output=True, text=True)
    n = 0
    for line in res.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        n += 1
        print("  ".join(str(x) for x in row))
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"{n} entries from {len(provs)} provider(s)")
    return 0


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    from .. import kernel_report as kr

    providers = [p for p in a.providers.split(",") if p] if a.providers else None
    if a.list:
        return _list(providers)
    t0 = time.time()
    results: list = []
    if a.only in (None, "triton"):
        results += kr.triton_report(a.arch, providers=providers, jobs=a.jobs, timeout=a.timeout, keep_dir=a.keep,
                                    select=a.select, exclude=a.exclude, sass=a.sass)
    if a.only in (None, "cuda"):
        if a.cuda_objects:
            results += kr.cuda_objects_report(a.cuda_objects, a.arch)
        else:
            results += kr.cuda_report(a.arch, jobs=a.jobs, keep_dir=a.keep)
    print(kr.format_table(results, width=a.width))
    s = kr.summary(results)
    print(f"\n{s['rows']} rows: {s['ok']} ok, {s['warn']} warn, {s['fail']} FAIL, {s['skip']} skipped "
          f"({s['compiled']} compiled, {s['missing_tool']} missing a tool, {s['not_run']} not run for time) "
          f"for sm_{', sm_'.join(map(str, a.arch))} in {time.time() - t0:.0f} s")
    if a.json:
        kr.to_json(results, a.arch, a.json)
        print(f"JSON: {a.json}")
    return kr.exit_code(results, require_compiled=a.require_compiled, strict=a.strict)
