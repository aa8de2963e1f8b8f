"""Backend registry, ``auto`` selection, ``use()`` and ``explain()``.

Each backend is a record (name -> module:class, or a class/instance given to :func:`register_backend`)
loaded lazily on first use; a backend that fails to load is *unavailable* and :func:`why_unavailable`
returns the real error. Backends declare what they run (ops, pattern types, devices, dtypes: see
:class:`~sparsefast.backends.base.Backend`). ``auto`` orders the backends *per call* by their
:meth:`~sparsefast.backends.base.Backend.priority` for that query (like xFormers' dispatcher): the first
that is available, supports the call and does not prefer dense work wins; the reference (masked dense)
is the last resort. Nothing here knows a backend by name except the reference. Falling back
because a faster backend is unavailable or unsupported warns once per reason; choosing dense because
it is faster for the shape is not a fallback and is reported by :func:`explain` only.

Before a kernel backend first runs a kind of call on a device and dtype, the kernel families that call
selects are self-checked against the reference (:mod:`sparsefast.backends.selfcheck`; eagerly:
:func:`self_check`): a family that fails is skipped by ``auto`` and refused, with the check's error, when
asked for by name.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
import warnings
from typing import Iterator

import torch

from ..masks import Pattern, parse_pattern
from .base import Backend, ConvParams, OpQuery, conv_output_hw, matmul_fp32_precision
from . import selfcheck as _selfcheck
from .selfcheck import SelfCheckCaptureError, SelfCheckError, self_check

__all__ = ["available", "why_unavailable", "use", "get", "explain", "resolve", "names", "default",
           "Backend", "ConvParams", "OpQuery", "SparsefastWarning", "make_query", "check_requested",
           "register_backend", "auto_order", "self_check", "SelfCheckError", "SelfCheckCaptureError"]


class SparsefastWarning(UserWarning):
    """Warnings sparsefast emits (backend fallbacks, skipped layers)."""


_REGISTRY: dict[str, "str | type | Backend"] = {
    "reference": "sparsefast.backends.reference:ReferenceBackend",
    "triton": "sparsefast.backends.triton:TritonBackend",
    "cuda": "sparsefast.backends.cuda:CudaBackend",
    "cpu": "sparsefast.backends.cpu:CpuBackend",
}

_instances: dict[str, Backend] = {}
_errors: dict[str, str] = {}
_lock = threading.RLock()
_default: contextvars.ContextVar[str] = contextvars.ContextVar("sparsefast_backend", default="auto")
_warned: set[str] = set()


def names() -> list[str]:
    """Every backend name sparsefast knows (available here or not)."""
    return list(_REGISTRY)


def _load(name: str) -> Backend | None:
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _errors:
            return None
        spec = _REGISTRY[name]
        try:
            if isinstance(spec, Backend):
                inst = spec
            elif isinstance(spec, type):
                inst = spec()
            else:
                mod_name, cls_name = spec.split(":")
                inst = getattr(importlib.import_module(mod_name), cls_name)()
            reason = inst.unavailable_reason()
        except Exception as e:  # noqa: BLE001 - report the real error, whatever it is
            inst, reason = None, f"failed to load {spec!r}: {type(e).__name__}: {e}"
        if reason is not None:
            _errors[name] = reason
            return None
        _instances[name] = inst
        return inst


def register_backend(name: str, backend: "str | type | Backend", *, replace: bool = False) -> None:
    """Add a backend from outside the package.

    ``backend`` is a :class:`~sparsefast.backends.base.Backend` subclass (instantiated on first use), an
    instance, or a ``"module:Class"`` string. It declares what it runs (``ops``, ``patterns``, ``devices``,
    ``dtypes``, ``tolerances``), its ``auto`` rank (``auto_priority`` per device, or a ``priority(q)``
    method that ranks high only where it should: e.g. one pattern type), implements the ``kept_*``
    primitives (or the dense-weight ones, which the base class adapts) and may refuse calls in
    ``extra_reasons``. Layers then use it by name (``backend="mine"``) and ``auto`` considers it per call.
    ``replace=True`` swaps an existing registration (not ``"reference"``). Example::

        class Mine(sparsefast.backends.Backend):
            name, devices, auto_priority = "mine", ("cpu",), {"cpu": 20}
            patterns = (sparsefast.masks.Block,)
            def kept_linear_fwd(self, x, values, mask, bias, pattern): ...
        sparsefast.backends.register_backend("mine", Mine)
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: a backend needs a name other than 'auto', got {name!r}")
    ok = isinstance(backend, (str, Backend)) or (isinstance(backend, type) and issubclass(backend, Backend))
    if not ok:
        raise TypeError(f"register_backend({name!r}): expected a Backend subclass, instance or 'module:Class', "
                        f"got {type(backend).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"register_backend: {name!r} is already registered (pass replace=True to swap it)")
    if name == "reference":
        raise ValueError("register_backend: the reference backend defines the semantics and cannot be replaced")
    with _lock:
        _REGISTRY[name] = backend
        _instances.pop(name, None)
        _errors.pop(name, None)
    clear_route_cache()


def auto_order(q: OpQuery) -> list[str]:
    """The backends ``auto`` tries for call ``q``, in order (available ones with a priority there, highest
    first, registration order on ties), then ``"reference"``."""
    ranked = []
    for i, name in enumerate(_REGISTRY):
        if name == "reference":
            continue
        b = _load(name)
        if b is None:  # unavailable: still listed (explain() says why) where its class ranks itself here
            cls = _class_of(_REGISTRY[name])
            pr = getattr(cls, "auto_priority", {}).get(q.device.type) if cls is not None else None
        else:
            pr = b.priority(q)
        if pr is not None:
            ranked.append((-pr, i, name))
    return [n for _, _, n in sorted(ranked)] + ["reference"]


def _class_of(spec) -> type | None:
    """The Backend class of a registry entry, or None when its module cannot be imported."""
    if isinstance(spec, type):
        return spec
    if isinstance(spec, Backend):
        return type(spec)
    try:
        mod_name, cls_name = spec.split(":")
        return getattr(importlib.import_module(mod_name), cls_name)
    except Exception:  # noqa: BLE001 - the load error is reported by why_unavailable()
        return None


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(['auto', *_REGISTRY])}")


def why_unavailable(name: str) -> str | None:
    """``None`` if backend ``name`` is usable on this machine, else the reason."""
    _check_name(name)
    return None if _load(name) is not None else _errors[name]


def available() -> list[str]:
    """Backends usable on this machine."""
    return [n for n in _REGISTRY if _load(n) is not None]


def get(name: str) -> Backend:
    """The backend object ``name``; ``RuntimeError`` with the reason if it is unavailable."""
    _check_name(name)
    b = _load(name)
    if b is None:
        raise RuntimeError(f"sparsefast backend {name!r} is unavailable: {_errors[name]}")
    return b


def _reset_for_tests() -> None:
    with _lock:
        _instances.clear()
        _errors.clear()
        _warned.clear()
    clear_route_cache()


#: (requested, OpQuery, TF32 flag) -> backend chosen by :func:`resolve` (each op call asks; the answer
#: only changes with the machine or :meth:`CpuBackend.set_isa`; the query carries the fp32 precision)
_ROUTES: dict[tuple, str] = {}


def clear_route_cache() -> None:
    """Forget the backend choices :func:`resolve` remembered (after changing what a backend prefers)."""
    _ROUTES.clear()


def check_requested(name: str) -> str:
    """Validate a requested backend name (``"auto"`` or an available backend); return it."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return name
    get(name)  # raises if unknown / unavailable
    return name


def default() -> str:
    """The default backend for layers and ops built now (``"auto"`` unless inside :func:`use`)."""
    return _default.get()


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
    """Context manager: layers built (and functional ops called with ``backend="auto"``) inside use
    backend ``name``. Raises ``RuntimeError`` at entry if it is unavailable."""
    check_requested(name)
    tok = _default.set(name)
    try:
        yield name
    finally:
        _default.reset(tok)


def _warn_once(msg: str) -> None:
    if msg in _warned:
        return
    _warned.add(msg)
    warnings.warn(msg, SparsefastWarning, stacklevel=4)


def _describe(q: OpQuery) -> str:
    return (f"{q.op} weight {tuple(q.weight_shape)} pattern {q.pattern} "
            f"{str(q.dtype).replace('torch.', '')} on {q.device.type}")


def _consider(q: OpQuery) -> list[tuple[str, str, str | None]]:
    """For each backend in ``auto`` order: (name, verdict, reason). verdict in
    {'use', 'unavailable', 'unsupported', 'dense-faster', 'self-check failed', 'skipped'}. The kernel
    families of the backend about to be chosen are self-checked here (:func:`selfcheck.gate`; raises
    :class:`SelfCheckCaptureError` when a check is due while a CUDA graph is being captured)."""
    out: list[tuple[str, str, str | None]] = []
    chosen = False
    order = auto_order(q)
    for name in order:
        if chosen:
            out.append((name, "skipped", "an earlier backend was chosen"))
            continue
        b = _load(name)
        if b is None:
            out.append((name, "unavailable", _errors[name]))
            continue
        reasons = b.not_supported_reasons(q)
        if reasons:
            out.append((name, "unsupported", "; ".join(reasons)))
            continue
        dense = b.prefer_dense_reason(q) if name != "reference" else None
        if dense:
            out.append((name, "dense-faster", dense))
            continue
        failed = _selfcheck.gate(b, q) if name != "reference" else []
        if failed:
            out.append((name, "self-check failed", "; ".join(failed)))
            continue
        out.append((name, "use", None))
        chosen = True
    return out


def resolve(requested: str, q: OpQuery) -> str:
    """The backend that runs call ``q`` when ``requested`` was asked for.

    An explicit name must be available, support the call and have passed the self-checks of the kernel
    families the call selects (``RuntimeError`` otherwise: :class:`SelfCheckError` with the check's error).
    ``"auto"`` picks by priority and warns once when it falls back past a backend that is
    unavailable or does not support the call (a failed self-check has warned once by itself)."""
    if requested == "auto":
        requested = _default.get()
    key = (requested, q)  # the query carries what the choice depends on (fp32 precision included)
    hit = _ROUTES.get(key)
    if hit is not None:
        return hit
    name = _resolve(requested, q)
    if len(_ROUTES) > 4096:
        _ROUTES.clear()
    _ROUTES[key] = name
    return name


def _resolve(requested: str, q: OpQuery) -> str:
    if requested != "auto":
        b = get(requested)
        reasons = b.not_supported_reasons(q)
        if reasons:
            raise RuntimeError(f"sparsefast backend {requested!r} cannot run {_describe(q)}: {'; '.join(reasons)}")
        failed = _selfcheck.gate(b, q)
        if failed:
            raise SelfCheckError(f"sparsefast backend {requested!r} cannot run {_describe(q)}: {'; '.join(failed)}")
        return requested
    verdicts = _consider(q)
    name = next(n for n, v, _ in verdicts if v == "use")
    if not torch.compiler.is_compiling():
        missed = [(n, r) for n, v, r in verdicts if v in ("unavailable", "unsupported")]
        if missed and name == "reference":
            why = "; ".join(f"{n}: {r}" for n, r in missed)
            _warn_once(f"sparsefast: no kernel backend for {_describe(q)} ({why}); "
                       "using the masked-dense reference (see sparsefast.backends.explain())")
    return name


def _autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _effective_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if dtype.is_floating_point and _autocast_on(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


@torch._dynamo.assume_constant_result
def resolve_static(requested: str, op: str, device_type: str, dtype_name: str, weight_shape: tuple,
                   pattern: str, conv: tuple | None) -> str:
    """:func:`resolve` for code being traced by ``torch.compile``: evaluated once at trace time on
    static metadata (the row count is unknown there, so shape-class choices use the default)."""
    dtype = _effective_dtype(device_type, getattr(torch, dtype_name.replace("torch.", "")))
    cp = ConvParams(*conv) if conv is not None else None
    q = OpQuery(op, torch.device(device_type), dtype, tuple(weight_shape), parse_pattern(pattern), None, None, cp)
    return resolve(requested, q)


def explain(obj, x: torch.Tensor | None = None) -> str:
    """Explain which backend runs ``obj`` (a SparseLinear/SparseConv2d layer, or an :class:`OpQuery`)
    and why each other backend does not. ``x`` (optional) is an example input for the row count."""
    if isinstance(obj, OpQuery):
        q, requested, title = obj, "auto", _describe(obj)
    elif hasattr(obj, "_op_query"):
        q, requested, title = obj._op_query(x), obj.requested_backend, f"{type(obj).__name__} {obj.extra_repr()}"
    else:
        raise TypeError(f"explain() takes a sparse layer or an OpQuery, got {type(obj).__name__}")
    lines = [f"{title}: requested backend {requested!r}"]
    if requested == "auto":
        requested = _default.get()
    if requested != "auto":
        try:
            lines.append(f"  -> {resolve(requested, q)} (explicitly requested)")
        except RuntimeError as e:
            lines.append(f"  -> error: {e}")
        return "\n".join(lines)
    try:
        verdicts = _consider(q)
    except SelfCheckCaptureError as e:
        lines.append(f"  -> error: {e}")
        return "\n".join(lines)
    for name, verdict, reason in verdicts:
        if verdict == "use":
            desc = getattr(_load(name), "describe", None)
            lines.append(f"  -> {name}: chosen" + (f" [{desc()}]" if callable(desc) else ""))
        else:
            lines.append(f"     {name}: {verdict}" + (f" ({reason})" if reason else ""))
    order = auto_order(q)
    for name in _REGISTRY:
        if name not in order:
            r = why_unavailable(name)
            lines.append(f"     {name}: not used for {q.device.type} tensors by auto"
                         + (f" (unavailable: {r})" if r else ""))
    return "\n".join(lines)


def make_query(op: str, x: torch.Tensor | None, weight: torch.Tensor, pattern: "str | Pattern",
               conv: ConvParams | None = None, density: float | None = None,
               dtype: torch.dtype | None = None) -> OpQuery:
    """Build the :class:`OpQuery` for a call (``x`` may be ``None`` when unknown; ``density`` is the
    mask density when the caller knows it — layers cache it, so no device sync happens per call).
    ``weight`` gives the weight's shape and device (the mask will do); ``dtype`` the weight's dtype when
    ``x`` is unknown (default ``weight.dtype``)."""
    pat = parse_pattern(pattern)
    m_rows = None
    if x is not None:
        if op == "linear":
            m_rows = x.numel() // max(x.shape[-1], 1)
        else:  # GEMM M of the implicit GEMM: batch * output pixels
            cp = conv or ConvParams()
            ho, wo = conv_output_hw(x.shape[-2], x.shape[-1], weight.shape[-2:], cp.stride, cp.padding, cp.dilation)
            m_rows = (x.shape[0] if x.dim() == 4 else 1) * max(ho, 0) * max(wo, 0)
    device = x.device if x is not None else weight.device
    dtype = _effective_dtype(device.type, x.dtype if x is not None else (dtype or weight.dtype))
    precision = matmul_fp32_precision() if device.type == "cuda" and dtype == torch.float32 else None
    return OpQuery(op, device, dtype, tuple(weight.shape), pat, m_rows, density, conv, precision)
