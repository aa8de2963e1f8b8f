"""The ``cpu`` backend: C++ kernels from ``csrc/cpu/`` (extension ``sparsefast._C_cpu``).

Layers store kept values (:mod:`sparsefast.formats.kept`: CSR order of the reduction view ``(rows, K)``;
conv: ``(O, kh*kw*C/groups)``, channel fastest) and the kernels read them as they are. Index
structures (see ``csrc/cpu/kernels.h``) depend on the mask only and are cached per mask version:

* CSR: ``rowptr`` int32 + 16-bit column indices — the gather kernel for a single batch row (SpMV);
* CSR-positioned blocks of 256 reduction rows (``build_csr_blocks``) — the lane-panel kernels walk
  the CSR-ordered values block by block, so a block's X rows stay in L1; the same structure drives
  the scatter-style transposed kernel (``spmm_t``) that gives ``dX`` for up to 32 rows;
* the blocked per-group transpose and the permutation of its entries to value positions — ``dX``
  for more rows reads the values through that permutation in the kernel (Linear, <= 64 rows) or
  gathers the transpose's values once per call (block-major: cache-sized windows);
* BSR for ``block:B`` Linear masks (:meth:`CpuBackend._bsr`): block rows, block columns and where each
  block starts in the kept values — forward, dX and (B = 16 / 32) dW run GEMM micro-kernels over the
  kept blocks, reading the values in place (conv block masks run the CSR kernels);
* compact N:M (n in {1, 2, 4, 8}, m <= 16): 4-bit in-group offsets; the slot values are the kept
  values when every group is full — the forward of N:M Linear layers at any row count (conv: the
  CSR blocks); an AVX-512 kernel selects the x values with ``vpermt2ps`` instead of gathers for few rows,
  the lane-panel kernel walks several weight rows together for more.

The dense-weight primitives (``linear_fwd`` ...) are the base class's: they gather the kept values
from the dense weight and run the kept primitives, the one implementation.

Kernels: forward SpMM and ``dX`` (SpMM through the transpose) vectorised over the batch — the dense
operand is laid out batch-transposed in 16/32-lane fp32 panels, so each kept weight is loaded once
and multiplies a vector of batch rows (or output pixels for conv: im2col of a few images at a time
into a cache-resident buffer); the masked ``dW`` is an SDDMM at the kept positions only (up to 256
lanes per reduction), written in the values' order (or, for dense masks with many rows, the dense GEMM
gathered at the kept positions: :func:`kept_sddmm_crossover`).
Threads: torch's OpenMP pool (``at::parallel_for``) over nnz-balanced row partitions. ISA: AVX-512 /
AVX2 / portable builds of the same kernels in one binary, chosen at run time (:meth:`describe`;
``SPARSEFAST_CPU_ISA=generic|avx2|avx512`` forces a lower one).

float32 and bfloat16 run natively (fp32 accumulation); float16 runs the float32 kernels on converted
operands; float64 is not supported (``auto`` uses the reference). ``auto`` routes to dense where it
is faster (:func:`crossover_density`, measured).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _build_cpu
from ..formats import kept as _kept
from ..masks import Block, Pattern, density, reduction_view
from .base import Backend, ConvParams, OpQuery, conv_dw_dense
from .reference import ReferenceBackend

__all__ = ["CpuBackend", "crossover_density", "sddmm_crossover", "kept_sddmm_crossover"]

_MAX_IDX = 65536
_MAX_NNZ = 2**31 - 1024
#: masked-dense primitives (stateless): calls with NaN/Inf operands and dense-enough weight gradients
_DENSE = ReferenceBackend()


def crossover_density(op: str, m_rows: int | None, dtype: torch.dtype, weight_shape: Sequence[int],
                      groups: int = 1, *, isa: str = "avx512", bf16_dot: bool = True) -> float:
    """Highest unstructured density at which the cpu kernels still beat dense (MKL / oneDNN) on a CPU
    whose kernel path is ``isa`` (``"avx512"``, ``"avx2"`` or ``"generic"``) and which has (or not)
    bf16 dot-product instructions (``bf16_dot``: AVX512-BF16, which makes dense bf16 GEMMs fast).

    The rule: about 80 % of the crossovers (dense/sparse = 1) measured per op, dtype, batch rows M and
    weight size on an AVX-512 (Zen 4, AVX512-BF16) and an AVX2 (Zen 3) machine, so ``auto`` does not
    pick a slower kernel near the edge. Low where dense is fast: one row against a cache-resident
    weight (dense GEMV: 0.1-0.12), a small float32 Linear weight with >= 128 rows (0.2,
    :data:`_SMALL_LINEAR`), bf16 where AVX512-BF16 makes dense bf16 fast (0.05-0.35); higher for more
    rows and larger float32 weights (up to 0.5); float32 3x3 convs 0.15 / 0.25 (< / >= 128 output
    channels per group).
    Without bf16 dot instructions the bf16 thresholds are the AVX2 ones whatever the ISA (dense bf16 is
    emulated: 0.28 at one row, else 0.7; convs 0.5); the portable (``generic``) kernels were not
    measured against dense and get half the AVX2 fp32 thresholds.

    measurements: docs/measurements.md
    """
    ws = tuple(int(v) for v in weight_shape)
    bf16 = dtype == torch.bfloat16
    numel = 1
    for v in ws:
        numel *= v
    m = m_rows if m_rows is not None else 64
    fast_bf16_dense = bf16_dot and isa == "avx512"
    if bf16 and not fast_bf16_dense:
        if op == "conv":
            return 0.5
        return 0.28 if m <= 1 else 0.7
    if op == "linear" and _small_linear(dtype, m, numel):
        return 0.1 if isa == "generic" else 0.2   # cache-resident weight (AVX-512: not measured, same rule)
    if isa == "avx512":
        if op == "conv":
            og = ws[0] // max(groups, 1)
            if bf16:
                return 0.12 if og >= 128 else 0.05
            return 0.25 if og >= 128 else 0.15
        if m <= 1:
            if numel * (2 if bf16 else 4) <= (8 << 20):  # dense weight stays in cache: dense GEMV is fast
                return 0.1
            return 0.35 if bf16 else 0.4
        if bf16:
            return 0.3 if m <= 16 else 0.2
        return 0.5 if m <= 64 else 0.45
    # avx2 (and half of it for the generic kernels); fp32 here
    if op == "conv":
        og = ws[0] // max(groups, 1)
        t = 0.25 if og >= 128 else 0.15
    elif m <= 1:
        t = 0.12 if numel * 4 <= (8 << 20) else 0.25
    else:
        t = 0.5 if m <= 64 else 0.4
    return t if isa == "avx2" else t / 2


#: Linear weights up to this many elements (2 MiB of float32) stay in cache, where dense GEMMs with
#: >= 128 rows are hard to beat: on AVX2, 2:4 forward was 0.96-1.08x dense at M = 256 and 0.83-1.06x
#: at M = 1024 for 1024x256, 256x1024 and 512x512 weights (1.2-1.5x for 768x3072 at M = 256), and the
#: training step at 30 % density 0.93x dense at M = 256 (1.3x at 10 %). Measured 2026-11-23.
_SMALL_LINEAR = 512 * 1024


def _small_linear(dtype: torch.dtype, m_rows: int | None, numel: int) -> bool:
    """A Linear call where a cache-resident float32 weight meets >= 128 rows (see _SMALL_LINEAR)."""
    return dtype == torch.float32 and m_rows is not None and m_rows >= 128 and numel <= _SMALL_LINEAR


def sddmm_crossover(op: str, m_rows: int, dtype: torch.dtype, numel: int, *, isa: str = "avx2",
                    bf16_dot: bool = False) -> float:
    """Highest mask density at which the masked weight gradient (SDDMM: only kept positions) still
    beats the dense ``dyᵀ x`` GEMM followed by the mask; above it ``linear_dw``/``conv_dw`` run the GEMM.

    Threshold 0.4 for float32 (and for bf16 where AVX512-BF16 makes dense bf16 fast: not measured),
    except large Linear weights (> 4M elements) with M <= 256 rows, where MKL's few-row GEMM is slow
    (1.0: always the SDDMM); the portable kernels get 0.2; bf16 without fast dense bf16: 1.0 (the
    SDDMM wins even at 0.5). Measured on AVX2 (Zen 3); the AVX-512 path uses the AVX2 numbers.

    measurements: docs/measurements.md"""
    fast_dense = dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_dot and isa == "avx512")
    if not fast_dense:
        return 1.0
    if op == "linear" and numel > (4 << 20) and m_rows <= 256:
        return 1.0
    return 0.2 if isa == "generic" else 0.4


def kept_sddmm_crossover(op: str, m_rows: int, dtype: torch.dtype, numel: int, *, isa: str = "avx2",
                         bf16_dot: bool = False) -> float:
    """:func:`sddmm_crossover` for kept-values layers, whose weight gradient is kept-sized: the SDDMM
    writes ``nnz`` values where the dense route writes the whole ``dyᵀx`` and then gathers it, so the
    SDDMM wins further up (measured 2026-12-06 on the AVX2 VM, Linear 4096x1024, 1024x4096, 512², 1024x256
    at density 0.3 / 0.5 / 2:4: the SDDMM is 1.4-2.2x faster at 16 rows at any of these densities,
    1.2-1.5x at 64 rows for density 0.3 and 0.6-0.97x at 0.5, 0.9-1.3x at 256 rows for 0.3;
    docs/measurements.md). Linear: 1.0 up to 32 rows, 0.35 up to 128, 0.25 above; conv (many rows) and
    the rest as :func:`sddmm_crossover`."""
    base = sddmm_crossover(op, m_rows, dtype, numel, isa=isa, bf16_dot=bf16_dot)
    if base >= 1.0 or op != "linear" or isa == "generic":
        return base
    if m_rows <= 32:
        return 1.0
    return 0.35 if m_rows <= 128 else 0.25


class CpuBackend(Backend):
    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    kept_native = True

    def __init__(self) -> None:
        super().__init__()
        self._ext = None
        self._err: str | None = None
        try:
            self._ext = _build_cpu.load()
        except Exception as e:  # noqa: BLE001 - reported by unavailable_reason()
            self._err = str(e)

    # ---- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        return self._err

    @property
    def ext(self):
        if self._ext is None:
            raise RuntimeError(f"sparsefast cpu backend is unavailable: {self._err}")
        return self._ext

    def describe(self) -> str:
        """Which kernel path runs here, e.g. ``"avx512 kernels, 2 threads (OpenMP)"``."""
        if self._ext is None:
            return f"unavailable: {self._err}"
        d = self._ext.describe()
        par = "OpenMP" if d["openmp"] else "no OpenMP: single-threaded"
        return (f"{d['isa']} kernels (compiled: {', '.join(d['isas'])}), {d['threads']} threads ({par}), "
                f"panel {d['panel']} lanes, gather kernel for <= {d['small_max']} rows")

    def set_isa(self, isa: str) -> None:
        """Force the kernel ISA (``"generic"``, ``"avx2"``, ``"avx512"``, ``"auto"``) — for tests."""
        self.ext.set_isa(isa)
        self._hw_info = None
        from . import clear_route_cache
        clear_route_cache()  # auto's choices depend on the kernel path

    _hw_info: dict | None = None

    def _hw(self) -> dict:
        """``{"isa": kernel path, "bf16_dot": AVX512-BF16}`` for :func:`crossover_density`. Asked on
        every ``auto`` call, so cached (``describe()`` builds a dict: ~2 us); :meth:`set_isa` resets it."""
        if self._hw_info is None:
            if self._ext is None:
                return {"isa": "generic", "bf16_dot": False}
            d = self._ext.describe()
            self._hw_info = {"isa": d["isa"], "bf16_dot": bool(d.get("bf16_dot", False))}
        return self._hw_info

    auto_priority = {"cpu": 10}
    uses_kept_index = False  # own formats (CSR from the kept index, blocks, N:M slots), kept after the index

    def extra_reasons(self, q: OpQuery) -> list[str]:
        """16-bit column indices and 32-bit offsets."""
        reasons = []
        ws = tuple(q.weight_shape)
        if q.op == "linear":
            if len(ws) != 2:
                reasons.append(f"linear weight must be 2-D, got {ws}")
            else:
                rows, k = ws
                if k > _MAX_IDX or rows > _MAX_IDX:
                    reasons.append(f"cpu uses 16-bit indices: in/out features must be <= {_MAX_IDX}, got {ws}")
        else:
            if len(ws) != 4:
                reasons.append(f"conv weight must be 4-D, got {ws}")
            else:
                groups = q.conv.groups if q.conv is not None else 1
                kred = ws[1] * ws[2] * ws[3]
                if kred > _MAX_IDX or ws[0] // max(groups, 1) > _MAX_IDX:
                    reasons.append(f"cpu uses 16-bit indices: C/groups*kh*kw and out_channels/groups must be "
                                   f"<= {_MAX_IDX}, got weight {ws}")
        numel = 1
        for s in ws:
            numel *= int(s)
        if numel > _MAX_NNZ:
            reasons.append(f"cpu uses 32-bit offsets: weight with {numel} elements is too large")
        return reasons

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        """Dense (reference) is faster for ``q``: tiny layers, or density above the measured crossover
        (:func:`crossover_density`); N:M Linear uses the compact N:M kernel where it wins (float32
        always, bfloat16 for single rows). The reason names the kernel path that would run."""
        hw = self._hw()
        path = hw["isa"]
        ws = tuple(q.weight_shape)
        numel = 1
        for s in ws:
            numel *= int(s)
        if numel < 4096:
            return f"tiny layer ({numel} weights): dense is faster than the {path} sparse kernels"
        dt = str(q.dtype).replace("torch.", "")
        groups = q.conv.groups if q.conv is not None else 1
        if q.pattern.is_nm:
            dens = q.pattern.density
            if (q.op == "linear" and dens <= 0.5 and path != "generic"
                    and not _small_linear(q.dtype, q.m_rows, numel)):
                if (q.dtype != torch.bfloat16 or (q.m_rows is not None and q.m_rows <= 1)
                        or not (hw["bf16_dot"] and path == "avx512")):
                    return None
                return (f"{q.pattern} {dt} with {q.m_rows} rows: dense bf16 GEMM (AVX512-BF16) is faster than "
                        f"the {path} sparse kernels (they win for 1 row)")
            limit = crossover_density(q.op, q.m_rows, q.dtype, ws, groups, **hw)
            if dens > limit:
                return (f"{q.pattern} keeps {dens:.0%} > {limit:.0%} (measured crossover for {q.op} {dt}): "
                        f"dense is faster than the {path} sparse kernels")
            return None
        if q.density is None:
            return None
        limit = crossover_density(q.op, q.m_rows, q.dtype, ws, groups, **hw)
        if q.density > limit:
            return (f"density {q.density:.0%} > {limit:.0%} (measured crossover for {q.op} {dt}, "
                    f"{q.m_rows} rows): dense is faster than the {path} sparse kernels")
        return None

    # ---- formats ------------------------------------------------------------------------------
    #: reduction rows per block of the column-blocked CSR (a 16/32-lane fp32 panel block: 16/32 KiB)
    BLOCK = 256

    @staticmethod
    def _m2d(mask: torch.Tensor) -> torch.Tensor:
        return reduction_view(mask).contiguous()

    def _csr(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rowptr int32, col int16) of the reduction view of the mask."""
        def build():
            # from the kept index a mask change computed, while it is cached: O(nnz), no scan of the mask.
            # Not recomputed for this: a layer releases the index after its forward, and a backward
            # that builds the CSR first (N:M Linear: the forward reads the N:M format) would otherwise
            # hold nnz int32s beside the backward's tensors (2:4 MLP training peak +18 MB)
            flat = _kept.cached_index(mask) if mask.dim() == 2 else None
            if flat is not None and flat.dtype == torch.int32 and hasattr(self.ext, "csr_from_flat"):
                return tuple(self.ext.csr_from_flat(flat, mask.shape[0], mask.shape[1]))
            return tuple(self.ext.build_csr(self._m2d(mask)))
        return self.cached("csr", (mask,), build)

    def _csr_t(self, mask: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-group transposes stacked ((groups*K) x rows/groups): (t_rowptr, t_col, t_perm -> CSR position)."""
        def build():
            rowptr, col = self._csr(mask)
            m2 = reduction_view(mask)
            return tuple(self.ext.build_transpose(rowptr, col, m2.shape[0], m2.shape[1], groups))
        return self.cached("csrT", (mask,), build, groups)

    @staticmethod
    def _nm_ok(pattern: Pattern, cols: int) -> bool:
        return (pattern.is_nm and pattern.n in (1, 2, 4, 8) and pattern.m <= 16 and cols % pattern.m == 0)

    def _nm(self, mask: torch.Tensor, pattern: Pattern):
        """(meta, valid-or-None) for the compact N:M format, or None if the mask does not fit it."""
        def build():
            m2 = self._m2d(mask)
            if not self._nm_ok(pattern, m2.shape[1]):
                return None
            try:
                return tuple(self.ext.build_nm(m2, pattern.n, pattern.m))
            except RuntimeError:  # mask is not actually n:m -> CSR
                return None
        return self.cached("nm", (mask,), build, str(pattern))

    def _bsr(self, mask: torch.Tensor, pattern: Pattern):
        """The BSR index of a ``block:B`` mask over the layer's kept values (``SpMat::bs`` in
        ``csrc/cpu/kernels.h``), for the forward (A = W) and for dX (A = Wᵀ): two tuples
        ``(rowptr, bptr, bcol, boff, bld)``, or ``None`` when the mask is not made of whole blocks (a
        mask that does not follow its pattern runs the CSR kernels). Built from the mask in O(numel)
        once per mask version; O(blocks) int32s.

        In CSR order a block row's kept values form one ``(B, nb*B)`` row-major matrix (``nb`` kept
        blocks), so block ``(i, t-th kept)`` starts at ``bptr[i]*B*B + t*B`` with row stride ``nb*B``:
        both products read the values where they are."""
        def build():
            b = pattern.b
            m2 = reduction_view(mask)
            r, c = m2.shape
            if r % b or c % b:
                return None
            blk = m2.reshape(r // b, b, c // b, b).any(dim=3).any(dim=1)
            cnt = blk.sum(1)
            if int(cnt.sum()) * b * b != int(torch.count_nonzero(m2)):  # a partly kept block (no int64 copy)
                return None
            i32 = torch.int32

            def index(blk: torch.Tensor, cnt: torch.Tensor, off: torch.Tensor, ld: torch.Tensor):
                bptr = torch.zeros(blk.shape[0] + 1, dtype=torch.int64)
                bptr[1:] = cnt.cumsum(0)
                rowptr = torch.zeros(blk.shape[0] * b + 1, dtype=torch.int64)
                rowptr[1:] = (cnt * b).repeat_interleave(b).cumsum(0)
                return (rowptr.to(i32), bptr.to(i32), blk.nonzero()[:, 1].to(i32).contiguous(), off.to(i32), ld.to(i32))

            bi, bj = blk.nonzero(as_tuple=True)  # row-major: the values' order of blocks
            start = torch.zeros(blk.shape[0] + 1, dtype=torch.int64)
            start[1:] = cnt.cumsum(0)
            off = start[bi] * b * b + (torch.arange(bi.numel()) - start[bi]) * b
            ld = cnt[bi] * b
            fwd = index(blk, cnt, off, ld)
            order = torch.argsort(bj * blk.shape[0] + bi)  # column-major: the transpose's block rows
            bwd = index(blk.t(), blk.sum(0), off[order], ld[order])
            return fwd, bwd
        return self.cached("bsr", (mask,), build, str(pattern))

    def _bsr_for(self, mask: torch.Tensor, pattern: Pattern, rows: int):
        """The BSR index where the block kernels run this call (a whole-block ``block:B`` mask and more
        than the gather kernels' rows), else ``None``."""
        if not isinstance(pattern, Block) or rows <= self.ext.small_max():
            return None
        return self._bsr(mask, pattern)

    # ---- shared helpers of the primitives -----------------------------------------------------
    # The dense-weight primitives (linear_fwd, ...) come from the base class: they gather the kept
    # values and run the kept primitives below, the only implementation.
    def _density(self, mask: torch.Tensor) -> float:
        def build():
            n = _kept.cached_nnz(mask)  # set after every mask change: no count over the mask
            return density(mask) if n is None else n / max(mask.numel(), 1)
        return self.cached("density", (mask,), build)

    def _dense_dw(self, op: str, mask: torch.Tensor, m_rows: int, dtype: torch.dtype, kept: bool = False) -> bool:
        """Above :func:`sddmm_crossover` (``kept``: :func:`kept_sddmm_crossover`) the dense GEMM plus the
        mask (or the gather of the kept positions) is faster than the SDDMM."""
        hw = self._hw()
        limit = (kept_sddmm_crossover(op, m_rows, dtype, mask.numel(), **hw) if kept
                 else sddmm_crossover(op, m_rows, dtype, mask.numel(), **hw))
        return self._density(mask) > limit

    @staticmethod
    def _conv_args(weight_shape, conv: ConvParams) -> tuple:
        return ([int(weight_shape[2]), int(weight_shape[3])], list(conv.stride), list(conv.padding),
                list(conv.dilation), int(conv.groups))


    # ---- kept values (what layers store: canonical CSR order of the reduction view) -----------
    # The kernels read the values as the layer stores them: the gather (few-row) kernels as CSR
    # values, the panel kernels through CSR-positioned block pointers (``build_csr_blocks``: the
    # block-major walk over CSR-ordered entries), the compact N:M kernel as slot values (the same
    # array when every group is full). ``dX`` reads the transpose's values: one nnz-sized
    # permutation gather per call. ``dW`` is written at the kept positions in CSR order: it *is*
    # the values' gradient. Nothing here depends on the values' version, so writes that bypass the
    # version counter (``.data``) are always seen.
    @staticmethod
    def _vc(values: torch.Tensor) -> torch.Tensor:
        """Values in the kernels' compute dtype (float16 runs the float32 kernels)."""
        v = values.detach()
        return (v.float() if v.dtype == torch.float16 else v).contiguous()

    def _cblk(self, mask: torch.Tensor) -> torch.Tensor:
        def build():
            rowptr, col = self._csr(mask)
            r, c = reduction_view(mask).shape
            return self.ext.build_csr_blocks(rowptr, col, r, c, self.BLOCK)
        return self.cached("cblk", (mask,), build)

    def _nm_slots(self, values: torch.Tensor, mask: torch.Tensor, pattern: Pattern):
        """(meta, slot values) of the compact N:M format, or None where the mask does not fit it."""
        nm = self._nm(mask, pattern)
        if nm is None:
            return None
        meta, valid = nm
        if valid is None:  # every group full: slot order is CSR order
            return meta, values
        pos = self.cached("nm-slots", (mask,), lambda: valid.reshape(-1).nonzero().reshape(-1), str(pattern))
        out = torch.zeros(valid.numel(), dtype=values.dtype)
        out[pos] = values
        return meta, out

    def _kept_fwd_fmt(self, values, mask, pattern, rows: int, compact_nm: bool = True) -> tuple:
        """(rowptr, col, meta, vals, n, m, bp, csr_blocks) for a forward with ``rows`` GEMM rows. N:M Linear
        reads the compact N:M format at every row count (its panel kernel beat the CSR-block walk 1.1-1.8x
        at 64-256 rows on the AVX2 VM, docs/measurements.md); convolutions (``compact_nm=False``) the CSR
        blocks (the N:M conv path was not measured against them)."""
        if pattern.is_nm and compact_nm:
            nm = self._nm_slots(values, mask, pattern)
            if nm is not None:
                return None, None, nm[0], nm[1], pattern.n, pattern.m, None, False
        rowptr, col = self._csr(mask)
        if rows <= self.ext.small_max():
            return rowptr, col, None, values, 0, 0, None, False
        return rowptr, col, None, values, 0, 0, self._cblk(mask), True

    def _blk_t_kept(self, mask: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocked transpose whose permutation points at canonical (CSR) value positions:
        (t_bp, t_bcol, perm int32: block-major transposed entry -> position in the layer's values)."""
        def build():  # the plain transpose is built, not cached: only its row pointers are kept
            rowptr, col = self._csr(mask)
            rows, cols = reduction_view(mask).shape
            t_rowptr, t_col, t_perm = self.ext.build_transpose(rowptr, col, rows, cols, groups)
            t_bp, t_bcol, perm_tb = self.ext.build_blocked(t_rowptr, t_col, groups * cols, rows // groups, self.BLOCK)
            return t_rowptr, t_bp, t_bcol, t_perm.long()[perm_tb.long()].to(torch.int32)
        return self.cached("blkT-kept", (mask,), build, groups)

    def _kept_dx_fmt(self, values, mask, groups: int, rows: int, in_kernel: bool = False) -> tuple:
        """(t_rowptr, t_col, t_vals, t_bp, csr_blocks, vperm) of the transpose. Its values in block-major
        order: each block of the transpose reads the values of BLOCK consecutive weight rows, a cache-sized
        window (the transposed-CSR order would read across all values; 2:4 1024x4096: 5 ms -> ~1 ms here).
        ``in_kernel`` (Linear): the panel kernel reads ``values[vperm[j]]`` itself -- no permuted copy
        written and read back per call (2:4 4096x1024: the copy was 2.5-4 ms of an 8 ms dX at 64 rows);
        convolutions gather the copy once per call (amortised over their many output pixels)."""
        if rows <= self.ext.small_max():
            t_rowptr, t_col, t_perm = self._csr_t(mask, groups)
            return t_rowptr, t_col, self.ext.gather_perm(values, t_perm), None, False, None
        t_rowptr, t_bp, t_bcol, perm = self._blk_t_kept(mask, groups)
        if in_kernel:
            return t_rowptr, t_bcol, values, t_bp, False, perm
        t_vals = self.ext.gather_perm(values, perm)
        return t_rowptr, t_bcol, (t_vals if t_vals.dtype == torch.float32 else t_vals.float()), t_bp, False, None

    def _kept_dw_fmt(self, mask, rows: int) -> tuple:
        rowptr, col = self._csr(mask)
        if rows <= self.ext.small_max():
            return rowptr, col, None, False
        return rowptr, col, self._cblk(mask), True

    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        if not self.ext.all_finite(x):
            return _DENSE.kept_linear_fwd(x, values, mask, bias, pattern)
        n, k = mask.shape
        bsr = self._bsr_for(mask, pattern, x.shape[0])
        if bsr is not None:
            return self.ext.spmm_bsr(x, n, k, *bsr[0], pattern.b, False, self._vc(values), bias)
        rowptr, col, meta, vals, nn_, mm, bp, cb = self._kept_fwd_fmt(self._vc(values), mask, pattern, x.shape[0])
        return self.ext.spmm(x, n, k, rowptr, col, meta, vals, nn_, mm, bias, bp, cb, None)

    #: up to this many rows, dX runs the scatter-style transposed kernel on the forward format (no
    #: permuted copy of the values); above, the gather of the transpose's values pays off. Measured on
    #: the AVX2 VM (1024x4096 / 4096x1024, 2:4 and 90 %): 1.7-2.5x faster at 16 rows, mixed at 64,
    #: 1.4-1.6x slower at 256 (its read-modify-writes outgrow the gather)
    SPMM_T_MAX = 32

    #: up to this many rows (two 32-lane panels) the Linear dX kernel reads the values through the
    #: transpose's permutation itself; above, each further panel would repeat those scattered reads, and
    #: one permuted copy per call is cheaper. AVX2 VM, 2:4, 2 threads: 4096x1024 / 1024x4096 at 64 rows
    #: 7.2 / 8.1 ms in-kernel vs 7.9 / 8.7 ms with the copy; at 256 rows 22 / 31 ms vs 18 / 18 ms
    DX_PERM_MAX = 64

    def kept_linear_dx(self, dy, values, mask, pattern):
        if not self.ext.all_finite(dy):
            return _DENSE.kept_linear_dx(dy, values, mask, pattern)
        n, k = mask.shape
        bsr = self._bsr_for(mask, pattern, dy.shape[0])
        if bsr is not None:
            return self.ext.spmm_bsr(dy, k, n, *bsr[1], pattern.b, True, self._vc(values), None)
        if self.ext.small_max() < dy.shape[0] <= self.SPMM_T_MAX:
            rowptr, col = self._csr(mask)
            return self.ext.spmm_t(dy, n, k, rowptr, col, self._vc(values), self._cblk(mask))
        t_rowptr, t_col, t_vals, t_bp, cb, vperm = self._kept_dx_fmt(self._vc(values), mask, 1, dy.shape[0],
                                                                    in_kernel=dy.shape[0] <= self.DX_PERM_MAX)
        return self.ext.spmm(dy, k, n, t_rowptr, t_col, None, t_vals, 0, 0, None, t_bp, cb, vperm)

    def _gather_kept(self, dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Kept values of a dense weight-shaped tensor in canonical (CSR) order: the parallel C++ gather
        with 16-bit columns (torch's index_select with int64 positions was ~2x slower here)."""
        rowptr, col = self._csr(mask)
        d2 = reduction_view(dense)
        return self.ext.gather_csr(d2.contiguous(), rowptr, col)

    #: dense-GEMM weight gradients are computed and gathered this many weight entries at a time (a block
    #: of output rows): the dense-shaped temporary is at most this big, not the whole weight (2:4 MLP
    #: training peak memory: 0.78x -> ~0.70x dense), and the GEMM blocks stay efficient
    DW_CHUNK = 1 << 20

    def kept_linear_dw(self, dy, x, mask, pattern):
        bsr = self._bsr_for(mask, pattern, x.shape[0]) if getattr(pattern, "b", 0) in (16, 32) else None
        if bsr is not None:  # block GEMM micro-kernels at the kept blocks (block:8 runs the CSR SDDMM)
            n, k = mask.shape
            return self.ext.sddmm_bsr(dy, x, n, k, *bsr[0][1:], pattern.b, int(bsr[0][0][-1]))
        if self._dense_dw("linear", mask, x.shape[0], x.dtype, kept=True):  # dense GEMM, then the kept positions
            n, k = mask.shape
            rows = max(16, self.DW_CHUNK // max(k, 1))
            if rows >= n:
                return self._gather_kept(dy.t() @ x, mask)
            rowptr, col = self._csr(mask)
            out = None
            for r0 in range(0, n, rows):
                blk = dy[:, r0:r0 + rows].t() @ x
                out = self.ext.gather_csr(blk, rowptr, col, r0, out)
            return out
        n, k = mask.shape
        rowptr, col, bp, cb = self._kept_dw_fmt(mask, x.shape[0])
        return self.ext.sddmm(dy, x, rowptr, col, n, k, bp, cb)

    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv: ConvParams):
        if not self.ext.all_finite(x):
            return _DENSE.kept_conv_fwd(x, values, mask, bias, pattern, conv)
        o, cg, kh, kw = mask.shape
        rowptr, col, meta, vals, nn_, mm, bp, cb = self._kept_fwd_fmt(self._vc(values), mask, pattern, 1 << 30,
                                                                      compact_nm=False)
        return self.ext.conv_fwd(x.contiguous(), o, cg * kh * kw, rowptr, col, meta, vals, nn_, mm, bias,
                                 *self._conv_args(mask.shape, conv), bp, cb)

    def kept_conv_dx(self, dy, values, mask, pattern, conv: ConvParams, input_shape: Sequence[int]):
        if not self.ext.all_finite(dy):
            return _DENSE.kept_conv_dx(dy, values, mask, pattern, conv, input_shape)
        o, cg, kh, kw = mask.shape
        t_rowptr, t_col, t_vals, t_bp, cb, _ = self._kept_dx_fmt(self._vc(values), mask, conv.groups, 1 << 30)
        return self.ext.conv_dx(dy.contiguous(), o, cg * kh * kw, t_rowptr, t_col, t_vals,
                                [int(s) for s in input_shape], *self._conv_args(mask.shape, conv), t_bp, cb)

    def kept_conv_dw(self, dy, x, mask, pattern, conv: ConvParams):
        if self._dense_dw("conv", mask, dy.shape[0] * dy.shape[2] * dy.shape[3], x.dtype, kept=True):
            gw = conv_dw_dense(dy, x, conv, mask.shape)
            return self._gather_kept(gw, mask)
        o, cg, kh, kw = mask.shape
        rowptr, col, bp, cb = self._kept_dw_fmt(mask, 1 << 30)
        return self.ext.conv_dw(dy.contiguous(), x.contiguous(), rowptr, col, o, cg * kh * kw,
                                *self._conv_args(mask.shape, conv), bp, cb)
