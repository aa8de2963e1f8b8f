"""The ``"cuda"`` backend: hand-written CUDA kernels from ``csrc/`` (extension ``sparsefast._C``).

Formats
-------
* **2:4 (SF24)** -- ``csrc/include/sf_layout.h`` / :mod:`sparsefast.formats.sm_meta`: kept values
  ``(Rp, Cp/2)`` plus 4-bit-per-group metadata pre-arranged in the exact register layout of
  ``mma.sp.m16n8k32`` (sm_80+; on H100/H200 the same instruction runs, see *Limits*). Patterns that fit
  2:4 run on it: ``2:4``, ``1:4``, ``1:2``.
* **Unstructured (SFCSR)** -- CSR of the masked weight: ``row_ptr`` int32 (R+1), ``col`` uint16 stored as
  int16 (C <= 65536), ``vals`` (nnz) in the weight dtype, ``row_order`` int32 (rows by decreasing nnz:
  the Sputnik row swizzle). The structure is cached per mask (building it syncs once: ``nonzero``); the
  values are re-gathered per weight version (no sync), so a training step re-packs with one gather.

Primitives
----------
=================  =======================================================================================
linear_fwd         2:4: ``mma.sp`` GEMM, bias fused. unstructured: SpMM on CUDA cores (16-byte vectors)
linear_dx          2:4 with a transposable mask (``masks.is_transposable_nm``): the same GEMM on SF24 of
                   (W*M)ᵀ. Other 2:4 masks: dense cuBLAS on the cached masked weight (Wᵀ is not 2:4).
                   unstructured: SpMM with the CSR of (W*M)ᵀ.
linear_dw          2:4: cuBLAS ``dyᵀx`` then ``*= M`` (half the outputs are kept: a tensor-core SDDMM
                   cannot skip work). unstructured: SDDMM at the kept positions only.
conv_fwd           2:4: implicit GEMM over the NHWC input (``in_channels % 8 == 0``, ``groups == 1``), bias
                   fused; the result comes back in the input's memory format (free for channels_last).
conv_dx            stride 1 with a mask that is also 2:4 along the output channels at every tap: the same
                   implicit GEMM on flip(W)ᵀ (dgrad as a forward conv). Otherwise cuDNN on the masked weight.
conv_dw            cuDNN weight gradient then ``*= M`` (general path).
=================  =======================================================================================

dtypes: float16 and bfloat16 natively (fp32 accumulation). **float32** on the 2:4 tensor cores is computed
as three bf16 products of a hi/lo split (``x_hi w_hi + x_lo w_hi + x_hi w_lo``, fp32 accumulation):
relative error about 1e-5 (tests use rtol 1e-4); unstructured float32 runs in plain fp32.

Kernels per GPU: sm_80+ run ``mma.sp.m16n8k32`` (cp.async multistage pipeline, three tile shapes chosen by
M, a k-split shape for M <= 32). sm_90 (H100/H200) additionally has a ``wgmma.mma_async.sp.m64n128k32``
kernel (sm_90a build; A from registers, B through 128-byte-swizzled shared-memory descriptors) used for
GEMMs with more than 64 rows once it passed a self-check at backend load (``SPARSEFAST_CUDA_WGMMA=0/1``
forces it off/on; ``CudaBackend.wgmma_status`` says what happened). The ``mma.sp`` kernels are
self-checked too at load: if they do not reproduce a dense product the backend is unavailable and says
why (``SPARSEFAST_CUDA_SELFCHECK=0`` skips the checks).

Limits: every call is CUDA-graph safe (no host syncs, all memory from torch's allocator) once a mask's
structures are cached. ``prefer_dense_reason`` is conservative until GPU measurements tune it
(``SPARSEFAST_CUDA_NEVER_DENSE=1`` disables it for benchmarking).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import masks as _masks
from .base import Backend, ConvParams, OpQuery
from ..masks import Pattern

__all__ = ["CudaBackend", "fits_24"]

_MAX_CSR_DIM = 65536  # uint16 column indices


def fits_24(pattern: Pattern) -> bool:
    """True for N:M patterns whose every mask is also 2:4 (at most 2 kept in any 4 consecutive)."""
    return pattern.is_nm and (pattern.n, pattern.m) in ((2, 4), (1, 4), (1, 2))


@dataclass
class Packed24:
    """SF24 of an R x K matrix (see module doc); ``vals_lo`` only for float32 (the bf16 hi/lo split)."""

    vals: torch.Tensor
    vals_lo: torch.Tensor | None
    meta: torch.Tensor
    R: int
    K: int


@dataclass
class Csr:
    row_ptr: torch.Tensor   # int32 (R+1)
    col: torch.Tensor       # int16 (nnz), uint16 bit pattern
    row_order: torch.Tensor  # int32 (R)
    flat: torch.Tensor      # int64 (nnz): positions in the dense weight's flat storage, CSR order
    R: int
    C: int


def _to_u16_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 65536) -> int16 tensor holding the same 16-bit pattern."""
    return torch.where(x >= 32768, x - 65536, x).to(torch.int16)


def build_csr(mask: torch.Tensor, flat_of: torch.Tensor | None = None) -> Csr:
    """SFCSR structure of a 2-D bool mask (R, C). ``flat_of`` optionally maps positions of ``mask``'s flat
    storage to positions in another tensor (used for the transposed structure). Syncs once (nonzero)."""
    R, C = mask.shape
    counts = mask.sum(1, dtype=torch.int32)
    row_ptr = torch.zeros(R + 1, dtype=torch.int32, device=mask.device)
    row_ptr[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    idx = mask.reshape(-1).nonzero().squeeze(1)  # row-major order == CSR order
    col = _to_u16_bits(idx % C)
    row_order = torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)
    flat = idx if flat_of is None else flat_of[idx]
    return Csr(row_ptr, col, row_order, flat, R, C)


def _like(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The kernels write NHWC (channels_last); hand the result back in ``ref``'s memory format, as cuDNN
    does (channels_last models pay nothing, NCHW ones one transpose of the output)."""
    if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        return y
    return y.contiguous()


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self) -> None:
        super().__init__()
        self._C: Any = None
        self._cap: dict[int, tuple[int, int]] = {}
        #: per device index: True when the sm_90a wgmma.sp kernels are used there
        self._wgmma: dict[int, bool] = {}
        #: per device index: why the wgmma.sp path is (not) used (see :meth:`_selfcheck`)
        self.wgmma_status: dict[int, str] = {}

    # ---- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        if all(c < (8, 0) for c in caps):
            name = torch.cuda.get_device_name(0)
            return (f"GPU {name} is sm_{caps[0][0]}{caps[0][1]}; the sparse tensor cores (mma.sp) need "
                    "sm_80 or newer")
        try:
            from .. import _build_cuda

            self._C = _build_cuda.load()
        except Exception as e:  # noqa: BLE001 - report the real build/import error
            return f"the CUDA extension sparsefast._C failed to build or load: {type(e).__name__}: {e}"
        if os.environ.get("SPARSEFAST_CUDA_SELFCHECK", "1") in ("", "0"):
            return None
        for i, c in enumerate(caps):
            if c < (8, 0):
                continue
            reason = self._selfcheck(i, c)
            if reason is not None:
                return reason
        return None

    def _selfcheck_problem(self, idx: int, path: int) -> float:
        """Worst relative error of the 2:4 GEMM on ``path`` over bf16/f16 on a random 300x320x200 problem."""
        dev = torch.device("cuda", idx)
        g = torch.Generator(device="cpu").manual_seed(0)
        worst = 0.0
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(300, 320, generator=g).to(dev, dt)
            w = torch.randn(200, 320, generator=g).to(dev, dt)
            b = torch.randn(200, generator=g).to(dev, dt)
            m = _masks.nm_mask(w.float(), 2, 4)
            v, meta = self._C.sf24_pack(w, m)
            y = self._C.sf24_linear(x, v, None, meta, 200, b, path)
            ref = torch.nn.functional.linear(x.float(), (w * m).float(), b.float())
            err = float((y.float() - ref).norm() / ref.norm())
            worst = max(worst, err if err == err else float("inf"))  # NaN -> inf
        return worst

    def _selfcheck(self, idx: int, cap: tuple[int, int]) -> str | None:
        """Once per device at backend load (it synchronizes; never inside a captured graph): the mma.sp
        kernels must reproduce a dense product (else the backend is unavailable, with the numbers), and on
        sm_90 the wgmma.sp kernels are enabled only if they do too (``SPARSEFAST_CUDA_WGMMA=0`` never,
        ``=1`` without checking). ``SPARSEFAST_CUDA_SELFCHECK=0`` skips all of it (mma.sp only)."""
        try:
            err0 = self._selfcheck_problem(idx, 0)
        except Exception as e:  # noqa: BLE001
            return f"the 2:4 kernel self-check on cuda:{idx} raised {type(e).__name__}: {e}"
        if not err0 < 2e-2:
            return (f"the 2:4 kernel self-check on cuda:{idx} (sm_{cap[0]}{cap[1]}) failed: relative error "
                    f"{err0:.3g} against a dense product")
        if cap != (9, 0):
            return None
        mode = os.environ.get("SPARSEFAST_CUDA_WGMMA", "auto").strip().lower()
        if mode in ("0", "off", "false"):
            self.wgmma_status[idx] = "off (SPARSEFAST_CUDA_WGMMA=0): mma.sp kernels"
            return None
        if mode in ("1", "on", "true"):
            self.wgmma_status[idx] = "on (SPARSEFAST_CUDA_WGMMA=1, not self-checked)"
            self._wgmma[idx] = True
            return None
        try:
            err1 = self._selfcheck_problem(idx, 1)
            ok = err1 < 2e-2 and err1 <= 2 * err0 + 1e-3
            self.wgmma_status[idx] = (f"on: wgmma.sp passed the self-check (rel. error {err1:.2e})" if ok else
                                      f"off: wgmma.sp self-check failed (rel. error {err1:.3g} vs mma.sp {err0:.2e})")
        except Exception as e:  # noqa: BLE001
            ok = False
            self.wgmma_status[idx] = f"off: wgmma.sp self-check raised {type(e).__name__}: {e}"
        if not ok:
            import warnings
            warnings.warn(f"sparsefast cuda backend, cuda:{idx}: {self.wgmma_status[idx]}; using the mma.sp kernels",
                          RuntimeWarning, stacklevel=2)
        self._wgmma[idx] = ok
        return None

    def _path(self, x: torch.Tensor, rows: int) -> int:
        """0: mma.sp kernels; 1: wgmma.sp (sm_90a) where enabled and the GEMM has enough rows to fill it."""
        if rows <= 64 or not self._wgmma:
            return 0
        idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return 1 if self._wgmma.get(idx, False) else 0

    def _capability(self, device: torch.device) -> tuple[int, int]:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._cap:
            self._cap[idx] = torch.cuda.get_device_capability(idx)
        return self._cap[idx]

    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        reasons = super().not_supported_reasons(q)
        if reasons:
            return reasons
        cap = self._capability(q.device)
        if cap < (8, 0):
            reasons.append(f"cuda backend needs sm_80+ (sparse tensor cores); device {q.device} is sm_{cap[0]}{cap[1]}")
        pat = q.pattern
        if pat.is_nm:
            if not fits_24(pat):
                reasons.append(f"cuda runs N:M patterns that fit the 2:4 tensor cores (2:4, 1:4, 1:2), not {pat}")
            ws = q.weight_shape
            if q.op == "linear":
                if ws[1] % 4:
                    reasons.append(f"cuda 2:4 needs in_features % 4 == 0, got {ws[1]}")
            else:
                conv = q.conv or ConvParams()
                if conv.groups != 1:
                    reasons.append(f"cuda 2:4 conv2d supports groups=1 only, got groups={conv.groups}")
                if ws[1] % 8:
                    reasons.append(f"cuda 2:4 conv2d needs in_channels/groups % 8 == 0, got {ws[1]}")
        else:
            if q.op != "linear":
                reasons.append("cuda has no unstructured conv2d kernel (use an N:M pattern, or triton/reference)")
            elif max(q.weight_shape) > _MAX_CSR_DIM:
                reasons.append(f"cuda unstructured kernels use 16-bit indices: both weight dims must be <= "
                               f"{_MAX_CSR_DIM}, got {tuple(q.weight_shape)}")
        return reasons

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        """Conservative routing until GPU measurements tune it (see PERF.md targets)."""
        if os.environ.get("SPARSEFAST_CUDA_NEVER_DENSE", "0") not in ("", "0"):
            return None
        ws = q.weight_shape
        if q.pattern.is_nm:
            if q.op == "linear":
                n, k = ws[0], ws[1]
                if n * k < (1 << 20):
                    return f"weight {n}x{k} is under 1M entries: launch-bound, dense cuBLAS is as fast"
                if min(n, k) < 512:
                    return f"a weight dim below 512 ({n}x{k}) leaves too few tiles for the sparse kernel to win"
                return None
            o, c, kh, kw = ws
            if o < 64 or c * kh * kw < 256:
                return f"conv weight {tuple(ws)}: too small for the sparse implicit GEMM to beat cuDNN"
            return None
        # unstructured: CUDA-core SpMM against tensor-core cuBLAS
        d = q.density
        if d is None:
            return "mask density unknown: the unstructured kernels only win at high sparsity"
        m = q.m_rows if q.m_rows is not None else 1 << 30
        limit = 0.10 if m <= 64 else 0.05 if m <= 256 else 0.02
        if d > limit:
            return (f"density {d:.3f} > {limit} at {m if m < (1 << 30) else 'unknown'} rows: CUDA-core SpMM loses "
                    "to dense tensor cores there")
        return None

    # ---- packing ------------------------------------------------------------------------------
    def _pack24(self, w2d: torch.Tensor, m2d: torch.Tensor) -> Packed24:
        C = self._C
        if w2d.dtype == torch.float32:
            hi = w2d.to(torch.bfloat16)
            lo = (w2d - hi.float()).to(torch.bfloat16)
            vh, meta = C.sf24_pack(hi, m2d)
            vl, _ = C.sf24_pack(lo, m2d)
            return Packed24(vh, vl, meta, w2d.shape[0], w2d.shape[1])
        v, meta = C.sf24_pack(w2d, m2d)
        return Packed24(v, None, meta, w2d.shape[0], w2d.shape[1])

    def pack(self, weight: torch.Tensor, mask: torch.Tensor, pattern: Pattern) -> Any:
        if pattern.is_nm:
            return self._pack24(_masks.reduction_view(weight).contiguous(), _masks.reduction_view(mask).contiguous())
        csr = self._csr(mask)
        return weight.reshape(-1)[csr.flat]

    def _csr(self, mask: torch.Tensor) -> Csr:
        return self.cached("csr", (mask,), lambda: build_csr(mask))

    def _csr_t(self, mask: torch.Tensor) -> Csr:
        def build() -> Csr:
            R, C = mask.shape
            # flat position k*R + n of mask.t() -> n*C + k in the weight
            pos = torch.arange(R * C, device=mask.device).reshape(R, C).t().reshape(-1)
            return build_csr(mask.t().contiguous(), flat_of=pos)
        return self.cached("csr_t", (mask,), build)

    def _transposable(self, mask: torch.Tensor) -> bool:
        def check() -> bool:
            R, C = mask.shape
            return R % 4 == 0 and C % 4 == 0 and _masks.is_transposable_nm(mask, 2, 4)
        return self.cached("transposable", (mask,), check)

    def _packed_t(self, weight: torch.Tensor, mask: torch.Tensor) -> Packed24:
        return self.cached("pack_t", (weight, mask),
                           lambda: self._pack24(weight.t().contiguous(), mask.t().contiguous()))

    def _masked(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cached("masked", (weight, mask), lambda: weight * mask)

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _transposed_padded(t: torch.Tensor, zero_pad: bool) -> torch.Tensor:
        """(M, K) -> contiguous (K, ldm) with ldm = round_up(M, 8); pad columns zero when asked."""
        M, K = t.shape
        ldm = (M + 7) // 8 * 8
        out = t.new_zeros(K, ldm) if (zero_pad and ldm != M) else t.new_empty(K, ldm)
        out[:, :M].copy_(t.t())
        return out

    # ---- linear -------------------------------------------------------------------------------
    def linear_fwd(self, x, weight, mask, bias, pattern):
        if pattern.is_nm:
            p = self.packed(weight, mask, pattern)
            return self._C.sf24_linear(x, p.vals, p.vals_lo, p.meta, p.R, bias, self._path(x, x.shape[0]))
        vals = self.packed(weight, mask, pattern)
        csr = self._csr(mask)
        M = x.shape[0]
        xT = self._transposed_padded(x, zero_pad=False)
        yT = self._C.csr_spmm(csr.row_ptr, csr.col, vals, csr.row_order, csr.C, xT, M, bias)
        return yT[:, :M].t().contiguous()

    def linear_dx(self, dy, weight, mask, pattern):
        if pattern.is_nm:
            if self._transposable(mask):
                p = self._packed_t(weight, mask)
                return self._C.sf24_linear(dy, p.vals, p.vals_lo, p.meta, p.R, None, self._path(dy, dy.shape[0]))
            return dy @ self._masked(weight, mask)
        csr_t = self._csr_t(mask)
        vals_t = self.cached("vals_t", (weight, mask), lambda: weight.reshape(-1)[csr_t.flat])
        M = dy.shape[0]
        dyT = self._transposed_padded(dy, zero_pad=False)
        dxT = self._C.csr_spmm(csr_t.row_ptr, csr_t.col, vals_t, csr_t.row_order, csr_t.C, dyT, M, None)
        return dxT[:, :M].t().contiguous()

    def linear_dw(self, dy, x, mask, pattern):
        if pattern.is_nm:
            return (dy.t() @ x).mul_(mask)
        csr = self._csr(mask)
        M = dy.shape[0]
        dyT = self._transposed_padded(dy, zero_pad=True)
        xT = self._transposed_padded(x, zero_pad=True)
        return self._C.csr_sddmm(csr.row_ptr, csr.col, csr.row_order, csr.C, dyT, xT, M)

    # ---- conv ---------------------------------------------------------------------------------
    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        p = self.packed(weight, mask, pattern)
        o, _, kh, kw = weight.shape
        y = self._C.sf24_conv2d(x, p.vals, p.vals_lo, p.meta, o, kh, kw, list(conv.stride), list(conv.padding),
                                list(conv.dilation), bias, self._path(x, x.shape[0] * x.shape[2] * x.shape[3]))
        return _like(y, x)

    def _conv_dx_sparse_ok(self, dy, weight, mask, conv: ConvParams, input_shape: Sequence[int]) -> bool:
        """Stride-1 dgrad is a forward conv of dy with W' = flip(W)ᵀ (in/out channels swapped, reduction
        (kh, kw, o)): it runs on the 2:4 kernel when the mask is also 2:4 along the output channels at every
        kernel position ("transposable" per tap) and the shapes fit."""
        o, c, kh, kw = weight.shape
        if conv.groups != 1 or tuple(conv.stride) != (1, 1) or o % 8 or c % 4:
            return False
        pad = [d * (k - 1) - p for d, k, p in zip(conv.dilation, (kh, kw), conv.padding)]
        if min(pad) < 0:
            return False
        ho, wo = dy.shape[-2:]
        if (ho + 2 * pad[0] - conv.dilation[0] * (kh - 1), wo + 2 * pad[1] - conv.dilation[1] * (kw - 1)) != \
                tuple(input_shape[-2:]):
            return False

        def check() -> bool:
            per_tap = mask.permute(2, 3, 1, 0).reshape(-1, o)  # (kh*kw*c, o): groups of 4 along o
            return _masks.is_nm(per_tap, 2, 4)
        return self.cached("conv_t_ok", (mask,), check)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        if pattern.is_nm and self._conv_dx_sparse_ok(dy, weight, mask, conv, input_shape):
            def build() -> Packed24:
                wt = weight.flip(2, 3).transpose(0, 1)  # (c, o, kh, kw)
                mt = mask.flip(2, 3).transpose(0, 1)
                return self._pack24(_masks.reduction_view(wt).contiguous(), _masks.reduction_view(mt).contiguous())
            p = self.cached("pack_conv_t", (weight, mask), build)
            o, c, kh, kw = weight.shape
            pad = [d * (k - 1) - q for d, k, q in zip(conv.dilation, (kh, kw), conv.padding)]
            dx = self._C.sf24_conv2d(dy, p.vals, p.vals_lo, p.meta, c, kh, kw, [1, 1], pad, list(conv.dilation),
                                     None, self._path(dy, dy.shape[0] * int(input_shape[-2]) * int(input_shape[-1])))
            return _like(dx, dy)
        return torch.nn.grad.conv2d_input(list(input_shape), self._masked(weight, mask), dy, conv.stride,
                                          conv.padding, conv.dilation, conv.groups)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), dy, conv.stride, conv.padding, conv.dilation,
                                         conv.groups)
        return gw.mul_(mask)
