"""Triton: ahead-of-time compiles of every ``aot_compile_configs()`` entry for each target, in child
processes without ``TRITON_INTERPRET`` (:func:`triton_report`), and the child-process entry point."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .expect import validate_expect
from .model import DEFAULT_ARCHS, ERROR, NOT_RUN, OK, SKIPPED, KernelResult, evaluate
from .parsers import (parse_resource_usage, parse_sass, ptx_features, sass_features, tensor_core_kind,
                      vector_load_count)
from .tools import _find_tool, _run

# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------
#: modules scanned for ``aot_compile_configs()`` (non-underscore modules of this package)
TRITON_PACKAGE = "sparsefast.backends.triton"


def default_triton_providers() -> list[str]:
    """``module:aot_compile_configs`` for every public module file of :data:`TRITON_PACKAGE`
    (found on disk, not imported here)."""
    pkg = Path(__file__).resolve().parents[1] / "backends" / "triton"
    out = []
    for f in sorted(pkg.glob("*.py")):
        if f.stem.startswith("_"):
            continue
        if re.search(r"^def aot_compile_configs\b", f.read_text(errors="replace"), re.M):
            out.append(f"{TRITON_PACKAGE}.{f.stem}:aot_compile_configs")
    return out


def _spec_fields(entry: Any) -> dict[str, Any]:
    """Normalize one ``aot_compile_configs()`` entry: a dict, a (Named)tuple
    ``(kernel, signature, constexprs[, options[, attrs[, name]]])`` or an object with those
    attributes; ``expect`` from a key / field / attribute."""
    keys = ("kernel", "signature", "constexprs", "options", "attrs", "name", "expect")
    if isinstance(entry, Mapping):
        d = {k: entry.get(k) for k in keys}
    elif isinstance(entry, tuple) and not hasattr(entry, "_fields"):
        d = dict(zip(keys, entry))
    else:
        d = {k: getattr(entry, k, None) for k in keys}
        if d["kernel"] is None and isinstance(entry, tuple):
            d.update(zip(keys, entry))
    if d["kernel"] is None or d["signature"] is None:
        raise ValueError(f"aot_compile_configs() entry without kernel/signature: {entry!r}"[:300])
    return d


def _kernel_name(kernel: Any) -> str:
    for a in ("__name__", "fn"):
        v = getattr(kernel, a, None)
        if isinstance(v, str):
            return v
        if v is not None and hasattr(v, "__name__"):
            return v.__name__
    return str(kernel)


def _config_label(d: dict[str, Any]) -> str:
    if d.get("name"):
        return str(d["name"])
    ce = d.get("constexprs") or {}
    opts = d.get("options") or {}
    parts = [f"{k}={v}" for k, v in ce.items()]
    parts += [f"w{opts['num_warps']}"] if "num_warps" in opts else []
    parts += [f"s{opts['num_stages']}"] if "num_stages" in opts else []
    return " ".join(parts)


def _compile_triton_one(d: dict[str, Any], arch: int, cuobjdump: str | None, keep_dir: str | None,
                        sass: bool = False) -> dict:
    """Compile one spec for one target in this (non-interpreting) process: the measured fields.
    ``sass``: also disassemble the cubin (``cuobjdump -sass``, ~0.3 s CPU per kernel) for SASS
    instruction counts (STL/LDL, LDG.E.128, HMMA/HGMMA); without it instructions come from the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=d["kernel"], signature=d["signature"], constexprs=d.get("constexprs") or {},
                    attrs=d.get("attrs") or {})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(d.get("options") or {}))
    md = k.metadata
    ptx = k.asm.get("ptx", "")
    cubin = k.asm.get("cubin")
    out: dict[str, Any] = dict(threads=md.num_warps * 32, dyn_smem=int(md.shared), ptx=ptx_features(ptx))
    if keep_dir:
        base = Path(keep_dir) / f"{md.name}_sm{arch}_{md.hash[:10]}"
        base.with_suffix(".ptx").write_text(ptx)
        if cubin:
            base.with_suffix(".cubin").write_bytes(cubin)
    if cubin and cuobjdump:
        with tempfile.TemporaryDirectory() as td:
            p = os.path.join(td, "k.cubin")
            with open(p, "wb") as f:
                f.write(cubin)
            res = _run([cuobjdump, "--dump-resource-usage", p], timeout=120)
            usage = parse_resource_usage(res.stdout)
            ops = None
            if sass:
                sres = _run([cuobjdump, "-sass", p], timeout=300)
                by_fn = parse_sass(sres.stdout)
                ops = by_fn.get(md.name) or (next(iter(by_fn.values())) if len(by_fn) == 1 else None)
        u = usage.get(md.name) or (next(iter(usage.values())) if len(usage) == 1 else None)
        if u:
            out.update(regs=u.get("REG"), local_bytes=u.get("STACK", 0) + u.get("LOCAL", 0),
                       static_smem=u.get("SHARED", 0))
        else:
            out["note"] = f"cuobjdump read no resource usage: {res.stderr.strip()[:200]}"
        if ops is not None:
            out["sass"] = sass_features(ops)
    elif not cuobjdump:
        out["note"] = "no cuobjdump: registers unknown (PTX only)"
    return out


def _error_lines(text: str, limit: int = 4) -> str:
    """The informative lines of a compiler's output (no IR dumps)."""
    keep = []
    for ln in text.splitlines():
        s = ln.strip()
        if not s or s.startswith(("%", "tt.", "^bb", "scf.", "arith.", "}", "{")):
            continue
        if re.search(r"\berror\b|LLVM ERROR|Assertion|failed|Illegal|out of resource", s, re.I):
            keep.append(s[:300])
    return " | ".join(list(dict.fromkeys(keep))[:limit])


class _Capture:
    """Redirect this process's fd 1 and 2 (Triton and its MLIR/LLVM passes print there) into a temp
    file for the duration of a compile; ``text`` is what was printed."""

    def __enter__(self) -> "_Capture":
        sys.stdout.flush()
        sys.stderr.flush()
        self._f = tempfile.TemporaryFile(mode="w+b")
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self._f.fileno(), 1)
        os.dup2(self._f.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        os.close(self._saved[0])
        os.close(self._saved[1])
        self._f.seek(0)
        self.text = self._f.read().decode(errors="replace")
        self._f.close()


def _label(prov: str, d: dict[str, Any]) -> str:
    """The string ``--select`` / ``--exclude`` match: ``"<provider> <kernel> [<config label>]"``."""
    return f"{prov} {_kernel_name(d['kernel'])} [{_config_label(d)}]"


def _triton_tasks(providers: Sequence[str], archs: Sequence[int], select: str | None,
                  exclude: str | None) -> tuple[list[tuple], list[dict]]:
    """Import the providers: ([(prov, spec dict, expect, expect errors, arch)], [error rows])."""
    import importlib

    tasks, errors = [], []
    for prov in providers:
        mod_name, _, fn_name = prov.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name or "aot_compile_configs")
            entries = list(fn())
        except Exception as e:  # noqa: BLE001
            errors.append(dict(kernel=mod_name.rsplit(".", 1)[-1], source=prov, status=ERROR,
                               detail=f"{prov} failed: {type(e).__name__}: {e}"))
            continue
        for i, entry in enumerate(entries):
            try:
                d = _spec_fields(entry)
            except Exception as e:  # noqa: BLE001
                errors.append(dict(kernel="?", config=f"entry {i}", source=prov, status=ERROR, detail=str(e)))
                continue
            lab = _label(prov, d)
            if select and not re.search(select, lab):
                continue
            if exclude and re.search(exclude, lab):
                continue
            exp, errs = validate_expect(d.get("expect"))
            for arch in archs:
                if exp.get("archs") and arch not in exp["archs"]:
                    continue
                tasks.append((prov, d, exp, errs, arch))
    return tasks, errors


def _triton_worker(providers: Sequence[str], archs: Sequence[int], shard: int, nshards: int, out_path: str,
                   keep_dir: str | None, skip: set[int], select: str | None = None, exclude: str | None = None,
                   sass: bool = False) -> int:
    """Child process: enumerate the tasks (every provider entry x target), compile those with
    ``index % nshards == shard`` not in ``skip``; append JSON lines to ``out_path``:
    ``{"event": "tasks", "mine": [...]}`` first, then ``{"event": "start", "task": i}`` before and the
    row (with ``"task": i``) after each compile, so the parent can tell which compile crashed."""
    def emit(obj: dict) -> None:
        with open(out_path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        emit(dict(event="tasks", mine=[]))
        emit(dict(kernel="(all)", status=ERROR, detail="worker runs with TRITON_INTERPRET set"))
        return 1
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        emit(dict(event="tasks", mine=[]))
        if shard == 0:
            emit(dict(kernel="(all)", source=",".join(providers), status=SKIPPED,
                      detail=f"triton is not importable: {type(e).__name__}: {e}"))
        return 0
    cuobjdump = _find_tool("cuobjdump")
    tasks, errors = _triton_tasks(providers, archs, select, exclude)
    mine = [i for i in range(len(tasks)) if i % nshards == shard and i not in skip]
    emit(dict(event="tasks", mine=mine, total=len(tasks)))
    if shard == 0 and not skip:
        for e in errors:
            emit(e)
    for t_i in mine:
        prov, d, exp, errs, arch = tasks[t_i]
        row = dict(task=t_i, kernel=_kernel_name(d["kernel"]), config=_config_label(d), source=prov, arch=arch,
                   expect=exp, expect_errors=errs, status=OK)
        emit(dict(event="start", task=t_i, kernel=row["kernel"], config=row["config"], arch=arch, source=prov))
        t0 = time.time()
        cap = _Capture()
        try:
            with cap:
                row.update(_compile_triton_one(d, arch, cuobjdump, keep_dir, sass=sass))
        except Exception as e:  # noqa: BLE001
            lines = _error_lines(cap.text)
            msg = f"{type(e).__name__}: {e}"
            missing = re.search(r"(ptxas|cuda\.h|libdevice).{0,80}(not found|cannot find|no such file)", msg, re.I | re.S)
            row.update(status=SKIPPED if missing else ERROR,
                       detail=(f"{'tool missing' if missing else 'compile failed'} for sm_{arch}: {msg}"
                               + (f" [{lines}]" if lines else ""))[:4000])
        row["seconds"] = round(time.time() - t0, 2)
        emit(row)
    return 0


#: loads this package by path (its ``__init__.py`` is ``sys.argv[1]``) as ``_sparsefast_kernel_report``
_WORKER_BOOT = ("import os, sys, importlib.util as u\n"
                "s = u.spec_from_file_location('_sparsefast_kernel_report', sys.argv[1],\n"
                "                              submodule_search_locations=[os.path.dirname(sys.argv[1])])\n"
                "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
                "sys.exit(m._worker_main(sys.argv[2:]))\n")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by a crash
    return out


def triton_report(archs: Sequence[int] = DEFAULT_ARCHS, providers: Sequence[str] | None = None,
                  jobs: int | None = None, timeout: float = 1800, keep_dir: str | None = None,
                  select: str | None = None, exclude: str | None = None, sass: bool = False,
                  max_restarts: int = 20) -> list[KernelResult]:
    """AOT-compile every entry of every provider (``"module:function"`` returning the
    ``aot_compile_configs()`` list; default :func:`default_triton_providers`) for each target in
    ``archs``, in ``jobs`` child processes without ``TRITON_INTERPRET``.

    ``select`` / ``exclude``: regexes (``re.search``) on ``"<provider> <kernel> [<config label>]"``
    (e.g. ``exclude=r"\b(fp32|fp16)\b"``). ``keep_dir`` keeps the PTX and cubins. ``sass`` adds SASS counts. A
    compile that kills its worker (an LLVM abort) becomes that row's error and the worker restarts
    after it; ``timeout`` bounds the whole run (unfinished compiles become error rows). Never raises
    for a kernel's failure: that is the row's status."""
    providers = list(providers if providers is not None else default_triton_providers())
    if not providers:
        return [evaluate(KernelResult("triton", 0, "(none)", status=SKIPPED,
                                      detail=f"no module of {TRITON_PACKAGE} defines aot_compile_configs()"))]
    jobs = max(1, jobs or min(4, os.cpu_count() or 1))
    rows: list[dict] = []
    deadline = time.time() + timeout
    with tempfile.TemporaryDirectory(prefix="sf-kreport-") as td:
        def launch(shard: int, attempt: int, skip: set[int]):
            out = os.path.join(td, f"shard{shard}.{attempt}.jsonl")
            skip_file = os.path.join(td, f"skip{shard}.{attempt}.json")
            Path(skip_file).write_text(json.dumps(sorted(skip)))
            # run this package by path (not ``-m sparsefast...``): the worker itself needs no package import
            cmd = [sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).resolve().with_name("__init__.py")),
                   "--out", out, "--archs", ",".join(map(str, archs)), "--shard", str(shard),
                   "--nshards", str(jobs),
                   "--providers", ",".join(providers), "--skip-file", skip_file]
            cmd += ["--keep", keep_dir] if keep_dir else []
            cmd += ["--select", select] if select else []
            cmd += ["--exclude", exclude] if exclude else []
            cmd += ["--sass"] if sass else []
            log_path = os.path.join(td, f"shard{shard}.{attempt}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT, cwd=td)
            return dict(proc=proc, out=out, log=log_path, shard=shard, attempt=attempt, skip=set(skip))

        running = [launch(s, 0, set()) for s in range(jobs)]
        while running:
            time.sleep(0.2)
            for w in list(running):
                rc = w["proc"].poll()
                timed_out = rc is None and time.time() > deadline
                if rc is None and not timed_out:
                    continue
                if timed_out:
                    w["proc"].kill()
                    w["proc"].wait()
                    rc = w["proc"].returncode
                running.remove(w)
                lines = _read_jsonl(w["out"])
                head = next((x for x in lines if x.get("event") == "tasks"), None)
                done = {x["task"] for x in lines if "task" in x and "event" not in x}
                started = [x for x in lines if x.get("event") == "start"]
                rows.extend(x for x in lines if "event" not in x)
                if rc == 0 and not timed_out:
                    continue
                log_tail = _error_lines(Path(w["log"]).read_text(errors="replace")) or \
                    Path(w["log"]).read_text(errors="replace")[-600:].strip()
                crashed = [x for x in started if x["task"] not in done]
                for x in crashed:
                    if timed_out:
                        rows.append(dict(task=x["task"], kernel=x["kernel"], config=x["config"], source=x["source"],
                                         arch=x["arch"], status=NOT_RUN,
                                         detail=f"not compiled: the {timeout:.0f} s budget ran out during it"))
                        continue
                    sig = ""
                    if rc is not None and rc < 0:
                        import signal
                        try:
                            sig = f", {signal.Signals(-rc).name}"
                        except ValueError:
                            pass
                    why = f"the compiler crashed (worker exit {rc}{sig})" + (f": {log_tail}" if log_tail else "")
                    rows.append(dict(task=x["task"], kernel=x["kernel"], config=x["config"], source=x["source"],
                                     arch=x["arch"], status=ERROR, detail=why[:4000]))
                mine = set(head["mine"]) if head else set()
                left = mine - done - {x["task"] for x in crashed}
                if timed_out:
                    if left or head is None:
                        rows.append(dict(kernel="(worker)", config=f"shard {w['shard']}", status=NOT_RUN,
                                         detail=(f"{len(left)} compiles not run: the {timeout:.0f} s budget ran out"
                                                 if head else "the time budget ran out before the kernels were listed")))
                    continue
                if head is None:
                    rows.append(dict(kernel="(worker)", config=f"shard {w['shard']}", status=ERROR,
                                     detail=f"compile worker failed before listing its kernels (exit {rc}): "
                                            f"{log_tail}"[:4000]))
                    continue
                if left and w["attempt"] < max_restarts:
                    running.append(launch(w["shard"], w["attempt"] + 1,
                                          w["skip"] | done | {x["task"] for x in crashed}))
                elif left:
                    rows.append(dict(kernel="(worker)", config=f"shard {w['shard']}", status=ERROR,
                                     detail=f"{len(left)} compiles not run: worker crashed {max_restarts + 1} times"))
    results = []
    for r in rows:
        kr = KernelResult("triton", int(r.get("arch", 0)), r.get("kernel", "?"), config=r.get("config", ""),
                          source=r.get("source", ""), status=r.get("status", ERROR), detail=r.get("detail", ""))
        for f in ("regs", "local_bytes", "static_smem", "dyn_smem", "threads", "sass", "ptx", "seconds"):
            if r.get(f) is not None:
                setattr(kr, f, r[f])
        kr.expect = r.get("expect") or {}
        if kr.ptx or kr.sass:
            kr.tensor_core = tensor_core_kind(kr.sass, kr.ptx)
            kr.vector_loads = vector_load_count(kr.sass, kr.ptx)
        if r.get("note"):
            kr.detail = (kr.detail + " " + r["note"]).strip()
        results.append(evaluate(kr, r.get("expect_errors") or ()))
    order = {a: i for i, a in enumerate(archs)}
    results.sort(key=lambda x: (x.source, order.get(x.arch, 99), x.kernel, x.config))
    return results


# ------------------------------------------------------------------------------------------------
# child-process entry point
# ------------------------------------------------------------------------------------------------
def _worker_main(argv: Sequence[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="sparsefast.kernel_report worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", required=True)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--nshards", type=int, default=1)
    ap.add_argument("--providers", required=True)
    ap.add_argument("--skip-file", default=None)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--select", default=None)
    ap.add_argument("--exclude", default=None)
    ap.add_argument("--sass", action="store_true")
    a = ap.parse_args(argv)
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
    skip = set(json.loads(Path(a.skip_file).read_text())) if a.skip_file else set()
    return _triton_worker([p for p in a.providers.split(",") if p], [int(x) for x in a.archs.split(",")],
                          a.shard, a.nshards, a.out, a.keep, skip, a.select, a.exclude, a.sass)
