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
  Conv weights use the (O, g*K) **block-diagonal** matrix of their reduction views (K = C/g*kh*kw in
  ``(kh, kw, c)`` order, :func:`sparsefast.masks.reduction_view`; group ``i``'s columns shifted by ``i*K``),
  so every group runs in one launch; its transpose (g*K, O) serves the input gradient.

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
                   unstructured (any stride/padding/dilation/groups): im2col into the kernels' transposed
                   layout (one strided gather, rows ``(group, kh, kw, c)``, columns ``(b, ho, wo)``), then the
                   SpMM with the block-diagonal CSR, bias fused.
conv_dx            2:4, stride 1, with a mask that is also 2:4 along the output channels at every tap: the
                   same implicit GEMM on flip(W)ᵀ (dgrad as a forward conv). Other 2:4 masks: cuDNN on the
                   masked weight. unstructured: SpMM with the transposed CSR over dy, then col2im (``F.fold``).
conv_dw            2:4: cuDNN weight gradient then ``*= M``. unstructured: SDDMM of dy with the im2col matrix
                   at the kept positions only (groups > 1: the block-diagonal (O, g*K) result, each output
                   channel's own block kept; g times the weight's size in scratch memory).
=================  =======================================================================================

Unstructured conv materialises the im2col matrix (kh*kw times the input); ``prefer_dense_reason`` sends it
to cuDNN unless the mask is very sparse and the layer wide (see :meth:`CudaBackend.prefer_dense_reason`).
The two CSR kernels are called only through :meth:`CudaBackend._spmm` / :meth:`CudaBackend._sddmm`, so the
composition around them is tested on CPU against ``F.conv2d`` / ``torch.nn.grad`` with a torch emulation.

dtypes: float16 and bfloat16 natively (fp32 accumulation). **float32** on the 2:4 tensor cores is computed
as three bf16 products of a hi/lo split (``x_hi w_hi + x_lo w_hi + x_hi w_lo``, fp32 accumulation):
relative error about 1e-5 (tests use rtol 1e-4); unstructured float32 runs in plain fp32.

Kernels per GPU: sm_80+ run ``mma.sp.m16n8k32`` (cp.async multistage pipeline, three tile shapes chosen by
M, a k-split shape for M <= 32; for mid-size M whose tiles leave SMs idle -- few output features, K of at
least 512 -- the mid tile also splits K over up to 16 blocks, adding fp32 partials atomically into a
zeroed fp32 buffer that is cast once: ``sf24_split_k`` in csrc/sf24.cu). sm_90 (H100/H200) additionally
has a ``wgmma.mma_async.sp.m64n128k32`` kernel (sm_90a build; A from registers, B through
128-byte-swizzled shared-memory descriptors) used for GEMMs with more than 64 rows on each dtype whose
``2:4 wgmma.sp`` self-check family passed
(``SPARSEFAST_CUDA_WGMMA=0/1`` forces it off/on without a check; ``CudaBackend.wgmma_status`` says what
happened); with the self-checks skipped it stays off unless forced on.

Self-checks (:mod:`sparsefast.backends.selfcheck`, :func:`_families`): before first use per device and
dtype, each kernel family -- ``mma.sp`` small / mid / big tiles, the mid tile's K split, ``wgmma.sp``, the
fp32 hi/lo split, 2:4 conv, CSR SpMM, CSR SDDMM -- runs a small problem against the reference; a failed
one is disabled (``auto`` falls back, an explicit request raises). ``SPARSEFAST_SELF_CHECK=0`` skips them all,
``SPARSEFAST_CUDA_SELFCHECK=0`` (the older name) this backend's.

Limits: every call is CUDA-graph safe (no host syncs, all memory from torch's allocator) once its families are
self-checked (a check never runs during capture: it refuses, see above) and a mask's
structures are cached. ``prefer_dense_reason`` is conservative until GPU measurements tune it
(``SPARSEFAST_CUDA_NEVER_DENSE=1`` disables it for benchmarking). Unstructured: 16-bit column indices
(linear: both weight dims <= 65536; conv: out_channels and in_channels*kh*kw <= 65536) and the SpMM grid
(at most 65535*128 GEMM rows -- batch rows or output pixels -- in float32, twice that in 16-bit types);
calls outside these limits are reported by ``not_supported_reasons`` (``auto`` goes elsewhere).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import masks as _masks
from .base import Backend, ConvParams, OpQuery, conv_dx_dense, conv_output_hw, masked
from .reference import ReferenceBackend
from ..masks import Pattern

__all__ = ["CudaBackend", "fits_24"]

#: masked-dense primitives (stateless), for the N:M weight gradients
_DENSE = ReferenceBackend()

_MAX_CSR_DIM = 65536  # uint16 column indices
#: csr_spmm's grid.y = ceil(M / (32 lanes * one 16-byte vector)) must stay <= 65535 (csrc/csr.cu)
_MAX_SPMM_ROWS = {torch.float32: 65535 * 32 * 4, torch.float16: 65535 * 32 * 8, torch.bfloat16: 65535 * 32 * 8}


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


def build_csr(mask: torch.Tensor, flat_of: torch.Tensor | None = None, col_offset: torch.Tensor | None = None,
              n_cols: int | None = None) -> Csr:
    """SFCSR structure of a 2-D bool mask (R, C). ``flat_of`` optionally maps positions of ``mask``'s flat
    storage to positions in another tensor (used for the transposed and conv structures). ``col_offset``
    (R,) optionally shifts every column of a row (block-diagonal matrices: grouped conv), and ``n_cols``
    is then the logical column count (default C). Syncs once (nonzero)."""
    R, C = mask.shape
    n_cols = C if n_cols is None else int(n_cols)
    if n_cols > _MAX_CSR_DIM:
        raise ValueError(f"SFCSR stores 16-bit column indices: {n_cols} columns > {_MAX_CSR_DIM}")
    counts = mask.sum(1, dtype=torch.int32)
    row_ptr = torch.zeros(R + 1, dtype=torch.int32, device=mask.device)
    row_ptr[1:] = torch.cumsum(counts, 0, dtype=torch.int32)
    idx = mask.reshape(-1).nonzero().squeeze(1)  # row-major order == CSR order
    c = idx % C
    if col_offset is not None:
        c = c + col_offset.to(device=idx.device, dtype=torch.int64)[idx // C]
    col = _to_u16_bits(c)
    row_order = torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)
    flat = idx if flat_of is None else flat_of[idx]
    return Csr(row_ptr, col, row_order, flat, R, n_cols)


def conv_out_size(hw: Sequence[int], k: Sequence[int], conv: ConvParams) -> tuple[int, int]:
    """Output (Ho, Wo) of a conv2d with kernel ``k`` on an input of spatial size ``hw``."""
    return conv_output_hw(hw[0], hw[1], k, conv.stride, conv.padding, conv.dilation)


def build_conv_csr(mask: torch.Tensor, groups: int) -> Csr:
    """SFCSR of a conv mask (O, C/g, kh, kw) as the block-diagonal (O, g*K) matrix, K = C/g*kh*kw: row o
    of group ``o // (O/g)`` holds its reduction-view columns ((kh, kw, c) order, channel fastest) shifted by
    ``group * K``, so one SpMM over the im2col matrix (rows (group, kh, kw, c)) runs every group.
    ``flat`` indexes the weight's (logical, row-major) flat storage."""
    O = mask.shape[0]
    Og, K = O // groups, mask[0].numel()
    pos = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape)
    m_rv = _masks.reduction_view(mask).contiguous()
    p_rv = _masks.reduction_view(pos).reshape(-1)
    offs = torch.arange(O, device=mask.device) // Og * K
    return build_csr(m_rv, flat_of=p_rv, col_offset=offs, n_cols=groups * K)


def build_conv_csr_t(mask: torch.Tensor, groups: int) -> Csr:
    """SFCSR of the transpose of :func:`build_conv_csr`'s matrix: (g*K, O), row (group, k) holding the
    output channels of its group (the input-gradient SpMM)."""
    O = mask.shape[0]
    Og, K = O // groups, mask[0].numel()
    pos = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape)
    m_t = _masks.reduction_view(mask).reshape(groups, Og, K).transpose(1, 2).reshape(groups * K, Og)
    p_t = _masks.reduction_view(pos).reshape(groups, Og, K).transpose(1, 2).reshape(-1)
    offs = torch.arange(groups * K, device=mask.device) // K * Og
    return build_csr(m_t.contiguous(), flat_of=p_t, col_offset=offs, n_cols=O)


def im2col_t(x: torch.Tensor, kh: int, kw: int, conv: ConvParams, zero_pad: bool) -> torch.Tensor:
    """The transposed im2col matrix of ``x`` (B, C, H, W) for the SFCSR kernels: a contiguous
    (C*kh*kw, ldm) tensor, ldm = round_up(M, 8), M = B*Ho*Wo; row ``(group, i, j, c)`` (channel fastest
    inside a group: the reduction order of :func:`sparsefast.masks.reduction_view`), column
    ``(b, ho, wo)``. One strided gather from the (padded) input, any memory format. Columns >= M are zero
    when ``zero_pad`` (the SDDMM sums whole 16-byte vectors), else left uninitialised (the SpMM ignores
    them)."""
    B, C, H, W = x.shape
    G = conv.groups
    Cg = C // G
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    Ho, Wo = conv_out_size((H, W), (kh, kw), conv)
    M = B * Ho * Wo
    ldm = (M + 7) // 8 * 8
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    sB, sC, sH, sW = xp.stride()
    patches = xp.as_strided((B, G, Cg, kh, kw, Ho, Wo), (sB, Cg * sC, sC, dh * sH, dw * sW, sh * sH, sw * sW),
                            xp.storage_offset())
    out = x.new_zeros(C * kh * kw, ldm) if (zero_pad and ldm != M) else x.new_empty(C * kh * kw, ldm)
    out[:, :M].unflatten(1, (B, Ho, Wo)).unflatten(0, (G, kh, kw, Cg)).copy_(patches.permute(1, 3, 4, 2, 0, 5, 6))
    return out


def nchw_t(t: torch.Tensor, zero_pad: bool) -> torch.Tensor:
    """(B, O, Ho, Wo) -> contiguous (O, ldm) with column ``(b, ho, wo)``, ldm = round_up(B*Ho*Wo, 8)."""
    B, O, Ho, Wo = t.shape
    M = B * Ho * Wo
    ldm = (M + 7) // 8 * 8
    out = t.new_zeros(O, ldm) if (zero_pad and ldm != M) else t.new_empty(O, ldm)
    out[:, :M].unflatten(1, (B, Ho, Wo)).copy_(t.transpose(0, 1))
    return out


def _like(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The kernels write NHWC (channels_last); hand the result back in ``ref``'s memory format, as cuDNN
    does (channels_last models pay nothing, NCHW ones one transpose of the output)."""
    if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        return y
    return y.contiguous()


def _in_format_of(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A dense copy of ``y`` (any strides) in ``ref``'s memory format (channels_last or contiguous)."""
    cl = ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
    return y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    auto_priority = {"cuda": 20}
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self) -> None:
        super().__init__()
        self._C: Any = None
        self._cap: dict[int, tuple[int, int]] = {}
        #: per (device index, dtype): True when the sm_90a wgmma.sp kernels are used there
        self._wgmma: dict[tuple[int, torch.dtype], bool] = {}
        #: per device index: why the wgmma.sp path is (not) used (its self-check family, or the env var)
        self.wgmma_status: dict[int, str] = {}
        self._forced = threading.local()  # .path: the kernel path a self-check forces (None: by rows)

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
        mode = _wgmma_mode()
        for i, c in enumerate(caps):
            if c != (9, 0):
                continue
            if mode == "off":
                self.wgmma_status[i] = "off (SPARSEFAST_CUDA_WGMMA=0): mma.sp kernels"
            elif mode == "on":
                self.wgmma_status[i] = "on (SPARSEFAST_CUDA_WGMMA=1, not self-checked)"
                self._wgmma.update({(i, dt): True for dt in self.dtypes})
            else:
                self.wgmma_status[i] = ("pending: enabled per dtype once its self-check family passes (first call "
                                        "with more than 64 GEMM rows, or sparsefast.backends.self_check())")
        return None

    # ---- self-checks (sparsefast.backends.selfcheck) -------------------------------------------
    def self_check_families(self):
        """The CUDA kernel families, checked on first use per device and dtype (see :func:`_families`)."""
        return _families()

    @contextlib.contextmanager
    def _force_path(self, path: int):
        """Run the 2:4 GEMMs on kernel ``path`` (0: mma.sp, 1: wgmma.sp) in this thread (self-checks)."""
        old = getattr(self._forced, "path", None)
        self._forced.path = path
        try:
            yield
        finally:
            self._forced.path = old

    def _wgmma_result(self, device: torch.device, dtype: torch.dtype, ok: bool) -> None:
        """The wgmma.sp family's verdict on ``device``/``dtype``: turns that path on or off there."""
        idx = device.index or 0
        self._wgmma[(idx, dtype)] = ok
        done = {str(d).replace("torch.", ""): v for (i, d), v in self._wgmma.items() if i == idx}
        self.wgmma_status[idx] = ("self-checked per dtype, wgmma.sp used for "
                                  + ", ".join(f"{d}: {'on' if v else 'off (failed, mma.sp used)'}"
                                              for d, v in sorted(done.items())))

    def _path(self, x: torch.Tensor, rows: int) -> int:
        """0: mma.sp kernels; 1: wgmma.sp (sm_90a) where enabled and the GEMM has enough rows to fill it.
        ``rows``: the GEMM's M -- batch rows (Linear) or output pixels B*Ho*Wo (conv)."""
        forced = getattr(self._forced, "path", None)
        if forced is not None:
            return forced
        if rows <= 64 or not self._wgmma:
            return 0
        idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return 1 if self._wgmma.get((idx, x.dtype), False) else 0

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
            ws = q.weight_shape
            if q.op == "linear":
                if max(ws) > _MAX_CSR_DIM:
                    reasons.append(f"cuda unstructured kernels use 16-bit indices: both weight dims must be <= "
                                   f"{_MAX_CSR_DIM}, got {tuple(ws)}")
            else:
                conv = q.conv or ConvParams()
                o, cg, kh, kw = ws
                red = conv.groups * cg * kh * kw  # im2col rows (the block-diagonal CSR's columns)
                if max(o, red) > _MAX_CSR_DIM:
                    reasons.append(f"cuda unstructured conv uses 16-bit indices: out_channels and in_channels*kh*kw "
                                   f"must be <= {_MAX_CSR_DIM}, got {o} and {red}")
            lim = _MAX_SPMM_ROWS.get(q.dtype, _MAX_SPMM_ROWS[torch.float32])
            if q.m_rows is not None and q.m_rows > lim:
                reasons.append(f"cuda SpMM grid limit: at most {lim} GEMM rows (batch rows / output pixels) in "
                               f"{str(q.dtype).replace('torch.', '')}, got {q.m_rows}")
        return reasons

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        """Conservative routing until GPU measurements tune it (see docs/PERF.md targets); unstructured conv:
        :meth:`_conv_unstructured_dense_reason`. ``explain()`` prints the returned reason."""
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
        if q.op == "conv":
            return self._conv_unstructured_dense_reason(q)
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

    @staticmethod
    def _conv_unstructured_dense_reason(q: OpQuery) -> str | None:
        """Unstructured conv = im2col (a kh*kw times larger copy of the input, written and read once) +
        CUDA-core SpMM (each kept weight reads one im2col row) against cuDNN's tensor-core implicit GEMM.
        Estimate (H100-class: ~2.5 TB/s HBM, dense bf16 ~400 TFLOP/s, the SpMM bound by L2 gathers): the
        im2col copy alone costs as much as the whole dense conv below ~320 output channels per group, and
        the SpMM needs density below ~2%: so this path is chosen only for density <= 1% with >= 512 output
        channels per group (not yet measured on a GPU; ``SPARSEFAST_CUDA_NEVER_DENSE=1`` forces it)."""
        conv = q.conv or ConvParams()
        og = q.weight_shape[0] // max(conv.groups, 1)
        d = q.density
        why = ("unstructured conv on cuda is im2col (kh*kw x the input, materialised) + CUDA-core SpMM, "
               "cuDNN's tensor-core conv wins")
        if d is None:
            return f"mask density unknown: {why} except at very high sparsity"
        if d > 0.01:
            return f"density {d:.3f} > 0.01: {why} at this density"
        if og < 512:
            return (f"{og} output channels per group < 512: the im2col copy alone costs about as much as cuDNN's "
                    "whole conv")
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
        if weight.dim() == 4:
            # the conv structure's CSR order is the same for every groups value (only the columns shift)
            return weight.reshape(-1)[self._conv_csr(mask, 1).flat]
        csr = self._csr(mask)
        return weight.reshape(-1)[csr.flat]

    def _conv_csr(self, mask: torch.Tensor, groups: int) -> Csr:
        if groups < 1 or mask.shape[0] % groups:
            raise ValueError(f"conv weight with {mask.shape[0]} output channels does not split into {groups} groups")
        return self.cached(f"conv_csr{groups}", (mask,), lambda: build_conv_csr(mask, groups))

    def _conv_csr_t(self, mask: torch.Tensor, groups: int) -> Csr:
        if groups < 1 or mask.shape[0] % groups:
            raise ValueError(f"conv weight with {mask.shape[0]} output channels does not split into {groups} groups")
        return self.cached(f"conv_csr_t{groups}", (mask,), lambda: build_conv_csr_t(mask, groups))

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
        return self.cached("masked", (weight, mask), lambda: masked(weight, mask))

    # ---- kernel calls (CPU tests replace these two with a torch emulation of the same contract) ----
    def _spmm(self, csr: Csr, vals: torch.Tensor, xT: torch.Tensor, M: int, bias: torch.Tensor | None) -> torch.Tensor:
        """``yT (R, ldm) = W_csr (R, csr.C) @ xT (csr.C, ldm)[:, :M] (+ bias)`` (``csr_spmm``): ``xT``
        contiguous, ldm % 8 == 0; columns >= M of the result are unspecified."""
        return self._C.csr_spmm(csr.row_ptr, csr.col, vals, csr.row_order, csr.C, xT, M, bias)

    def _sddmm(self, csr: Csr, aT: torch.Tensor, bT: torch.Tensor, M: int) -> torch.Tensor:
        """Dense ``(R, csr.C)`` with ``out[r, c] = aT[r] . bT[c]`` at the stored positions, zero elsewhere
        (``csr_sddmm``): ``aT (R, ldm)``, ``bT (csr.C, ldm)`` contiguous, ldm % 8 == 0, zero in columns >= M
        (the kernel sums whole 16-byte vectors)."""
        return self._C.csr_sddmm(csr.row_ptr, csr.col, csr.row_order, csr.C, aT, bT, M)

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
        yT = self._spmm(csr, vals, xT, M, bias)
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
        dxT = self._spmm(csr_t, vals_t, dyT, M, None)
        return dxT[:, :M].t().contiguous()

    def linear_dw(self, dy, x, mask, pattern):
        if pattern.is_nm:
            return _DENSE.linear_dw(dy, x, mask, pattern)  # 50 % dense: cuBLAS beats any SDDMM
        csr = self._csr(mask)
        M = dy.shape[0]
        dyT = self._transposed_padded(dy, zero_pad=True)
        xT = self._transposed_padded(x, zero_pad=True)
        return self._sddmm(csr, dyT, xT, M)

    # ---- conv ---------------------------------------------------------------------------------
    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        if not pattern.is_nm:
            return self._conv_fwd_csr(x, weight, mask, bias, conv)
        p = self.packed(weight, mask, pattern)
        o, _, kh, kw = weight.shape
        ho, wo = conv_out_size(x.shape[-2:], (kh, kw), conv)
        # the GEMM's rows are the OUTPUT pixels (a strided conv has fewer than the input)
        y = self._C.sf24_conv2d(x, p.vals, p.vals_lo, p.meta, o, kh, kw, list(conv.stride), list(conv.padding),
                                list(conv.dilation), bias, self._path(x, x.shape[0] * ho * wo))
        return _like(y, x)

    # ---- unstructured conv: im2col + SpMM; SpMM on the transpose + col2im; SDDMM ----------------------
    @staticmethod
    def _conv_shapes(x_shape: Sequence[int], weight_shape: Sequence[int], conv: ConvParams,
                     what: str) -> tuple[int, int]:
        """(Ho, Wo) after checking that an input of ``x_shape`` fits the weight; ``ValueError`` otherwise."""
        if len(x_shape) != 4:
            raise ValueError(f"cuda conv2d {what}: expected a 4-D (B, C, H, W) input, got shape {tuple(x_shape)}")
        o, cg, kh, kw = (int(v) for v in weight_shape)
        if conv.groups < 1 or o % conv.groups or int(x_shape[1]) != cg * conv.groups:
            raise ValueError(f"cuda conv2d {what}: input {tuple(x_shape)} does not fit weight {(o, cg, kh, kw)} "
                             f"with groups={conv.groups}")
        ho, wo = conv_out_size([int(v) for v in x_shape[-2:]], (kh, kw), conv)
        if ho <= 0 or wo <= 0:
            raise ValueError(f"cuda conv2d {what}: input {tuple(x_shape)} is smaller than the {kh}x{kw} kernel "
                             f"(dilation {tuple(conv.dilation)}, padding {tuple(conv.padding)})")
        return ho, wo

    def _conv_vals(self, weight: torch.Tensor, mask: torch.Tensor, csr: Csr, tag: str) -> torch.Tensor:
        """Kept weight values in ``csr``'s order, re-gathered per weight version (no sync)."""
        return self.cached(tag, (weight, mask), lambda: weight.reshape(-1)[csr.flat], id(csr))

    def _conv_fwd_csr(self, x, weight, mask, bias, conv: ConvParams):
        ho, wo = self._conv_shapes(x.shape, weight.shape, conv, "forward")
        o, _, kh, kw = weight.shape
        B = x.shape[0]
        M = B * ho * wo
        csr = self._conv_csr(mask, conv.groups)
        vals = self._conv_vals(weight, mask, csr, f"conv_vals{conv.groups}")
        yT = self._spmm(csr, vals, im2col_t(x, kh, kw, conv, zero_pad=False), M, bias)  # (O, ldm)
        return _in_format_of(yT[:, :M].unflatten(1, (B, ho, wo)).transpose(0, 1), x)

    def _conv_dx_csr(self, dy, weight, mask, conv: ConvParams, input_shape: Sequence[int]):
        ho, wo = self._conv_shapes(input_shape, weight.shape, conv, "dX")
        B, C, H, W = (int(v) for v in input_shape)
        o, cg, kh, kw = weight.shape
        if tuple(dy.shape) != (B, o, ho, wo):
            raise ValueError(f"cuda conv2d dX: dy has shape {tuple(dy.shape)}, expected {(B, o, ho, wo)}")
        M, G = B * ho * wo, conv.groups
        csr_t = self._conv_csr_t(mask, G)
        vals_t = self._conv_vals(weight, mask, csr_t, f"conv_vals_t{G}")
        dcolsT = self._spmm(csr_t, vals_t, nchw_t(dy, zero_pad=False), M, None)  # (G*kh*kw*cg, ldm)
        cols = (dcolsT[:, :M].unflatten(1, (B, ho * wo)).unflatten(0, (G, kh * kw, cg))
                .permute(3, 0, 2, 1, 4).reshape(B, C * kh * kw, ho * wo))  # F.fold's order: (c, kh, kw)
        dx = torch.nn.functional.fold(cols, (H, W), (kh, kw), dilation=conv.dilation, padding=conv.padding,
                                      stride=conv.stride)
        return _in_format_of(dx, dy)

    def _conv_dw_csr(self, dy, x, mask, conv: ConvParams, weight_shape: Sequence[int]):
        ho, wo = self._conv_shapes(x.shape, weight_shape, conv, "dW")
        o, cg, kh, kw = (int(v) for v in weight_shape)
        B = x.shape[0]
        if tuple(dy.shape) != (B, o, ho, wo):
            raise ValueError(f"cuda conv2d dW: dy has shape {tuple(dy.shape)}, expected {(B, o, ho, wo)}")
        if tuple(mask.shape) != (o, cg, kh, kw):
            raise ValueError(f"cuda conv2d dW: mask shape {tuple(mask.shape)} != weight shape {(o, cg, kh, kw)}")
        M, G, K = B * ho * wo, conv.groups, cg * kh * kw
        csr = self._conv_csr(mask, G)
        out = self._sddmm(csr, nchw_t(dy, zero_pad=True), im2col_t(x, kh, kw, conv, zero_pad=True), M)  # (O, G*K)
        if G > 1:  # each output channel's own block of the block-diagonal result
            out = out.view(G, o // G, G, K).diagonal(dim1=0, dim2=2).permute(2, 0, 1).reshape(o, K)
        return _masks.from_reduction_view(out, (o, cg, kh, kw))

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
        if conv_output_hw(ho, wo, (kh, kw), 1, pad, conv.dilation) != tuple(input_shape[-2:]):
            return False

        def check() -> bool:
            per_tap = mask.permute(2, 3, 1, 0).reshape(-1, o)  # (kh*kw*c, o): groups of 4 along o
            return _masks.is_nm(per_tap, 2, 4)
        return self.cached("conv_t_ok", (mask,), check)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        if not pattern.is_nm:
            return self._conv_dx_csr(dy, weight, mask, conv, input_shape)
        if self._conv_dx_sparse_ok(dy, weight, mask, conv, input_shape):
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
        return conv_dx_dense(dy, self._masked(weight, mask), conv, input_shape)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape: Sequence[int]):
        if not pattern.is_nm:
            return self._conv_dw_csr(dy, x, mask, conv, weight_shape)
        return _DENSE.conv_dw(dy, x, mask, pattern, conv, weight_shape)


# ------------------------------------------------------------------------------------------------
# self-check families (sparsefast.backends.selfcheck). A 2:4 GEMM's tile is chosen in csrc/sf24.cu by
# its M (rows <= 32: small; else big where that gives >= one block per SM, else mid, with K split over
# blocks where even the mid tiles leave SMs idle and K is deep enough: sf24_split_k): Linear calls select
# the classes their M may take (all when unknown), convs all of them (dgrad's M is the input's pixels).
# f16/bf16 run the tile families, float32 the hi/lo split family (the same tiles, two packed operands).
# ------------------------------------------------------------------------------------------------
_FAMILIES: list = []


def _wgmma_mode() -> str:
    mode = os.environ.get("SPARSEFAST_CUDA_WGMMA", "auto").strip().lower()
    return "off" if mode in ("0", "off", "false") else "on" if mode in ("1", "on", "true") else "auto"


def _big_problem(device: torch.device, pattern) -> tuple:
    """A GEMM the big tile takes on this GPU: >= one 128x128 block per SM."""
    from .selfcheck import Problem

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    side = 128 * max(1, math.ceil(math.sqrt(sms)))
    return (Problem("fwd", (side, 64), side),)


def _families():
    if _FAMILIES:
        return _FAMILIES
    from .selfcheck import Family, Problem

    half = (torch.float16, torch.bfloat16)
    fp32 = (torch.float32,)

    def nm(q):
        return q.pattern.is_nm

    def small(q):
        return nm(q) and (q.op == "conv" or q.m_rows is None or q.m_rows <= 32)

    def wide(q):
        return nm(q) and (q.op == "conv" or q.m_rows is None or q.m_rows > 32)

    def sm90_auto(b, device):
        if torch.cuda.get_device_capability(device) != (9, 0):
            return "wgmma.sp needs an sm_90 GPU"
        mode = _wgmma_mode()
        return None if mode == "auto" else f"SPARSEFAST_CUDA_WGMMA={'0' if mode == 'off' else '1'}"

    mma = lambda b: b._force_path(0)  # noqa: E731 - the tile families check mma.sp, wgmma or not
    conv = ConvParams(padding=(1, 1))
    W4 = (16, 16, 3, 3)
    lin_small = (Problem("fwd", (64, 128), 16, mask="transposable"), Problem("dx", (64, 128), 16, mask="transposable"))
    lin_mid = (Problem("fwd", (64, 128), 64, mask="transposable"), Problem("dx", (64, 128), 64, mask="transposable"))
    # mid-size M on a few output features and a long reduction: csrc/sf24.cu splits K over blocks (fp32
    # partials added atomically) -- 64 features, 1024-deep: 4 splits on any GPU with more than 4 SMs
    lin_split = (Problem("fwd", (64, 1024), 48, mask="transposable"),
                 Problem("dx", (1024, 64), 48, mask="transposable"))
    conv_split = (Problem("fwd", (64, 128, 3, 3), 2, conv=conv, hw=(6, 6)),)
    _FAMILIES.extend([
        Family("2:4 mma.sp small tile", small, lin_small, dtypes=half, context=mma),
        Family("2:4 mma.sp mid tile", wide, lin_mid, dtypes=half, context=mma),
        Family("2:4 mma.sp big tile", wide, _big_problem, dtypes=half, context=mma),
        Family("2:4 mma.sp mid tile, K split", wide, lin_split + conv_split, dtypes=half, context=mma),
        Family("2:4 fp32 split (bf16 hi/lo)", nm, lin_small + lin_mid + lin_split + (Problem("fwd", W4, 2, conv=conv),),
               dtypes=fp32, context=mma),
        Family("2:4 wgmma.sp", lambda q: nm(q) and (q.op == "conv" or q.m_rows is None or q.m_rows > 64),
               (Problem("fwd", (200, 320), 300), Problem("dx", (64, 128), 96, mask="transposable"),
                Problem("fwd", (96, 32, 3, 3), 4, conv=ConvParams((2, 1), (1, 1)), hw=(17, 15))),
               required=False, skip=sm90_auto, context=lambda b: b._force_path(1),
               on_result=lambda b, device, dtype, ok: b._wgmma_result(device, dtype, ok)),
        Family("2:4 conv", lambda q: nm(q) and q.op == "conv",
               (Problem("fwd", W4, 2, conv=conv), Problem("dx", W4, 2, conv=conv, mask="transposable"),
                Problem("dx", W4, 2, conv=conv), Problem("dw", W4, 2, conv=conv)), context=mma),
        Family("CSR SpMM", lambda q: not nm(q),
               (Problem("fwd", (32, 64), 5, density=0.3), Problem("dx", (32, 64), 5, density=0.3),
                Problem("fwd", (8, 16, 3, 3), 2, conv=conv, density=0.3),
                Problem("fwd", (8, 8, 3, 3), 2, conv=ConvParams(padding=(1, 1), groups=2), density=0.3),
                Problem("dx", (8, 16, 3, 3), 2, conv=conv, density=0.3)), pattern="unstructured"),
        Family("CSR SDDMM", lambda q: not nm(q),
               (Problem("dw", (32, 64), 24, density=0.3), Problem("dw", (8, 16, 3, 3), 2, conv=conv, density=0.3)),
               pattern="unstructured"),
    ])
    return _FAMILIES
