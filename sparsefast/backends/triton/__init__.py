"""The ``"triton"`` backend: Triton kernels for N:M (:mod:`.nm`), unstructured (:mod:`.unstructured`)
and block (:mod:`.block`) sparsity. This class only checks availability and routes each call to the
implementation for its pattern; each implementation is itself a :class:`~sparsefast.backends.base.Backend`.

Available where ``triton`` imports and either a CUDA device is present or ``TRITON_INTERPRET=1`` was
set before import (then the kernels run on CPU tensors through Triton's interpreter — slow, for
correctness testing only).
"""
from __future__ import annotations

import importlib
import os

import torch

from ..base import Backend, OpQuery, matmul_fp32_precision  # noqa: F401 - re-exported


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton (imports it)."""
    import triton

    major, minor = (triton.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tf32_enabled() -> bool:
    """True when fp32 CUDA matmuls may use TF32 (:func:`matmul_fp32_precision` is ``"tf32"``)."""
    return matmul_fp32_precision() == "tf32"


class TritonBackend(Backend):
    name = "triton"
    #: after the cuda backend on CUDA; on CPU the interpreter is a correctness tool, never auto-picked
    auto_priority = {"cuda": 10}

    def __init__(self) -> None:
        super().__init__()
        self._impls: dict[str, Backend | None] = {}
        self._impl_errors: dict[str, str] = {}

    @property
    def devices(self):  # type: ignore[override]
        return ("cpu", "cuda") if interpreting() else ("cuda",)

    def unavailable_reason(self) -> str | None:
        try:
            import triton  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"triton is not importable ({type(e).__name__}: {e})"
        if not interpreting() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 before import to run the Triton kernels on CPU)"
        return None

    @staticmethod
    def _kind(pattern) -> str:
        """Which implementation module runs ``pattern``: ``"nm"``, ``"block"`` or ``"unstructured"``
        (every other pattern)."""
        from ...masks import Block

        if pattern.is_nm:
            return "nm"
        return "block" if isinstance(pattern, Block) else "unstructured"

    def _impl(self, pattern) -> Backend | None:
        kind = self._kind(pattern)
        if kind not in self._impls:
            try:
                mod = importlib.import_module(f"{__name__}.{kind}")
                self._impls[kind] = mod.Impl()
            except Exception as e:  # noqa: BLE001
                self._impls[kind] = None
                self._impl_errors[kind] = f"triton {kind} kernels failed to load: {type(e).__name__}: {e}"
        return self._impls[kind]

    def self_check_families(self):
        """The Triton kernel families (:mod:`sparsefast.backends.selfcheck`), checked on first use per
        device and dtype -- on CPU tensors too when the interpreter runs them; see :func:`_families`."""
        return _families()

    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        impl = self._impl(q.pattern)
        if impl is None:
            return [self._impl_errors[self._kind(q.pattern)]]
        return super().not_supported_reasons(q) + impl.not_supported_reasons(q)

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        impl = self._impl(q.pattern)
        return impl.prefer_dense_reason(q) if impl is not None else None

    def _get(self, pattern) -> Backend:
        impl = self._impl(pattern)
        if impl is None:
            raise RuntimeError(self._impl_errors[self._kind(pattern)])
        return impl

    def pack(self, weight, mask, pattern):
        return self._get(pattern).pack(weight, mask, pattern)

    # kept values: the unstructured and block kernels read them natively (the block kernels also write
    # the weight gradient as kept values); N:M goes through the base adapter
    def _kept(self, pattern, op: str):
        impl = self._get(pattern)
        return getattr(impl, op) if getattr(impl, "kept_native", False) else getattr(super(), op)

    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        return self._kept(pattern, "kept_linear_fwd")(x, values, mask, bias, pattern)

    def kept_linear_dx(self, dy, values, mask, pattern):
        return self._kept(pattern, "kept_linear_dx")(dy, values, mask, pattern)

    def kept_linear_dw(self, dy, x, mask, pattern):
        return self._kept(pattern, "kept_linear_dw")(dy, x, mask, pattern)

    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv):
        return self._kept(pattern, "kept_conv_fwd")(x, values, mask, bias, pattern, conv)

    def kept_conv_dx(self, dy, values, mask, pattern, conv, input_shape):
        return self._kept(pattern, "kept_conv_dx")(dy, values, mask, pattern, conv, input_shape)

    def kept_conv_dw(self, dy, x, mask, pattern, conv):
        return self._kept(pattern, "kept_conv_dw")(dy, x, mask, pattern, conv)

    def linear_fwd(self, x, weight, mask, bias, pattern):
        return self._get(pattern).linear_fwd(x, weight, mask, bias, pattern)

    def linear_dx(self, dy, weight, mask, pattern):
        return self._get(pattern).linear_dx(dy, weight, mask, pattern)

    def linear_dw(self, dy, x, mask, pattern):
        return self._get(pattern).linear_dw(dy, x, mask, pattern)

    def conv_fwd(self, x, weight, mask, bias, pattern, conv):
        return self._get(pattern).conv_fwd(x, weight, mask, bias, pattern, conv)

    def conv_dx(self, dy, weight, mask, pattern, conv, input_shape):
        return self._get(pattern).conv_dx(dy, weight, mask, pattern, conv, input_shape)

    def conv_dw(self, dy, x, mask, pattern, conv, weight_shape):
        return self._get(pattern).conv_dw(dy, x, mask, pattern, conv, weight_shape)


# ------------------------------------------------------------------------------------------------
# self-check families (sparsefast.backends.selfcheck): a call selects every family it may run
# (forward and both gradients); Linear families are split by size class where the kernels' launch
# configurations are (M <= 64: the memory-bound configs / gather kernels; M > 64: the tiled ones;
# an unknown M selects both). N:M and block kernels are compiled per pattern: checked per pattern.
# ------------------------------------------------------------------------------------------------
_FAMILIES: list = []
_SMALL_M = 64


def _small(q: OpQuery) -> bool:
    return q.m_rows is None or q.m_rows <= _SMALL_M


def _large(q: OpQuery) -> bool:
    return q.m_rows is None or q.m_rows > _SMALL_M


def _families():
    if _FAMILIES:
        return _FAMILIES
    from ...masks import Block
    from ..base import ConvParams
    from ..selfcheck import Family, Problem

    def kind(q):
        return TritonBackend._kind(q.pattern)

    def nm_lin(q):
        return q.op == "linear" and kind(q) == "nm"

    def blk_lin(q):
        return q.op == "linear" and isinstance(q.pattern, Block)

    def uns_lin(q):
        return q.op == "linear" and kind(q) == "unstructured"

    conv = ConvParams(padding=(1, 1))
    conv_s2 = ConvParams(stride=(2, 1), padding=(1, 0))
    W, W4 = (32, 64), (8, 16, 3, 3)
    nm_conv = (Problem("fwd", W4, 2, conv=conv), Problem("dx", W4, 2, conv=conv), Problem("dw", W4, 2, conv=conv),
               Problem("fwd", W4, 2, conv=conv_s2, hw=(7, 6)))
    # unstructured: density 0.05 at M <= 64 takes the gather kernels, 0.5 the tile-decode ones
    unstructured_conv = (Problem("fwd", W4, 2, conv=conv, density=0.5), Problem("dx", W4, 2, conv=conv, density=0.5),
                         Problem("dw", W4, 2, conv=conv, density=0.5),
                         Problem("fwd", (8, 8, 3, 3), 2, conv=ConvParams(padding=(1, 1), groups=2), density=0.5))
    WB = (64, 64)
    _FAMILIES.extend([
        Family("N:M fwd (M<=64)", lambda q: nm_lin(q) and _small(q), (Problem("fwd", W, 5),), per_pattern=True),
        Family("N:M fwd (M>64)", lambda q: nm_lin(q) and _large(q), (Problem("fwd", W, 80),), per_pattern=True),
        Family("N:M dX (M<=64)", lambda q: nm_lin(q) and _small(q),
               (Problem("dx", W, 5, mask="transposable"), Problem("dx", W, 5)), per_pattern=True),
        Family("N:M dX (M>64)", lambda q: nm_lin(q) and _large(q),
               (Problem("dx", W, 80, mask="transposable"), Problem("dx", W, 80)), per_pattern=True),
        Family("N:M dW", nm_lin, (Problem("dw", W, 24),), per_pattern=True),
        Family("N:M conv", lambda q: q.op == "conv" and kind(q) == "nm", nm_conv, per_pattern=True),
        Family("unstructured fwd (M<=64)", lambda q: uns_lin(q) and _small(q),
               (Problem("fwd", W, 5, density=0.05), Problem("fwd", W, 5, density=0.5)), pattern="unstructured"),
        Family("unstructured fwd (M>64)", lambda q: uns_lin(q) and _large(q),
               (Problem("fwd", W, 80, density=0.5),), pattern="unstructured"),
        Family("unstructured dX (M<=64)", lambda q: uns_lin(q) and _small(q),
               (Problem("dx", W, 5, density=0.05), Problem("dx", W, 5, density=0.5)), pattern="unstructured"),
        Family("unstructured dX (M>64)", lambda q: uns_lin(q) and _large(q),
               (Problem("dx", W, 80, density=0.5),), pattern="unstructured"),
        Family("unstructured dW", uns_lin, (Problem("dw", W, 24, density=0.5),), pattern="unstructured"),
        # block-masked convs run on the unstructured kernels
        Family("unstructured conv", lambda q: q.op == "conv" and kind(q) != "nm", unstructured_conv,
               pattern="unstructured"),
        Family("block fwd (M<=64)", lambda q: blk_lin(q) and _small(q), (Problem("fwd", WB, 5),),
               pattern="block:16", per_pattern=True),
        Family("block fwd (M>64)", lambda q: blk_lin(q) and _large(q), (Problem("fwd", WB, 80),),
               pattern="block:16", per_pattern=True),
        Family("block dX (M<=64)", lambda q: blk_lin(q) and _small(q), (Problem("dx", WB, 5),),
               pattern="block:16", per_pattern=True),
        Family("block dX (M>64)", lambda q: blk_lin(q) and _large(q), (Problem("dx", WB, 80),),
               pattern="block:16", per_pattern=True),
        Family("block dW", blk_lin, (Problem("dw", WB, 24),), pattern="block:16", per_pattern=True),
    ])
    return _FAMILIES
