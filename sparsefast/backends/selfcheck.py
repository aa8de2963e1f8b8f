"""First-use self-checks of GPU kernel families (one mechanism for every kernel backend).

A backend declares its **families** (:meth:`Backend.self_check_families`): each a :class:`Family` with a name,
the predicate on an :class:`~sparsefast.backends.base.OpQuery` that selects it (op, pattern type, dtype,
size class), and a small check problem (:class:`Problem`: which primitive, shapes, mask) that is run through
the backend's own kept-values primitives and compared with the float64 reference at the backend's declared
``tolerances``. Before a call is first routed to a backend, the registry asks :func:`gate`: every family the
call selects must have passed on that device and dtype; a family not yet checked there is checked now.

* **Lazily, once.** Results are cached in memory per (backend, family, variant, device, dtype) and passes
  also on disk: ``$SPARSEFAST_CACHE_DIR/selfcheck.json``, else ``~/.cache/sparsefast/selfcheck.json``,
  keyed by the device name, driver / CUDA version, torch / triton / sparsefast versions and a fingerprint
  of the backend sources and compiled extensions (so an edited kernel is checked again). A corrupt or
  unwritable cache file is ignored. Failures are cached in memory only: a new process checks again (a
  fixed driver or package takes effect, a transient error does not disable a family for good).
* **A failed family** warns once (family, device, dtype, error), ``auto`` skips the backend for the calls
  that select it (the next backend runs them; ``explain()`` shows ``self-check failed (...)``) and an
  explicit request for it raises :class:`SelfCheckError` with the check's error: it never returns results.
  A family declared ``required=False`` is an optional fast path inside its backend (the CUDA backend's
  ``wgmma.sp`` kernels): failing only turns that path off.
* **Never during CUDA graph capture.** A check launches kernels and synchronizes; when a family still
  needs its check while the current stream is capturing, :func:`gate` raises :class:`SelfCheckCaptureError`
  (run one eager call before capture, or :func:`self_check` eagerly).
* ``SPARSEFAST_SELF_CHECK=0`` skips every lazy check (families are then trusted);
  ``SPARSEFAST_CUDA_SELFCHECK=0`` (the older name) skips the ``cuda`` backend's. :func:`self_check` runs
  the checks eagerly and returns the verdicts; :func:`main` (``python -m sparsefast.backends.selfcheck``)
  prints them as a table.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from .base import Backend, ConvParams, OpQuery, matmul_fp32_precision

__all__ = ["Family", "Problem", "Result", "SelfCheckError", "SelfCheckCaptureError", "gate", "self_check",
           "cache_path", "results", "ENV"]

#: ``SPARSEFAST_SELF_CHECK=0`` skips the lazy checks
ENV = "SPARSEFAST_SELF_CHECK"
_FORMAT = 1
_MAX_DISK_ENTRIES = 4000


class SelfCheckError(RuntimeError):
    """An explicitly requested kernel family failed its self-check on this device and dtype."""


class SelfCheckCaptureError(RuntimeError):
    """A kernel family needs its first-use self-check while a CUDA graph is being captured."""


@dataclass(frozen=True)
class Problem:
    """One small check of a primitive. ``prim``: ``"fwd"``, ``"dx"`` or ``"dw"``; ``weight_shape`` (N, K)
    for Linear, (O, C/g, kh, kw) for conv (``conv`` set); ``rows``: batch rows (Linear, the GEMM M) or the
    batch size (conv, input ``(rows, C, *hw)``). ``mask``: ``"magnitude"`` (top-|w| under the pattern) or
    ``"transposable"`` (N:M along both dims; conv: per kernel tap, so sparse dgrad paths run).
    ``pattern``: ``None`` takes the family's (or, for ``per_pattern`` families, the call's)."""

    prim: str
    weight_shape: tuple[int, ...]
    rows: int
    pattern: str | None = None
    conv: ConvParams | None = None
    hw: tuple[int, int] = (6, 5)
    mask: str = "magnitude"
    density: float | None = None
    bias: bool = True

    def describe(self) -> str:
        op = "conv" if self.conv is not None else "linear"
        rows = f"B={self.rows} hw={self.hw}" if self.conv is not None else f"M={self.rows}"
        return f"{op} {self.prim} weight {self.weight_shape} {rows}" + (
            f" ({self.mask} mask)" if self.mask != "magnitude" else "")


@dataclass(frozen=True)
class Family:
    """A kernel family of a backend (see the module docstring).

    ``selects(q)``: the calls that run this family's kernels (a call selects every family it may run:
    forward and both gradients). ``problems``: a sequence of :class:`Problem` or ``f(device, pattern) ->
    sequence`` (shapes that depend on the GPU, e.g. its SM count). ``pattern``: the pattern the problems
    use; with ``per_pattern`` the call's pattern instead (kernels specialised per N:M or block size: each
    pattern is checked, and cached, on its own). ``dtypes``: the dtypes it applies to (``None``: the
    backend's). ``skip(backend, device)``: a reason not to check it there (``None``: check), e.g. a GPU
    generation it does not run on. ``context(backend)``: entered around the check (to force the kernel
    path the family names). ``on_result(backend, device, dtype, ok)``: told each verdict (also from the
    disk cache). ``required=False``: an optional path inside the backend; failing turns it off only."""

    name: str
    selects: Callable[[OpQuery], bool]
    problems: "Sequence[Problem] | Callable[[torch.device, Any], Sequence[Problem]]"
    pattern: str = "2:4"
    per_pattern: bool = False
    dtypes: tuple[torch.dtype, ...] | None = None
    required: bool = True
    skip: Callable[[Backend, torch.device], str | None] | None = None
    context: Callable[[Backend], ContextManager] | None = None
    on_result: Callable[[Backend, torch.device, torch.dtype, bool], None] | None = None


@dataclass
class Result:
    ok: bool | None          # None: skipped
    error: str | None = None
    source: str = "run"      # "run", "disk", "skipped"
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(ok=self.ok, error=self.error, source=self.source, seconds=round(self.seconds, 3))


_LOCK = threading.RLock()
_MEM: dict[tuple, Result] = {}
_WARNED: set[tuple] = set()
_ENV_CACHE: dict[str, dict] = {}
_SRC_HASH: list[str] = []


# ------------------------------------------------------------------------------------------------
# environment, keys and the disk cache
# ------------------------------------------------------------------------------------------------
def _off(var: str) -> bool:
    return os.environ.get(var, "1").strip().lower() in ("0", "off", "false", "no")


def skipped_reason(backend: Backend) -> str | None:
    """Why the lazy checks of ``backend`` are skipped (environment), else ``None``."""
    if _off(ENV):
        return f"{ENV}=0"
    if backend.name == "cuda" and _off("SPARSEFAST_CUDA_SELFCHECK"):
        return "SPARSEFAST_CUDA_SELFCHECK=0"
    return None


def cache_path() -> Path:
    """The on-disk cache file: ``$SPARSEFAST_CACHE_DIR/selfcheck.json`` or ``~/.cache/sparsefast/selfcheck.json``."""
    d = os.environ.get("SPARSEFAST_CACHE_DIR")
    return Path(d if d else Path.home() / ".cache" / "sparsefast") / "selfcheck.json"


def _device(device: "torch.device | str | None") -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _source_hash() -> str:
    """Fingerprint of the backend sources and the compiled extensions (contents of the .py files, size and
    mtime of the binaries), so an edited or rebuilt kernel is checked again."""
    if not _SRC_HASH:
        root = Path(__file__).resolve().parent
        h = hashlib.sha1()
        for p in sorted(root.rglob("*.py")):
            with contextlib.suppress(OSError):
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        for p in sorted(root.parent.glob("_C*")):
            with contextlib.suppress(OSError):
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        _SRC_HASH.append(h.hexdigest()[:16])
    return _SRC_HASH[0]


def _pkg_version(name: str) -> str | None:
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:  # noqa: BLE001
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver release (NVML, e.g. "550.54.15"), else the driver's CUDA version from libcuda
    (e.g. "cuda-driver 12040"), else ``None``. Never raises."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001
        pass
    try:
        import ctypes

        v = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"cuda-driver {v.value}"
    except Exception:  # noqa: BLE001
        pass
    return None


def environment(device: torch.device) -> dict:
    """What a cached verdict depends on besides the family: device name, driver / CUDA, versions."""
    key = str(device)
    if key not in _ENV_CACHE:
        from .. import __version__
        env: dict[str, Any] = dict(torch=torch.__version__, triton=_pkg_version("triton"), sparsefast=__version__,
                                   sources=_source_hash())
        if device.type == "cuda":
            idx = device.index or 0
            cap = torch.cuda.get_device_capability(idx)
            env["device"] = f"{torch.cuda.get_device_name(idx)} sm_{cap[0]}{cap[1]}"
            env["cuda"] = torch.version.cuda
            env["driver"] = _driver_version()
        else:
            env["device"] = f"{device.type} {platform.machine()} {platform.processor()}".strip()
            env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
        _ENV_CACHE[key] = env
    return _ENV_CACHE[key]


def _dtype_label(device: torch.device, dtype: torch.dtype, precision: str | None) -> str:
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32 and device.type == "cuda":
        p = precision if precision is not None else matmul_fp32_precision()
        if p == "tf32":
            return name + "/tf32"
    return name


def _disk_key(device: torch.device, backend: str, fam: str, variant: str, label: str) -> str:
    env = json.dumps(environment(device), sort_keys=True)
    return "|".join((hashlib.sha1(env.encode()).hexdigest()[:16], backend, fam, variant, label))


def _read_disk() -> dict:
    """Entries of the cache file ({} when it is missing, unreadable or corrupt)."""
    try:
        data = json.loads(cache_path().read_text())
        ent = data.get("entries") if isinstance(data, dict) and data.get("format") == _FORMAT else None
        return ent if isinstance(ent, dict) else {}
    except Exception:  # noqa: BLE001 - a bad cache file is ignored
        return {}


def _write_disk(key: str, entry: dict) -> None:
    """Merge one entry into the cache file (atomic replace); any failure is ignored."""
    path = cache_path()
    try:
        ent = _read_disk()
        ent[key] = entry
        if len(ent) > _MAX_DISK_ENTRIES:
            ent = dict(sorted(ent.items(), key=lambda kv: str(kv[1].get("checked", "")))[-_MAX_DISK_ENTRIES:])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".selfcheck.", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": _FORMAT, "entries": ent}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except Exception:  # noqa: BLE001 - an unwritable cache only costs a re-check in the next process
        pass


# ------------------------------------------------------------------------------------------------
# running one family
# ------------------------------------------------------------------------------------------------
def _make_mask(shape: tuple, pattern, kind: str, density: float | None, g: torch.Generator) -> torch.Tensor:
    from .. import masks

    scores = torch.rand(shape, generator=g) + 0.01
    if kind == "transposable" and pattern.is_nm:
        n, m = pattern.n, pattern.m
        if len(shape) == 2 and shape[0] % m == 0 and shape[1] % m == 0:
            return masks.transposable_nm_mask(scores, n, m)
        if len(shape) == 4 and shape[0] % m == 0 and shape[1] % m == 0:
            taps = [masks.transposable_nm_mask(scores[:, :, i, j], n, m)
                    for i in range(shape[2]) for j in range(shape[3])]
            return torch.stack(taps, -1).reshape(shape)
    sparsity = None if pattern.is_nm else 1.0 - (0.5 if density is None else density)
    return masks.magnitude_mask(scores, pattern, sparsity)


def _compare(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> str | None:
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    out = out.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(out).all()):
        return f"{int((~torch.isfinite(out)).sum())} non-finite values of {out.numel()}"
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = (out - ref).abs()
    allowed = atol * scale + rtol * ref.abs()
    bad = err > allowed
    if bool(bad.any()):
        return (f"max abs error {float(err.max()):.3g} (allowed {atol * scale:.2g} + {rtol:.2g}*|ref|), "
                f"{int(bad.sum())} of {out.numel()} values out of tolerance")
    return None


def run_problem(backend: Backend, prob: Problem, pattern, device: torch.device, dtype: torch.dtype,
                tol: tuple[float, float]) -> str | None:
    """Run ``prob`` through ``backend``'s kept primitives on ``device``/``dtype`` and compare with the
    float64 reference; ``None`` when within ``tol`` = (atol, rtol), else what went wrong."""
    from ..formats import kept
    from ..masks import parse_pattern
    from .reference import ReferenceBackend

    pat = parse_pattern(prob.pattern or pattern)
    g = torch.Generator().manual_seed(20240915)
    shape = tuple(prob.weight_shape)
    mask = _make_mask(shape, pat, prob.mask, prob.density, g)
    w = torch.randn(shape, generator=g)
    vals = kept.gather(w, mask).to(dtype)
    conv = prob.conv
    if conv is None:
        N, K = shape
        x = torch.randn(prob.rows, K, generator=g).to(dtype)
        dy = torch.randn(prob.rows, N, generator=g).to(dtype)
    else:
        x = torch.randn(prob.rows, shape[1] * conv.groups, *prob.hw, generator=g).to(dtype)
        ho, wo = torch.nn.functional.conv2d(torch.empty(1, shape[1] * conv.groups, *prob.hw, device="meta"),
                                            torch.empty(shape, device="meta"), None, conv.stride, conv.padding,
                                            conv.dilation, conv.groups).shape[-2:]
        dy = torch.randn(prob.rows, shape[0], ho, wo, generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype) if prob.bias and prob.prim == "fwd" else None

    def call(b: Backend, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
        xv, dyv, vv = (t.to(dev, dt) for t in (x, dy, vals))
        m = mask.to(dev)
        bv = bias.to(dev, dt) if bias is not None else None
        if conv is None:
            if prob.prim == "fwd":
                return b.kept_linear_fwd(xv, vv, m, bv, pat)
            if prob.prim == "dx":
                return b.kept_linear_dx(dyv, vv, m, pat)
            return b.kept_linear_dw(dyv, xv, m, pat)
        if prob.prim == "fwd":
            return b.kept_conv_fwd(xv, vv, m, bv, pat, conv)
        if prob.prim == "dx":
            return b.kept_conv_dx(dyv, vv, m, pat, conv, tuple(x.shape))
        return b.kept_conv_dw(dyv, xv, m, pat, conv)

    ref = call(ReferenceBackend(), torch.device("cpu"), torch.float64)
    try:
        out = call(backend, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - the check's error is the verdict
        return f"{prob.describe()}: raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    why = _compare(out, ref, *tol)
    return None if why is None else f"{prob.describe()}: {why}"


def _problems(fam: Family, device: torch.device, pattern) -> Sequence[Problem]:
    return fam.problems(device, pattern) if callable(fam.problems) else fam.problems


def _tolerance(backend: Backend, dtype: torch.dtype, label: str) -> tuple[float, float]:
    tols = backend.tolerances
    if label.endswith("/tf32"):  # TF32 inputs carry fp16-like mantissas
        return tols.get(torch.float16, tols[dtype])
    return tols[dtype]


def _run_family(backend: Backend, fam: Family, variant: str, device: torch.device, dtype: torch.dtype,
                label: str) -> Result:
    from ..masks import parse_pattern

    pattern = parse_pattern(variant or fam.pattern)
    tol = _tolerance(backend, dtype, label)
    t0 = time.perf_counter()
    errors, names = [], []
    ctx = fam.context(backend) if fam.context is not None else contextlib.nullcontext()
    autocast_off = [torch.autocast(t, enabled=False) for t in {"cpu", device.type} if t in ("cpu", "cuda")]
    try:
        with ctx, torch.no_grad(), contextlib.ExitStack() as st:
            for a in autocast_off:
                st.enter_context(a)
            for prob in _problems(fam, device, pattern):
                names.append(prob.describe())
                why = run_problem(backend, prob, pattern, device, dtype, tol)
                if why is not None:
                    errors.append(why)
                    break
    except Exception as e:  # noqa: BLE001 - building a problem or entering the context failed
        errors.append(f"raised {type(e).__name__}: {e}")
    return Result(not errors, errors[0] if errors else None, "run", time.perf_counter() - t0, names)


def _display(backend: Backend, fam: Family, variant: str) -> str:
    return f"{backend.name} {fam.name}" + (f" [{variant}]" if variant else "")


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001 - CPU-only builds raise here
        return False


def _warn(backend: Backend, fam: Family, variant: str, device: torch.device, label: str, res: Result) -> None:
    key = (backend.name, fam.name, variant, str(device), label)
    if key in _WARNED:
        return
    _WARNED.add(key)
    from . import SparsefastWarning

    what = ("auto uses the next backend for the calls it runs, and asking for backend="
            f"{backend.name!r} there raises" if fam.required else f"the {backend.name} backend does not use it")
    warnings.warn(f"sparsefast: the {_display(backend, fam, variant)} kernels failed their self-check on {device} "
                  f"({environment(device)['device']}) {label}: {res.error}. The family is disabled in this process: "
                  f"{what} (sparsefast.backends.explain() says why; re-run with "
                  "sparsefast.backends.self_check(force=True))", SparsefastWarning, stacklevel=5)


def _result(backend: Backend, fam: Family, variant: str, device: torch.device, dtype: torch.dtype, label: str,
            *, force: bool = False, may_run: bool = True) -> Result | None:
    """The verdict of one family on ``device``/``dtype`` (memory, then disk, then run it). ``None`` when
    unknown and ``may_run`` is False."""
    key = (backend.name, fam.name, variant, str(device), label)
    with _LOCK:
        res = None if force else _MEM.get(key)
        if res is not None:
            return res
        dkey = _disk_key(device, backend.name, fam.name, variant, label)
        if not force:
            hit = _read_disk().get(dkey)
            if isinstance(hit, dict) and hit.get("ok") is True:
                res = Result(True, None, "disk", 0.0)
        if res is None:
            if not may_run:
                return None
            if _capturing():
                raise SelfCheckCaptureError(
                    f"sparsefast: the {_display(backend, fam, variant)} kernels have not been self-checked on "
                    f"{device} {label} yet, and the check cannot run while a CUDA graph is being captured (it launches "
                    "kernels and synchronizes). Run one eager call of this layer / op before capturing (a warm-up "
                    "iteration), or call sparsefast.backends.self_check() first; SPARSEFAST_SELF_CHECK=0 skips the "
                    "checks.")
            res = _run_family(backend, fam, variant, device, dtype, label)
            if res.ok:
                _write_disk(dkey, dict(ok=True, family=_display(backend, fam, variant), dtype=label,
                                       checked=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(res.seconds, 3),
                                       env=environment(device)))
        _MEM[key] = res
        if fam.on_result is not None:
            fam.on_result(backend, device, dtype, bool(res.ok))
    if not res.ok:
        _warn(backend, fam, variant, device, label, res)
    return res


def _applies(backend: Backend, fam: Family, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``fam`` is not checked on ``device``/``dtype`` (``None``: it is)."""
    dts = fam.dtypes if fam.dtypes is not None else tuple(backend.dtypes)
    if dtype not in dts or dtype not in tuple(backend.dtypes):
        return f"not used for {str(dtype).replace('torch.', '')}"
    if device.type not in tuple(backend.devices):
        return f"{backend.name} does not run on {device.type}"
    return fam.skip(backend, device) if fam.skip is not None else None


def _families(backend: Backend) -> Sequence[Family]:
    fn = getattr(backend, "self_check_families", None)
    return tuple(fn()) if callable(fn) else ()


# ------------------------------------------------------------------------------------------------
# the registry's hook and the public entry points
# ------------------------------------------------------------------------------------------------
def gate(backend: Backend, q: OpQuery) -> list[str]:
    """Reasons why ``backend`` may not run call ``q`` because a family it selects failed its self-check
    (empty: it may). Checks the families not yet checked on this device and dtype (raises
    :class:`SelfCheckCaptureError` instead while a CUDA graph is being captured)."""
    fams = _families(backend)
    if not fams or skipped_reason(backend) is not None:
        return []
    device = _device(q.device) if q.device.type == "cuda" else q.device
    label = None
    out = []
    for fam in fams:
        if not fam.selects(q) or _applies(backend, fam, device, q.dtype) is not None:
            continue
        label = label or _dtype_label(device, q.dtype, q.precision)
        variant = str(q.pattern) if fam.per_pattern else ""
        res = _result(backend, fam, variant, device, q.dtype, label)
        if res is not None and res.ok is False and fam.required:
            out.append(f"self-check of the {_display(backend, fam, variant)} kernels failed on {device} {label}: "
                       f"{res.error}")
            break  # refused already: the call's other families are checked when a call needs them
    return out


def results() -> dict[str, dict[str, dict]]:
    """The verdicts known in this process: ``{"backend family [variant] @ device": {dtype: result}}``."""
    out: dict[str, dict[str, dict]] = {}
    with _LOCK:
        for (b, f, v, dev, label), r in _MEM.items():
            out.setdefault(f"{b} {f}" + (f" [{v}]" if v else "") + f" @ {dev}", {})[label] = r.as_dict()
    return out


def _matches(sel: str, backend: Backend, fam: Family) -> bool:
    s = sel.strip().lower()
    return s in (backend.name.lower(), fam.name.lower(), f"{backend.name} {fam.name}".lower())


def self_check(device: "torch.device | str | None" = None,
               dtypes: Iterable[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32),
               families: Iterable[str] | None = None, *, force: bool = False,
               patterns: Iterable[str] | None = None, time_budget: float | None = None,
               progress: Callable[[str, str, dict], None] | None = None) -> dict[str, dict[str, dict]]:
    """Run the self-checks of every available backend's kernel families on ``device`` (default: the
    current CUDA device, else ``"cpu"``, where only the Triton interpreter has families) for ``dtypes``, now.

    ``families``: names to run (a backend name, a family name or ``"backend family"``; default all).
    ``patterns``: for per-pattern families (Triton N:M and block kernels), the patterns to check (default
    each family's own, e.g. ``2:4``; patterns of another type are ignored). ``force``: run again even when a
    verdict is cached. Runs whatever ``SPARSEFAST_SELF_CHECK`` says (it only skips the lazy checks); must not
    be called while a CUDA graph is being captured. Backends are checked in ``auto`` order for the device
    (highest priority first). ``time_budget`` (seconds): start no new check after it (those are reported
    ``ok=None``, "not run: time budget"). ``progress(family, dtype, result)`` is called after each verdict.

    Returns ``{"backend family [variant]": {dtype: {"ok", "error", "source", "seconds"}}}`` with ``ok``
    ``True`` / ``False``, or ``None`` when the family does not apply there (``error`` says why); ``source``:
    ``"run"``, ``"memory"``, ``"disk"`` or ``"skipped"``. Verdicts feed the routing exactly as lazy checks
    do (a failure warns once and disables the family)."""
    from .. import backends as _bk
    from ..masks import parse_pattern

    dev = _device(device)
    dtypes = tuple(dtypes)
    sels = None if families is None else [families] if isinstance(families, str) else list(families)
    pats = None if patterns is None else [parse_pattern(p) for p in ([patterns] if isinstance(patterns, str)
                                                                        else patterns)]
    found: set[str] = set()
    out: dict[str, dict[str, dict]] = {}
    t0 = time.perf_counter()
    loaded = [b for b in (_bk._load(n) for n in _bk.names()) if b is not None]
    loaded.sort(key=lambda b: -(b.auto_priority.get(dev.type, -1) if isinstance(b.auto_priority, dict) else -1))
    for b in loaded:
        for fam in _families(b):
            if sels is not None:
                hit = [s for s in sels if _matches(s, b, fam)]
                if not hit:
                    continue
                found.update(hit)
            variants = [""]
            if fam.per_pattern:
                default = parse_pattern(fam.pattern)
                variants = [str(p) for p in (pats or [default]) if type(p) is type(default)] or []
            for variant in variants:
                row = out.setdefault(_display(b, fam, variant), {})
                for dt in dtypes:
                    label = _dtype_label(dev, dt, None) if dev.type != "meta" else str(dt)
                    why = _applies(b, fam, dev, dt)
                    key = (b.name, fam.name, variant, str(dev), label)
                    known = None if force else _MEM.get(key)
                    if why is not None:
                        d = Result(None, why, "skipped").as_dict()
                    elif known is not None:
                        d = dict(known.as_dict(), source="memory")
                    else:
                        over = time_budget is not None and time.perf_counter() - t0 > time_budget
                        res = _result(b, fam, variant, dev, dt, label, force=force, may_run=not over)
                        d = res.as_dict() if res is not None else Result(
                            None, f"not run: time budget of {time_budget:g} s spent", "skipped").as_dict()
                    row[label] = d
                    if progress is not None:
                        progress(_display(b, fam, variant), label, d)
    if sels is not None:
        unknown = [s for s in sels if s not in found]
        if unknown:
            known_names = sorted({f"{n} {f.name}" for n in _bk.names() if _bk._load(n) is not None
                                  for f in _families(_bk._load(n))})
            raise ValueError(f"self_check: no kernel family matches {unknown}; known: {known_names}")
    _bk.clear_route_cache()
    return out


def _forget_for_tests() -> None:
    """Drop every in-memory verdict and warn-once record (the disk cache stays)."""
    with _LOCK:
        _MEM.clear()
        _WARNED.clear()
        _ENV_CACHE.clear()


_HEADER = f"{'family':<44} {'dtype':<14} {'verdict':<7} {'source':<8} {'s':>6}  error / note"


def _row(fam: str, dt: str, r: dict) -> str:
    verdict = {True: "pass", False: "FAIL", None: "n/a"}[r["ok"]]
    return f"{fam:<44} {dt:<14} {verdict:<7} {r['source']:<8} {r['seconds']:>6.2f}  {r['error'] or ''}"


def format_table(res: dict[str, dict[str, dict]]) -> str:
    """A plain-text verdict table of :func:`self_check`'s result (one row per family and dtype)."""
    return "\n".join([_HEADER] + [_row(f, dt, r) for f, row in res.items() for dt, r in row.items()])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -c "import sys; from sparsefast.backends.selfcheck import main; sys.exit(main())" [--device D]
    [--dtype bf16 ...] [--family NAME ...] [--pattern P ...] [--force] [--time-budget S] [--json PATH]``: run
    :func:`self_check`, printing each verdict as it comes; exit 1 if a family failed."""
    import argparse

    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", action="append", choices=sorted(names))
    ap.add_argument("--family", action="append")
    ap.add_argument("--pattern", action="append")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--time-budget", type=float, default=None)
    a = ap.parse_args(argv)
    dts = [names[d] for d in a.dtype] if a.dtype else [torch.float16, torch.bfloat16, torch.float32]
    t0 = time.perf_counter()
    dev = _device(a.device)
    print(f"sparsefast self-check on {dev} ({environment(dev)['device']}), cache {cache_path()}", flush=True)
    print(_HEADER, flush=True)
    res = self_check(a.device, dts, a.family, force=a.force, patterns=a.pattern, time_budget=a.time_budget,
                     progress=lambda f, dt, r: print(_row(f, dt, r), flush=True))
    bad = sum(r["ok"] is False for row in res.values() for r in row.values())
    print(f"self-check: {sum(r['ok'] is True for row in res.values() for r in row.values())} pass, {bad} FAIL, "
          f"{sum(r['ok'] is None for row in res.values() for r in row.values())} n/a in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=str(dev), environment=environment(dev), results=res),
                                           indent=1))
    return 1 if bad else 0


if __name__ == "__main__":  # run the package's module (one copy of the caches), not this __main__ copy
    from sparsefast.backends.selfcheck import main as _package_main

    raise SystemExit(_package_main())
