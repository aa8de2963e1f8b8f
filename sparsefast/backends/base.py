"""The backend interface: the small set of primitives every backend provides.

Autograd, bias gradients, the frozen-weight path and double backward live once in
:mod:`sparsefast.ops`; a backend only computes these primitives (all tensors on one device, one dtype):

=================  ==========================================================================
``linear_fwd``     ``y = x @ (W*M)ᵀ (+ b)``          x: (B, K), W/M: (N, K), b: (N,) or None -> (B, N)
``linear_dx``      ``dx = dy @ (W*M)``              dy: (B, N) -> (B, K)
``linear_dw``      ``dW = (dyᵀ @ x) * M``           -> (N, K), exactly zero where M is False
``conv_fwd``       ``conv2d(x, W*M) (+ b)``          x: (B, C, H, W) NCHW (any memory format)
``conv_dx``        input gradient of conv2d          -> ``input_shape``
``conv_dw``        masked weight gradient            -> weight shape, zero where M is False
=================  ==========================================================================

``pattern`` is a parsed :class:`sparsefast.masks.Pattern`; ``conv`` is a :class:`ConvParams`.
Backends that keep a packed format build it with :meth:`Backend.pack` and fetch it through
:meth:`Backend.packed`, which caches one packing per live (weight, mask) pair and re-packs when
either is modified in place (tensor version counter) — so a training step re-packs once, inference
never does.

Layers store only the kept values (:mod:`sparsefast.formats.kept`: 1-D, canonical order), so what
:mod:`sparsefast.ops` calls are the *kept* primitives, which take ``values`` where the table above takes
``W`` and return the weight gradient as kept values ``(nnz,)``:

=====================  ==================================================================
``kept_linear_fwd``    ``(x, values, mask, bias, pattern)``
``kept_linear_dx``     ``(dy, values, mask, pattern)``
``kept_linear_dw``     ``(dy, x, mask, pattern) -> (nnz,)``
``kept_conv_fwd``      ``(x, values, mask, bias, pattern, conv)``
``kept_conv_dx``       ``(dy, values, mask, pattern, conv, input_shape)``
``kept_conv_dw``       ``(dy, x, mask, pattern, conv) -> (nnz,)``
=====================  ==================================================================

A backend whose kernels read kept values directly overrides them (``reference``, ``cpu``) and sets
``kept_native = True``; the defaults here scatter the values into a dense weight (one dense-sized pass
per call) and gather the dense weight gradient at the kept positions, so a backend that only has the
dense-weight primitives still works (``explain()`` says which one runs that way).

``not_supported_reasons`` answers, for one call, why this backend cannot run it (empty list: it can);
``prefer_dense_reason`` lets a kernel backend say that for this shape/density masked-dense work is
faster, so ``auto`` routes to the reference instead (never slower than dense).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from .. import _build_cpu
from .._tensor_cache import TensorCache
from ..formats import kept as _kept
from ..masks import NM, Block, Pattern, Unstructured


#: same-size integer dtype of each float dtype, for :func:`masked`
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}


_HINT = threading.local()


class input_grad_hint:
    """Context the one autograd path (:mod:`sparsefast.ops`) runs a differentiable forward primitive in:
    whether that call's input gradient will be computed (``ctx.needs_input_grad[0]``). A backend may then
    hand the operand it built for the forward (the reference backend: the dense weight scattered from the
    kept values) to the dX call of the same backward instead of building it again; outside such a forward
    (inference, the backward's own calls) :func:`input_grad_follows` is False."""

    def __init__(self, on: bool) -> None:
        self.on = bool(on)

    def __enter__(self) -> None:
        self.prev = getattr(_HINT, "on", False)
        _HINT.on = self.on

    def __exit__(self, *exc) -> None:
        _HINT.on = self.prev


def input_grad_follows() -> bool:
    """True inside a differentiable forward primitive whose input gradient will be computed."""
    return getattr(_HINT, "on", False)


def masked(t: torch.Tensor, mask: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``t`` where ``mask`` is True, exactly ``+0`` where it is False: unlike ``t * mask``, a NaN/Inf at a
    pruned position cannot leak through ``NaN * 0``. ``inplace`` overwrites ``t``.

    ``torch.where(mask, t, 0)`` gives the same tensor but took 2.6 ms for 1M float32 elements on an
    AVX2 CPU with torch 2.13 (several times the GEMM it feeds). So: on CPU, when the cpu backend's
    extension is loaded or prebuilt, its one-pass ``mask_into`` kernel (bits AND ``0 - mask``); elsewhere an
    integer multiply of ``t``'s bits by the mask's 0/1 bytes; ``torch.where`` where neither applies
    (autograd through ``t``, non-bool or broadcast masks, integer dtypes)."""
    bits = _BITS.get(t.dtype)
    if (bits is None or mask.dtype != torch.bool or mask.shape != t.shape
            or (t.requires_grad and torch.is_grad_enabled())):
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        return t.copy_(torch.where(mask, t, zero)) if inplace else torch.where(mask, t, zero)
    if t.device.type == "cpu" and mask.device.type == "cpu" and t.is_contiguous() and mask.is_contiguous():
        ext = _build_cpu.loaded_or_prebuilt()  # never builds it from here
        if ext is not None:
            out = t if inplace else torch.empty_like(t)
            ext.mask_into(t, mask, out)
            if inplace:  # C++ writes do not bump the version counter: packs and autograd rely on it
                torch.autograd.graph.increment_version(t)
            return out
    m = mask.view(torch.uint8)
    if inplace:
        t.view(bits).mul_(m)
        return t
    return (t.view(bits) * m).view(t.dtype)


def matmul_fp32_precision() -> str:
    """torch's fp32 matmul precision for CUDA: ``"tf32"``, ``"ieee"`` or ``"none"`` (nothing chosen:
    torch's default, full fp32). Reads ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9)
    where it exists -- reading the legacy ``allow_tf32`` raises ``RuntimeError`` once a user set the new
    API -- and falls back to ``allow_tf32``. Never raises. (The one place sparsefast reads this
    setting: :func:`sparsefast.backends.make_query` puts it in the query, and the Triton kernels use it
    for ``input_precision`` and their autotune keys.)"""
    m = torch.backends.cuda.matmul
    try:
        p = getattr(m, "fp32_precision", None)
    except Exception:  # noqa: BLE001 - a settings read must never fail a dispatch
        p = None
    if p in ("tf32", "ieee"):
        return p
    try:
        legacy = bool(m.allow_tf32)
    except Exception:  # noqa: BLE001 - mixed legacy / new API use
        return p if isinstance(p, str) and p else "none"
    if legacy:
        return "tf32"
    return "none" if p == "none" else "ieee"


@dataclass(frozen=True)
class ConvParams:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


def conv_output_hw(h, w, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output ``(Ho, Wo)`` of a conv2d with kernel ``(kh, kw)`` on an ``h x w`` input, as
    :func:`torch.nn.functional.conv2d` computes it: per dimension
    ``(h + 2 * padding - dilation * (k - 1) - 1) // stride + 1`` (zero or negative when the dilated
    kernel does not fit). ``stride`` / ``padding`` / ``dilation``: ``(h, w)`` pairs or one int for both.
    Plain arithmetic, so symbolic sizes (fake kernels under ``torch.compile``) go through."""
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = (v if isinstance(v, Sequence) else (v, v) for v in (stride, padding, dilation))
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


@dataclass(frozen=True)
class OpQuery:
    """What ``auto`` and ``explain`` ask a backend about: one call's metadata (no data)."""

    op: str                      # "linear" or "conv"
    device: torch.device
    dtype: torch.dtype
    weight_shape: tuple[int, ...]
    pattern: Pattern
    m_rows: int | None = None    # GEMM M (batch rows, or B*Ho*Wo for conv); None if unknown
    density: float | None = None  # mask density if known
    conv: ConvParams | None = None
    #: fp32 matmul precision on CUDA (:func:`matmul_fp32_precision`); part of the query because a
    #: backend's choice for float32 can depend on it (TF32 tensor cores)
    precision: str | None = None


class Backend:
    """Base class. A backend *declares* what it runs — ``ops``, ``patterns`` (pattern types), ``devices``,
    ``dtypes``, its test ``tolerances`` and its ``auto`` priority per device — and implements the
    primitives. :meth:`not_supported_reasons` refuses, with reasons, every call outside the declarations
    (subclasses add their own limits in :meth:`extra_reasons`); ``auto`` orders the backends per call by
    :meth:`priority`. Add one from outside the package with
    :func:`sparsefast.backends.register_backend`."""

    name: ClassVar[str] = "?"
    #: ops it implements
    ops: ClassVar[tuple[str, ...]] = ("linear", "conv")
    #: pattern types it runs (:mod:`sparsefast.masks`): any mask of those types, exactly
    patterns: ClassVar[tuple[type, ...]] = (Unstructured, NM, Block)
    #: device types this backend can run on (e.g. ("cuda",), or ("cpu",))
    devices: ClassVar[tuple[str, ...]] = ()
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    #: (atol, rtol) per dtype its results meet against the float64 masked-dense reference (scaled by
    #: max(1, |expected|) in the conformance tests)
    tolerances: ClassVar[dict] = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4),
                                  torch.float16: (2e-2, 1e-2), torch.bfloat16: (8e-2, 3e-2)}
    #: ``auto`` priority per device type (higher is tried first; absent: ``auto`` never picks it there)
    auto_priority: ClassVar[dict[str, int]] = {}
    #: the kernels read kept values (canonical order) as they are; False: the ``kept_*`` defaults
    #: scatter them into a dense weight per call (see module docstring)
    kept_native: ClassVar[bool] = False
    #: its training step reads the flat kept-values index (:func:`sparsefast.formats.kept.index`); False
    #: (kernels with their own mask-derived formats): a layer routed here lets the cached index go, since it
    #: is nnz int32s that only mask changes and ``dense_weight()`` need (recomputed then, O(n))
    uses_kept_index: ClassVar[bool] = True

    def __init__(self) -> None:
        #: this backend's formats, mask-derived structures and hand-offs (:mod:`sparsefast._tensor_cache`)
        self._tc = TensorCache()

    # ---- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot be used on this machine at all (``None``: it can)."""
        return None

    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        """Why this backend cannot run the call described by ``q`` (empty: it can): the declarations
        (op, device, dtype, pattern type, the pattern fitting the weight), then :meth:`extra_reasons`."""
        reasons = []
        if q.op not in self.ops:
            reasons.append(f"{self.name} does not implement {q.op!r} (it has {', '.join(self.ops)})")
        if q.device.type not in self.devices:
            reasons.append(f"{self.name} runs on {'/'.join(self.devices)} tensors, not {q.device.type}")
        if q.dtype not in self.dtypes:
            reasons.append(f"{self.name} does not support dtype {q.dtype} "
                           f"({', '.join(str(d).replace('torch.', '') for d in self.dtypes)} only)")
        if not isinstance(q.pattern, self.patterns):
            reasons.append(f"{self.name} does not run {q.pattern.kind} patterns ({q.pattern}); it runs "
                           f"{', '.join(p.kind for p in self.patterns)}")
        else:
            why = q.pattern.fits(tuple(q.weight_shape), q.op)
            if why is not None:
                reasons.append(why)
        if not reasons:
            reasons.extend(self.extra_reasons(q))
        return reasons

    def extra_reasons(self, q: OpQuery) -> list[str]:
        """A backend's own limits beyond its declarations (index widths, tile sizes...)."""
        return []

    def self_check_families(self) -> Sequence[Any]:
        """The kernel families this backend self-checks before their first use on a device and dtype: a
        sequence of :class:`sparsefast.backends.selfcheck.Family` (default: none -- nothing is checked)."""
        return ()

    def priority(self, q: OpQuery) -> int | None:
        """Rank of this backend for ``auto`` on call ``q`` (higher first); ``None``: never auto-picked.
        Default: :attr:`auto_priority` of the device. A specialist overrides it to rank high only for
        the calls it is built for (e.g. one pattern type)."""
        return self.auto_priority.get(q.device.type)

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        """A reason why masked-dense work beats this backend for ``q`` (``None``: use this backend)."""
        return None

    # ---- packing ------------------------------------------------------------------------------
    def pack(self, weight: torch.Tensor, mask: torch.Tensor, pattern: Pattern) -> Any:
        """Build the backend's format from a dense weight and a bool mask (same shape)."""
        return None

    def packed(self, weight: torch.Tensor, mask: torch.Tensor, pattern: Pattern) -> Any:
        """:meth:`pack`, cached per live (weight, mask) tensor pair and their version counters."""
        return self.cached("pack", (weight, mask), lambda: self.pack(weight, mask, pattern), str(pattern))

    def cached(self, tag: str, tensors: tuple[torch.Tensor, ...], build, extra: Any = None) -> Any:
        """``build()``, cached while every tensor in ``tensors`` is alive and unmodified (weak references
        and version counters: :class:`sparsefast._tensor_cache.TensorCache`; an optimizer step or
        ``set_mask`` invalidates it). Use it for mask-only structures too, e.g.
        ``self.cached("mask-index", (mask,), lambda: build_index(mask))``."""
        return self._tc.cached(tag, tensors, build, extra)

    def stash(self, tag: str, tensors: tuple[torch.Tensor, ...], value: Any) -> None:
        """Keep ``value`` for one :meth:`take` with the same tag and tensors, while they are alive and
        unmodified (a forward handing what it built to the backward of the same step)."""
        self._tc.put(tag, tensors, value)

    def take(self, tag: str, tensors: tuple[torch.Tensor, ...]) -> Any:
        """The value :meth:`stash` kept for these tensors, removed; ``None`` when there is none, or the
        tensors changed in place or were freed since (the caller builds it again)."""
        return self._tc.take(tag, tensors)

    def clear_cache(self) -> None:
        self._tc.clear()

    # ---- dense-weight primitives ----------------------------------------------------------------
    # A backend implements either these (the ``kept_*`` defaults below adapt them) or, with
    # ``kept_native = True``, the ``kept_*`` ones (these defaults then gather the kept values).
    def _native(self, op: str) -> None:
        if not self.kept_native:
            raise NotImplementedError(f"backend {self.name!r} implements neither {op} nor kept_{op}")

    def linear_fwd(self, x, weight, mask, bias, pattern: Pattern) -> torch.Tensor:
        self._native("linear_fwd")
        return self.kept_linear_fwd(x, _kept.gather(weight, mask), mask, bias, pattern)

    def linear_dx(self, dy, weight, mask, pattern: Pattern) -> torch.Tensor:
        self._native("linear_dx")
        return self.kept_linear_dx(dy, _kept.gather(weight, mask), mask, pattern)

    def linear_dw(self, dy, x, mask, pattern: Pattern) -> torch.Tensor:
        self._native("linear_dw")
        return _kept.scatter(self.kept_linear_dw(dy, x, mask, pattern), mask)

    def conv_fwd(self, x, weight, mask, bias, pattern: Pattern, conv: ConvParams) -> torch.Tensor:
        self._native("conv_fwd")
        return self.kept_conv_fwd(x, _kept.gather(weight, mask), mask, bias, pattern, conv)

    def conv_dx(self, dy, weight, mask, pattern: Pattern, conv: ConvParams, input_shape: Sequence[int]) -> torch.Tensor:
        self._native("conv_dx")
        return self.kept_conv_dx(dy, _kept.gather(weight, mask), mask, pattern, conv, input_shape)

    def conv_dw(self, dy, x, mask, pattern: Pattern, conv: ConvParams, weight_shape: Sequence[int]) -> torch.Tensor:
        self._native("conv_dw")
        return _kept.scatter(self.kept_conv_dw(dy, x, mask, pattern, conv), mask)

    # ---- kept-values primitives (what sparsefast.ops calls) -----------------------------------
    def kept_linear_fwd(self, x, values, mask, bias, pattern: Pattern) -> torch.Tensor:
        return self.linear_fwd(x, _kept.scatter(values, mask), mask, bias, pattern)

    def kept_linear_dx(self, dy, values, mask, pattern: Pattern) -> torch.Tensor:
        return self.linear_dx(dy, _kept.scatter(values, mask), mask, pattern)

    def kept_linear_dw(self, dy, x, mask, pattern: Pattern) -> torch.Tensor:
        return _kept.gather(self.linear_dw(dy, x, mask, pattern), mask)

    def kept_conv_fwd(self, x, values, mask, bias, pattern: Pattern, conv: ConvParams) -> torch.Tensor:
        return self.conv_fwd(x, _kept.scatter(values, mask), mask, bias, pattern, conv)

    def kept_conv_dx(self, dy, values, mask, pattern: Pattern, conv: ConvParams,
                     input_shape: Sequence[int]) -> torch.Tensor:
        return self.conv_dx(dy, _kept.scatter(values, mask), mask, pattern, conv, input_shape)

    def kept_conv_dw(self, dy, x, mask, pattern: Pattern, conv: ConvParams) -> torch.Tensor:
        return _kept.gather(self.conv_dw(dy, x, mask, pattern, conv, tuple(mask.shape)), mask)


# The two halves of a convolution's backward. ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` pass the
# operand whose shape is all that matters as a stride-0 ``expand`` of one element, which oneDNN copies
# into a dense tensor first: a plain uninitialised tensor of that shape (never written, so its pages are
# not even touched) saves that copy — 1.5-1.7 ms per call on the 3x3 128->128 28x28 batch-8 conv (AVX2 VM).
def conv_dx_dense(dy: torch.Tensor, weight: torch.Tensor, conv: ConvParams, input_shape: Sequence[int]) -> torch.Tensor:
    x_like = torch.empty(list(input_shape), dtype=dy.dtype, device=dy.device)
    return torch.ops.aten.convolution_backward(dy, x_like, weight, None, list(conv.stride), list(conv.padding),
                                               list(conv.dilation), False, [0, 0], conv.groups,
                                               [True, False, False])[0]


def conv_dw_dense(dy: torch.Tensor, x: torch.Tensor, conv: ConvParams, weight_shape: Sequence[int]) -> torch.Tensor:
    w_like = torch.empty(list(weight_shape), dtype=dy.dtype, device=dy.device)
    return torch.ops.aten.convolution_backward(dy, x, w_like, None, list(conv.stride), list(conv.padding),
                                               list(conv.dilation), False, [0, 0], conv.groups,
                                               [False, True, False])[1]
