"""Triton kernels for unstructured sparsity (densities ~0.1 %..50 %, fp32/fp16/bf16).

Format: :mod:`sparsefast.formats.unstructured` — a row-major bitmap, per-(row, 64-column chunk)
pointers and the kept values in CSR order. Two families of kernels read it:

**Tile decode + tensor cores** (every op). A program decodes tiles of ``BN`` rows × one 64-column chunk
to dense register tiles and feeds them to ``tl.dot``::

    keep = (word >> lane) & 1                    # word = bitmap[row, 2c + lane // 32]
    rank = popc(word & ((1 << lane) - 1)) (+ popc(first word) for lanes 32..63)
    w    = load(values + start[row] + rank, mask=keep, other=0)   # start: the row's chunk pointer
    acc  = dot(..., w)                           # tensor cores on the dense tile

Work per tile does not depend on how its kept entries are spread, so empty rows, near-dense rows and
skewed rows cost the same (the load balance of a dense GEMM), and pruned zeros are multiplied like the
masked-dense reference does (NaN/Inf in x propagate identically). The weight moves as
``d·e + 1/8`` bytes per element instead of ``e``, but the MMA work is the dense tile's plus ~12
issued instructions per decoded element: it wins where dense is bound by the weight's bytes.

* ``_index_kernel``  mask → bitmap words + per-chunk counts (a scan gives the chunk pointers).
* ``_pack_kernel``   weight → values (the per-optimizer-step part: reads W once, writes kept values),
  or → kept column indices (gather path).
* ``_fwd_kernel``    ``out[m, n] = Σ_k A[m, k] · P[n, k]`` (implicit GEMM): A = x (Linear), im2col(x)
  (conv forward), or the strided "transposed im2col" of dy (conv input gradient, on the packed
  :func:`~sparsefast.formats.unstructured.dgrad_view` of the weight). Walks a row block along K.
* ``_dx_kernel``     Linear ``dx = dy @ P``: the *transposed traversal* of the forward format (a program
  owns one 64-column chunk and walks the row blocks), so training needs no second copy of W.
* ``_dw_kernel``     masked weight gradient (SDDMM): per tile, ``dyᵀ @ A`` over M on tensor cores,
  stored through the bitmap (exact zeros at pruned positions); tiles with nothing kept do no work.

Small grids (M ≤ 64) split the reduction over programs writing fp32 partials, summed afterwards
(deterministic).

**Row gather on CUDA cores** (Linear forward and dx with few rows of x, M ≤ 64 and low density):
``_gather_kernel`` walks each row's kept entries (CSR: values + column indices) and gathers the
matching row of ``xᵀ`` — ``nnz × M`` FMAs, work proportional to the kept weights only. Rows are taken
sorted by kept count (heaviest first) so a program's rows have similar lengths. dx uses a packed copy
of Wᵀ (cached per weight version). The choice between the two (:func:`_use_gather`) and against dense
(:meth:`Impl.prefer_dense_reason`) comes from one instruction/byte cost model.

Expected H100 numbers (bf16, from that model — issued instructions counted in the sm_90 SASS of the
inner loops, HBM bytes of the real format; not yet measured): 16×4096×4096 forward ≈ 7 µs at 70 % and
≈ 5–7 µs at 90 % sparsity (cuBLAS measured 23 µs); 4096×14336 is issue-bound at ≈ 16–24 µs.
Compute-bound shapes (M ≥ 4096) and the full training step run dense work through ``auto``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
import triton

from ...formats.unstructured import CHUNK, INT32_MAX, UnstructuredIndex, UnstructuredPacked
from ...formats import kept as _kept
from ...masks import Pattern
from ..base import Backend, ConvParams, OpQuery, conv_output_hw
from . import interpreting, tf32_enabled, triton_version
from ._common import DTYPE_NAMES as _TY, AotSpec, cuda_sms, device_guard, prec as _prec  # noqa: F401 - _TY for tests

__all__ = ["Impl", "aot_compile_configs", "AotSpec"]


from ._unstructured_kernels import (  # noqa: E402,F401 - the jit kernels, re-exported for tests and AOT specs
    _dw_kernel, _dx_kernel, _fwd_kernel, _gather_kernel, _index_kernel, _pack_kernel, _xt_kernel,
)


# ================================================================================================
# Launch configurations (autotuned on a GPU; one small config under the interpreter)
# ================================================================================================
_INDEX_BR, _PACK_BR, _PACK_CPP, _XT_BK = 64, 32, 8, 64


def _gemm_configs(kind: str) -> list[triton.Config]:
    """Candidate configs of a kernel (``BN``, or ``BR`` for the gather kernel; warps; stages).
    ``BM`` / ``BMX`` are chosen from M by the launcher."""
    if interpreting():
        return [triton.Config({"BR" if kind == "gather" else "BN": 16}, num_warps=1, num_stages=1)]
    if kind == "gather":
        return [triton.Config({"BR": br}, num_warps=w, num_stages=2) for br, w in ((32, 4), (64, 4), (128, 4))]
    if kind == "dw":
        return [triton.Config({"BN": bn}, num_warps=w, num_stages=s)
                for bn, w, s in ((64, 4, 3), (128, 8, 3), (64, 8, 4), (32, 4, 3))]
    return [triton.Config({"BN": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 3), (64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 4)) + _FP32_ONLY]


#: fwd / dx configs only the fp32 FMA dot uses (:func:`_keep_config` drops them for 16-bit types):
#: 64×32 over 8 warps, the 64-row fp32 tile within :data:`_FP32_WARP_TILE_MAX` from Triton 3.7 on.
_FP32_ONLY = ((32, 8, 3),)


#: rows of x per program of the tile-decode kernels (``BM``). Only these are launched, so the
#: ahead-of-time report (:func:`aot_compile_configs`) compiles exactly the run-time variants. No 32:
#: for 17..64 rows a program covers them in one 64-row block either way (the decoded weight tile, the
#: expensive part, is the same), and 64 rows get wgmma on sm_90 where 32 would get mma.sync.
M_BUCKETS = (16, 64, 128)


def _bm(M: int, cap: int = 128) -> int:
    """Rows of x per program: the smallest of :data:`M_BUCKETS` holding M (else the largest), at most
    ``cap`` (interpreter: 16)."""
    if interpreting():
        return 16
    return min(cap, next((b for b in M_BUCKETS if b >= M), M_BUCKETS[-1]))


def _fma_dot(dtype: torch.dtype) -> bool:
    """fp32 with TF32 off (torch's default): ``tl.dot`` is an FMA loop on CUDA cores whose operand
    tiles and accumulator all live in registers, so those kernels get smaller tiles."""
    return dtype == torch.float32 and _prec(dtype) == "ieee"


def _mm_cap(dtype: torch.dtype) -> int:
    """Largest ``BM`` of the forward / dx kernels: 64 for the fp32 FMA dot (128-row fp32 tiles spill
    on sm_90: 8-16 B local memory per thread in the kernel report), else 128."""
    return 64 if _fma_dot(dtype) else 128


def _dw_cap(dtype: torch.dtype) -> int:
    """Largest ``BM`` (rows of M per reduction step) of the masked-dW kernel: 32 for the fp32 FMA
    dot (registers), else 64."""
    return 32 if _fma_dot(dtype) else 64


#: Largest 16-bit fwd / dx tile (``BM × BN`` outputs) a 4-warp program may take; bigger ones need 8
#: warps. Triton 3.6 (CI, the GPU image): 8192 -- 64×128 and 128×64 with 4 warps compile without
#: spills there, so they stay autotune candidates. From 3.7 on: 4096 -- those two 4-warp configs sit
#: at the 255-register ceiling on sm_80 (fwd / dgrad / Linear, 252-255 under 3.8 and 3.9) and 3.7
#: spills 24 B/thread in the Linear forward 64×128 (sm_80); their 8-warp twins (128×64 w8s3,
#: 64×128 w8s4) stay candidates and are well below it (103-182 registers).
_TILE_4WARPS_MAX = 8192 if triton_version() < (3, 7) else 4096


#: fp32 FMA dot (TF32 off, :func:`_fma_dot`): most tile elements per warp, ``BM × BN / num_warps``
#: (fwd: BM rows of x × BN weight rows; dx: BM rows × BN reduction rows; dW: BN weight rows × BM rows
#: of M per step), or ``None`` for no such limit. Triton 3.8 (``python -m sparsefast kernels`` full
#: scope, fp32): every fp32 fwd tile above 256 per warp makes ptxas allocate only 32 registers on
#: sm_80 and spill 3.4-9.5 KB per thread (a ptxas choice on Triton's PTX, which has no .maxnreg: the
#: same PTX through nvcc 13.0's ptxas, or for sm_90a, gives the same 32 registers), others hit the
#: 255-register ceiling and spill 80-1900 B (dx 64×64 / 64×128, conv dW 32×128); dx 16×128 with 4 warps
#: spills 16 B on sm_90. At most 256 per warp every fp32 config compiles without spills for sm_80 and
#: sm_90 under 3.8 and 3.9. Triton 3.6 compiles the bigger fp32 tiles without spills (only 64×64 with
#: 8 warps spills, 8 B in the conv input gradient on sm_90), so they stay there. Set from 3.7 on
#: like :data:`_TILE_4WARPS_MAX` (3.7 itself not checked).
_FP32_WARP_TILE_MAX = None if triton_version() < (3, 7) else 256

#: fp32 configs (kind, BM, BN, num_warps, num_stages) that Triton 3.9 compiles with an 8 B/thread
#: register spill although they sit far below the register ceiling (64-128 registers: ptxas under 3.9's
#: register-allocation options chooses a spill; ``python -m sparsefast kernels --report``, full scope,
#: 770 configs): dW 16×128 w8s3 (Linear, sm_80), dW 16×64 w8s4 (conv, sm_90), dx 16×128 w8s4 and
#: 16×64 w4s3 (sm_90). 3.6 and 3.8 compile them without spills; every kind keeps other 16-row
#: candidates on 3.9 (dx 16×32 w4/w8, 16×64 w8; dW 16×32 w4, 16×64 w4).
_FP32_SPILLS = frozenset() if triton_version() < (3, 9) else frozenset({
    ("dw", 16, 128, 8, 3), ("dw", 16, 64, 8, 4), ("dx", 16, 128, 8, 4), ("dx", 16, 64, 4, 3)})


def _keep_config(BM: int, cfg: triton.Config, fp32: bool = False, kind: str = "fwd") -> bool:
    """Configs that compile without register spills for sm_80 and sm_90 (``python -m sparsefast
    kernels``; ``fp32`` means the FMA dot, :func:`_fma_dot`). fwd / dx (tile ``BM × BN``): 128×128
    needs 8 warps, 16-bit tiles over :data:`_TILE_4WARPS_MAX` outputs need 8 warps, and
    :data:`_FP32_ONLY` configs are fp32's. fp32 from Triton 3.7 on: at most
    :data:`_FP32_WARP_TILE_MAX` elements per warp (every kind), and from 3.9 on not the
    :data:`_FP32_SPILLS` configs; before 3.7: at most 4096 outputs per
    program, 4096 only with 4 warps, and for dW (tile ``BN × 64``, ``BM`` rows of M per step) 32-row
    steps with 64+ weight rows need 8 warps (4 warps spill 48-56 B in the conv variant). The launchers prune the
    autotune candidates with this, and :func:`aot_compile_configs` compiles exactly the kept ones.
    Checked with the kernel report (bf16 scope) under Triton 3.6, 3.7, 3.8 and 3.9; apart from
    :data:`_TILE_4WARPS_MAX` the list is the same for all of them because the kernels lay their
    gathered tiles out alike on every version (``_TIE_LAST`` in :mod:`._unstructured_kernels`)."""
    bn, w = cfg.kwargs.get("BN", 0), cfg.num_warps
    if fp32 and (kind, BM, bn, w, cfg.num_stages) in _FP32_SPILLS:
        return False
    if fp32 and _FP32_WARP_TILE_MAX is not None:
        return BM * bn <= _FP32_WARP_TILE_MAX * w
    if kind == "dw":
        return not (fp32 and BM >= 32 and bn >= 64 and w < 8)
    if not fp32:
        if (bn, w, cfg.num_stages) in _FP32_ONLY:
            return False
        return BM * bn <= _TILE_4WARPS_MAX or w >= 8
    # Triton < 3.7, fp32: at most 4096 outputs; 64×64 not with 8 warps (8 B spill, dgrad sm_90)
    return BM * bn <= 4096 and not (BM * bn >= 4096 and w >= 8)


def _pruner(kind: str):
    def prune(configs, nargs, **kwargs):
        a = nargs.get("a_ptr", nargs.get("dy_ptr"))
        fp32 = getattr(a, "dtype", None) == torch.float32 and kwargs.get("PREC") == "ieee"
        kept = [c for c in configs if _keep_config(kwargs.get("BM", 16), c, fp32, kind)]
        return kept or configs
    return prune


_prune = _pruner("fwd")


_fwd = triton.autotune(_gemm_configs("fwd"), key=["M_BUCKET", "NG", "K", "CPS", "IS_CONV", "TRANSPOSED", "CA_GE64",
                                                            "PREC"],
                       prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)
_dx = triton.autotune(_gemm_configs("dx"), key=["M_BUCKET", "N", "K", "RPS", "PREC"],
                      prune_configs_by={"early_config_prune": _pruner("dx")})(_dx_kernel)
_dw = triton.autotune(_gemm_configs("dw"), key=["M_BUCKET", "NG", "K", "MPS", "IS_CONV", "CA_GE64", "PREC"],
                      prune_configs_by={"early_config_prune": _pruner("dw")})(_dw_kernel)
_gather = triton.autotune(_gemm_configs("gather"), key=["BMX", "R"])(_gather_kernel)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a small "GPU", so the split paths get exercised on tiny shapes


def _split(programs: int, steps: int, device: torch.device, min_steps: int = 4) -> int:
    """How many programs share one reduction so the grid fills the GPU (~2 waves) while each keeps
    at least ``min_steps`` loop iterations. 1 when the grid is already large."""
    sms = _num_sms(device)
    if programs >= sms or steps < 2 * min_steps:
        return 1
    return max(1, min(-(-2 * sms // max(programs, 1)), steps // min_steps))


#: Issued instructions per unit of work, read off the sm_90 SASS of the inner loops (see
#: ``aot_compile_configs``; bf16, typical configs): per decoded dense weight element of the tensor-core
#: kernels (bitmap decode, value gather, MMA operand staging: 726 per 128×64 tile per 128 threads for
#: the forward, 740 for dx), and per (kept weight, row of x) pair of the gather kernel (157 per 32
#: FMAs; fp32: 51 per 8).
DECODE_OPS = 12.0
GATHER_OPS = {torch.float32: 6.5, torch.float16: 5.0, torch.bfloat16: 5.0}
#: tests set this to "gather" or "decode" to force a Linear path; None: choose by cost
_path_override: str | None = None


def _gather_rows(M: int) -> int:
    return max(16, triton.next_power_of_2(max(M, 1)))


def _use_gather(M: int, density: float, dtype: torch.dtype) -> bool:
    """The gather kernel issues ``nnz × BMX × GATHER_OPS`` instructions, the decode kernels
    ``N·K × ceil(M/128) × DECODE_OPS``: pick the smaller (the gather path is for M <= 64)."""
    if _path_override is not None:
        return _path_override == "gather" and M <= 64
    return M <= 64 and density * _gather_rows(M) * GATHER_OPS.get(dtype, 6.5) < DECODE_OPS


# ================================================================================================
# Host side
# ================================================================================================
@dataclass(frozen=True)
class _View:
    """A 2-D view ``(R, K)`` of a 2-D or 4-D tensor: element ``(r, k)`` sits at
    ``(r // rd) * rs1 + (r % rd) * rs0 + (k % cd) * cs0 + ((k // cd) % kw) * cs1 + (k // cd // kw) * cs2``."""

    rd: int
    rs0: int
    rs1: int
    cd: int
    kw: int
    cs0: int
    cs1: int
    cs2: int

    def args(self) -> tuple[int, ...]:
        return (self.rd, self.rs0, self.rs1, self.cd, self.kw, self.cs0, self.cs1, self.cs2)


def _view(t: torch.Tensor, kind: str, groups: int = 1) -> tuple[_View, int, int]:
    """``(view, R, K)`` of ``t`` as the matrix a kernel packs:

    * ``"fwd"``: :func:`sparsefast.masks.reduction_view` — ``(N, K)`` or ``(O, kh*kw*C/g)``;
    * ``"t"``: the transpose of a 2-D ``t`` — ``(K, N)`` (Linear input gradient, gather path);
    * ``"dgrad"``: :func:`sparsefast.formats.unstructured.dgrad_view` of a 4-D ``t`` — ``(C, kh*kw*O/g)``."""
    if t.dim() == 2:
        (N, K), (s0, s1) = t.shape, t.stride()
        if kind == "t":
            return _View(max(K, 1), s1, 0, max(N, 1), 1, s0, 0, 0), K, N
        return _View(max(N, 1), s0, 0, max(K, 1), 1, s1, 0, 0), N, K
    (O, Cg, KH, KW), (s0, s1, s2, s3) = t.shape, t.stride()
    if kind == "dgrad":
        Og = O // groups
        return _View(max(Cg, 1), s1, Og * s0, max(Og, 1), KW, s0, s3, s2), Cg * groups, KH * KW * Og
    return _View(max(O, 1), s0, 0, max(Cg, 1), KW, s1, s3, s2), O, Cg * KH * KW


def build_index(mask: torch.Tensor, view: _View, R: int, K: int) -> UnstructuredIndex:
    """Index (bitmap + chunk pointers) of a bool mask seen through ``view`` as ``(R, K)``.

    One Triton pass over the mask, a scan of the per-chunk counts, and one device→host copy of the
    kept count (the values buffer's size). Returns new tensors; nothing cached is modified."""
    C = -(-K // CHUNK)
    dev = mask.device
    bitmap = torch.empty((R, 2 * C), dtype=torch.int32, device=dev)
    counts = torch.empty((R * C,), dtype=torch.int32, device=dev)
    if R * C:
        grid = (triton.cdiv(R, _INDEX_BR), C)
        with device_guard(dev):
            _index_kernel[grid](mask.view(torch.uint8), bitmap, counts, R, K, C, *view.args(), BR=_INDEX_BR)
    ptr = torch.zeros((R * C + 1,), dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=ptr[1:])
    nnz = int(ptr[-1])
    if nnz > INT32_MAX:
        raise RuntimeError(f"triton unstructured: {nnz} kept weights exceed the int32 offsets of the format")
    return UnstructuredIndex(R, K, bitmap, ptr.to(torch.int32), nnz)


def _pack(src: torch.Tensor, view: _View, index: UnstructuredIndex, cols: bool = False) -> torch.Tensor:
    """Kept values of ``src`` seen through ``view`` in the format's order, ``(nnz,)`` — or with ``cols``
    their column indices (int16 when the matrix has at most 32768 columns, else int32)."""
    dtype = (torch.int16 if index.cols <= 32768 else torch.int32) if cols else src.dtype
    out = torch.empty((index.nnz,), dtype=dtype, device=src.device)
    if index.nnz:
        grid = (triton.cdiv(index.rows, _PACK_BR), triton.cdiv(index.chunks, _PACK_CPP))
        with device_guard(src.device):
            _pack_kernel[grid](src, index.bitmap, index.chunkptr, out, index.rows, index.cols, index.chunks,
                               *view.args(), BR=_PACK_BR, CPP=_PACK_CPP, COLS=cols)
    return out


@dataclass(frozen=True)
class _RowLists:
    """Gather-path structure of an index (mask only): kept column indices in value order and the rows
    sorted by kept count, heaviest first."""

    cols: torch.Tensor   # int16/int32 (nnz,)
    perm: torch.Tensor   # int32 (rows,)


def _row_lists(index: UnstructuredIndex, src: torch.Tensor, view: _View) -> _RowLists:
    perm = torch.argsort(index.row_nnz(), descending=True, stable=True).to(torch.int32)
    return _RowLists(_pack(src, view, index, cols=True), perm)


class _Geom(NamedTuple):
    """Implicit-GEMM geometry: A-operand spatial size, output spatial size, kernel taps."""

    AH: int = 1
    AW: int = 1
    OH: int = 1
    OW: int = 1
    KW: int = 1
    SH: int = 1
    SW: int = 1
    PH: int = 0
    PW: int = 0
    DH: int = 1
    DW: int = 1


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t.dim() == 4 else (t.stride(0), t.stride(1), 0, 0)  # type: ignore[return-value]


def _check_numel(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.numel() > INT32_MAX:
            raise RuntimeError(f"triton unstructured: a tensor of shape {tuple(t.shape)} has more than 2**31-1 "
                               "elements (the kernels use 32-bit offsets)")


#: CUDA grid limits: axis 0 up to 2**31-1 programs, axes 1 and 2 up to 65535
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535


def _fwd_grid(M: int, BM: int, G: int, NG: int, BN: int, split: int) -> tuple[int, int, int]:
    """Grid of ``_fwd_kernel``: the M blocks and the G·NB row blocks folded into axis 0 (M block
    fastest), the K split on axis 2."""
    programs = triton.cdiv(M, BM) * G * triton.cdiv(NG, BN)
    if programs > GRID_X_MAX or split > GRID_YZ_MAX:
        raise RuntimeError(f"triton unstructured: forward grid of {programs} x {split} programs exceeds the CUDA "
                           "grid limits")
    return (programs, 1, split)


def _run_fwd(a: torch.Tensor, p: UnstructuredPacked, bias: torch.Tensor | None, out: torch.Tensor,
             M: int, NG: int, CA: int, G: int, geom: _Geom, is_conv: bool, transposed: bool) -> torch.Tensor:
    """``out = A @ Pᵀ (+ bias)`` with ``_fwd_kernel``; ``out`` is written through its strides
    ((b, c, h, w) for conv, (m, n) for Linear). Splits K over programs when the grid is small."""
    K, C = p.index.cols, p.index.chunks
    BM = _bm(M, _mm_cap(a.dtype))
    split = _split(triton.cdiv(M, BM) * G * triton.cdiv(NG, 64), C, a.device)
    cps = triton.cdiv(C, split)
    split = triton.cdiv(C, cps)
    dst = out if split == 1 else torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)
    so_s, so = (0, _strides4(out)) if split == 1 else (dst.stride(0), _strides4(dst[0]))
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[rows] densely
    grid = lambda meta: _fwd_grid(M, BM, G, NG, meta["BN"], split)  # noqa: E731
    with device_guard(a.device):
        _fwd[grid](a, p.index.bitmap, p.index.chunkptr, p.values, bias if bias is not None else p.values, dst,
                   M, NG, CA, K, C, cps, *geom, *_strides4(a), so_s, *so,
                   M_BUCKET=BM, BM=BM, IS_CONV=is_conv, TRANSPOSED=transposed, CA_GE64=CA >= 64,
                   HAS_BIAS=bias is not None and split == 1, PREC=_prec(a.dtype))
    if split > 1:
        red = dst.sum(0)
        if bias is not None:
            red += bias.float().reshape(-1, *([1] * (out.dim() - 2)))
        out.copy_(red)
    return out


def _run_gather(x: torch.Tensor, p: UnstructuredPacked, rl: _RowLists, bias: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
    """``out (M, R) = x (M, K) @ Pᵀ (+ bias)`` with ``_gather_kernel`` (M <= 64)."""
    M, K = x.shape
    R = p.index.rows
    BMX = _gather_rows(M)
    xt = torch.empty((K, BMX), dtype=x.dtype, device=x.device)
    flags = torch.zeros((2 * BMX,), dtype=torch.int32, device=x.device)
    if bias is not None:
        bias = bias.contiguous()
    grid = lambda meta: (triton.cdiv(R, meta["BR"]),)  # noqa: E731
    with device_guard(x.device):
        _xt_kernel[(triton.cdiv(K, _XT_BK),)](x, xt, flags, M, K, *x.stride(), BMX=BMX, BK=_XT_BK)
        _gather[grid](xt, flags, p.index.chunkptr, max(p.index.chunks, 1), rl.cols, p.values, rl.perm,
                      bias if bias is not None else p.values, out, R, M, *out.stride(), BMX=BMX,
                      HAS_BIAS=bias is not None)
    return out


def _run_dx(dy: torch.Tensor, p: UnstructuredPacked) -> torch.Tensor:
    """Linear ``dx = dy @ P`` with ``_dx_kernel`` (transposed traversal) -> ``(M, K)`` contiguous."""
    M, N = dy.shape
    K, C = p.index.cols, p.index.chunks
    out = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    BM = _bm(M, _mm_cap(dy.dtype))
    bn = 64 if not interpreting() else 16
    split = _split(triton.cdiv(M, BM) * C, triton.cdiv(N, bn), dy.device)
    rps = triton.cdiv(triton.cdiv(N, split), 128) * 128  # a multiple of every BN
    split = triton.cdiv(N, rps)
    dst = out if split == 1 else torch.empty((split, M, K), dtype=torch.float32, device=dy.device)
    so_s, so_m, so_k = (0, *out.stride()) if split == 1 else dst.stride()
    grid = (triton.cdiv(M, BM), C, split)
    with device_guard(dy.device):
        _dx[grid](dy, p.index.bitmap, p.index.chunkptr, p.values, dst, M, N, K, C, rps, *dy.stride(),
                  so_s, so_m, so_k, M_BUCKET=BM, BM=BM, PREC=_prec(dy.dtype))
    if split > 1:
        out.copy_(dst.sum(0))
    return out


def _run_dw(dy: torch.Tensor, a: torch.Tensor, index: UnstructuredIndex, out: torch.Tensor, M: int, NG: int,
            CA: int, G: int, geom: _Geom, is_conv: bool) -> torch.Tensor:
    """Masked weight gradient into ``out`` (weight-shaped, any strides) with ``_dw_kernel``. Splits M
    over programs (fp32 partials, summed) when the tile grid is small."""
    K, C = index.cols, index.chunks
    BM = _bm(M, _dw_cap(a.dtype))
    tiles = G * triton.cdiv(NG, 64) * C
    split = _split(tiles, triton.cdiv(M, BM), a.device)
    mps = triton.cdiv(triton.cdiv(M, split), BM) * BM
    split = max(1, triton.cdiv(M, mps))
    dst = out if split == 1 else torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)
    view = _view(out if split == 1 else dst[0], "fwd")[0]
    so_s = 0 if split == 1 else dst.stride(0)
    grid = lambda meta: (G * triton.cdiv(NG, meta["BN"]), C, split)  # noqa: E731
    with device_guard(a.device):
        _dw[grid](dy, a, index.bitmap, dst, M, NG, CA, K, C, mps, *geom, *_strides4(a), *_strides4(dy), so_s,
                  view.rd, view.rs0, view.rs1, view.cd, view.cs0, view.cs1, view.cs2,
                  M_BUCKET=BM, BM=BM, IS_CONV=is_conv, CA_GE64=CA >= 64, PREC=_prec(a.dtype))
    if split > 1:
        out.copy_(dst.sum(0))
    return out


def _conv_geom(x_hw: Sequence[int], y_hw: Sequence[int], kw: int, conv: ConvParams, transposed: bool) -> _Geom:
    """Geometry for the implicit GEMM: A = x and out = y (forward), or A = dy and out = dx (transposed)."""
    (H, W), (Ho, Wo) = x_hw, y_hw
    a_hw, o_hw = ((Ho, Wo), (H, W)) if transposed else ((H, W), (Ho, Wo))
    return _Geom(*a_hw, *o_hw, kw, *conv.stride, *conv.padding, *conv.dilation)


def _out_hw(H: int, W: int, KH: int, KW: int, conv: ConvParams) -> tuple[int, int]:
    return conv_output_hw(H, W, (KH, KW), conv.stride, conv.padding, conv.dilation)


# ================================================================================================
# The backend
# ================================================================================================
class Impl(Backend):
    """Unstructured sparsity on Triton (see the module docstring). Routed to by
    :class:`sparsefast.backends.triton.TritonBackend` for the ``"unstructured"`` pattern.

    Cached per live mask (rebuilt when it changes in place): the index of the forward matrix, and
    on demand the index of its transpose (Linear dx, gather path) or of the dgrad view (conv dx) and
    the gather path's row lists. Cached per weight version: the packed values for each of those."""

    name = "triton"

    @property
    def devices(self):  # type: ignore[override]
        return ("cpu", "cuda") if interpreting() else ("cuda",)

    # ---- support and dense preference ---------------------------------------------------------
    def not_supported_reasons(self, q: OpQuery) -> list[str]:
        shape = tuple(q.weight_shape)
        if q.op == "linear" and len(shape) != 2 or q.op == "conv" and len(shape) != 4:
            return [f"triton unstructured: {q.op} needs a {'2' if q.op == 'linear' else '4'}-D weight, got {shape}"]
        reasons: list[str] = []
        R, K = _matrix_shape(shape)
        if R * K > INT32_MAX:
            reasons.append(f"triton unstructured: weight {shape} has more than 2**31-1 elements (32-bit offsets)")
        if -(-max(K, R) // CHUNK) > 65535:
            reasons.append(f"triton unstructured: weight dims {shape} exceed {65535 * CHUNK} (grid limit)")
        if q.m_rows is not None and q.m_rows * max(K, R) > INT32_MAX:
            reasons.append(f"triton unstructured: {q.m_rows} rows × {max(K, R)} exceeds 32-bit offsets")
        if q.conv is not None and len(shape) == 4 and shape[0] % q.conv.groups:
            reasons.append(f"triton unstructured: out_channels {shape[0]} not divisible by groups {q.conv.groups}")
        return reasons

    def prefer_dense_reason(self, q: OpQuery) -> str | None:
        """Dense beats this design when its cost model says so (ties go dense: never slower).

        Cost model (per call, seconds; e = element bytes, d = density, M×K·N the GEMM, one GPU):

        * dense:  ``max(2·M·N·K / P, e·(M·K + N·K + M·N) / BW)``
        * sparse: ``max(min(t_decode, t_gather), bytes / BW)`` where
          ``t_decode = max(2·M·N·K / P, DECODE_OPS·N·K·ceil(M/128) / ALU)`` (tensor cores on decoded
          tiles; the dense MMA work plus ~12 issued instructions per decoded weight element, repeated
          per 128-row block of x), ``t_gather = GATHER_OPS·d·N·K·max(16, M) / ALU`` (CUDA cores, ~5
          instructions per kept weight and row of x; only for Linear with M ≤ 64) and
          ``bytes = e·(M·K + M·N) + N·K·(d·e + 1/8)``.

        ``ALU = SMs × 128 lanes × 1.75 GHz`` (issue rate), ``P`` = achievable tensor-core (or fp32 FMA)
        rate, ``BW`` = achievable HBM bandwidth (H100 SXM figures, scaled by SM count on other GPUs).
        Sparse can only win while dense is bound by the weight's bytes: small M (about M ≤ 128 for
        4096×4096 at ≤ 50 % density); compute-bound shapes (M ≥ 4096) always get a reason here."""
        if q.m_rows is None or q.device.type != "cuda":
            return None
        c = _cost_terms(q)
        if c["t_sparse"] < c["t_dense"]:
            return None
        d, us = c["density"], 1e6
        dt = str(q.dtype).replace("torch.", "")
        head = (f"dense is faster for M={q.m_rows}, weight {tuple(q.weight_shape)}, density {d:.3g} ({dt}): the "
                f"unstructured kernels model {c['t_sparse'] * us:.1f} us vs dense {c['t_dense'] * us:.1f} us")
        if c["t_flops"] >= c["t_dense_mem"]:
            gather = ("" if c["t_gather"] < math.inf else
                      "; the CUDA-core gather kernel, which does skip them, only runs for Linear with M <= 64")
            ceiling = _roofline_ceiling(q, d)
            ideal = "" if ceiling is None else f" (roofline ceiling {ceiling:.2g}x dense, sparsefast.roofline)"
            return (f"{head}. The call is compute-bound: its 2*M*N*K = {c['flops'] / 1e9:.4g} GFLOP take "
                    f"{c['t_flops'] * us:.1f} us on {c['unit']} vs {c['t_dense_mem'] * us:.1f} us of dense memory "
                    "traffic, and the tile-decode kernels skip no multiply-adds -- there is no tensor-core "
                    "instruction for unstructured sparsity, so each decoded weight tile is multiplied densely, "
                    f"zeros included, plus ~{DECODE_OPS:g} issued instructions of decoding per weight element "
                    f"and 128-row block of x{gather}. Only skipping the pruned products could win here{ideal}, "
                    "and this backend has no such kernel for compute-bound shapes, so auto runs masked-dense "
                    "work (cuBLAS/cuDNN) instead (never slower than dense)")
        return (f"{head}. Dense is bound by memory traffic here ({c['t_dense_mem'] * us:.1f} us), but at this "
                f"density the packed weight ({d:.3g}*{torch.empty((), dtype=q.dtype).element_size()} + 1/8 bytes per "
                f"element, {c['t_sparse_mem'] * us:.1f} us of traffic) plus the decoding or gather work "
                "does not undercut it")

    # ---- packing ------------------------------------------------------------------------------
    def index(self, mask: torch.Tensor, kind: str = "fwd", groups: int = 1) -> UnstructuredIndex:
        """Mask-only structure of the ``kind`` view (see :func:`_view`), cached per live mask."""
        _check_numel(mask)

        def build():
            view, R, K = _view(mask, kind, groups)
            return build_index(mask, view, R, K)
        return self.cached(f"index-{kind}", (mask,), build, groups)

    def pack(self, weight: torch.Tensor, mask: torch.Tensor, pattern: Pattern) -> UnstructuredPacked:
        """Forward format of ``weight`` (2-D, or 4-D in reduction view): cached index + fresh values."""
        index = self.index(mask)
        return UnstructuredPacked(index, _pack(weight, _view(weight, "fwd")[0], index))

    def _packed_view(self, weight: torch.Tensor, mask: torch.Tensor, kind: str, groups: int = 1) -> UnstructuredPacked:
        """The ``kind`` view of the weight packed (cached per weight version like the forward pack;
        built only when a kernel needs it)."""
        def build():
            index = self.index(mask, kind, groups)
            return UnstructuredPacked(index, _pack(weight, _view(weight, kind, groups)[0], index))
        return self.cached(f"pack-{kind}", (weight, mask), build, groups)

    def _row_lists(self, mask: torch.Tensor, kind: str) -> _RowLists:
        return self.cached(f"rows-{kind}", (mask,),
                           lambda: _row_lists(self.index(mask, kind), mask, _view(mask, kind)[0]))

    # ---- kept values: the layer's values *are* this format's values (CSR order of the reduction
    # view), so forward and the transposed-traversal dX read them as they are; the gather dX and the
    # conv dgrad view read them through a mask-only permutation (one nnz gather per call); the
    # masked dW still writes a weight-shaped gradient, gathered at the kept positions.
    kept_native = True

    def _kept_packed(self, values: torch.Tensor, mask: torch.Tensor) -> UnstructuredPacked:
        return UnstructuredPacked(self.index(mask), values.detach().contiguous())

    def _view_perm(self, mask: torch.Tensor, kind: str, groups: int = 1) -> torch.Tensor:
        """Canonical position of each value of the ``kind`` view's format (mask only, cached)."""
        def build():
            index = self.index(mask, kind, groups)
            pos = _kept.scatter(torch.arange(_kept.nnz(mask), dtype=torch.int32, device=mask.device), mask)
            return _pack(pos, _view(pos, kind, groups)[0], index).long()
        return self.cached(f"perm-{kind}", (mask,), build, groups)

    def _kept_view(self, values: torch.Tensor, mask: torch.Tensor, kind: str, groups: int = 1) -> UnstructuredPacked:
        return UnstructuredPacked(self.index(mask, kind, groups),
                                  values.detach().index_select(0, self._view_perm(mask, kind, groups)))

    def kept_linear_fwd(self, x, values, mask, bias, pattern):
        return self._linear_fwd(x, lambda: self._kept_packed(values, mask), mask, bias)

    def kept_linear_dx(self, dy, values, mask, pattern):
        return self._linear_dx(dy, lambda: self._kept_packed(values, mask),
                               lambda: self._kept_view(values, mask, "t"), mask)

    def kept_conv_fwd(self, x, values, mask, bias, pattern, conv: ConvParams):
        return self._conv_fwd(x, lambda: self._kept_packed(values, mask), mask, bias, conv)

    def kept_conv_dx(self, dy, values, mask, pattern, conv: ConvParams, input_shape):
        return self._conv_dx(dy, lambda: self._kept_view(values, mask, "dgrad", conv.groups), mask, conv, input_shape)

    # ---- primitives ---------------------------------------------------------------------------
    def linear_fwd(self, x, weight, mask, bias, pattern):
        return self._linear_fwd(x, lambda: self.packed(weight, mask, pattern), mask, bias)

    def _linear_fwd(self, x, packed, mask, bias):
        M, K = x.shape
        N = mask.shape[0]
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        if M == 0 or N == 0:
            return out
        if K == 0:
            return out.zero_() if bias is None else out.copy_(bias.expand(M, N))
        _check_numel(x, out)
        p = packed()
        if _use_gather(M, p.index.nnz / (N * K), x.dtype):
            return _run_gather(x, p, self._row_lists(mask, "fwd"), bias, out)
        return _run_fwd(x, p, bias, out, M, N, K, 1, _Geom(), False, False)

    def linear_dx(self, dy, weight, mask, pattern):
        return self._linear_dx(dy, lambda: self.packed(weight, mask, pattern),
                               lambda: self._packed_view(weight, mask, "t"), mask)

    def _linear_dx(self, dy, packed, packed_t, mask):
        M, N = dy.shape
        K = mask.shape[1]
        if M == 0 or K == 0 or N == 0:
            return torch.zeros((M, K), dtype=dy.dtype, device=dy.device)
        _check_numel(dy, mask)
        index = self.index(mask)
        if _use_gather(M, index.nnz / (N * K), dy.dtype):
            out = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
            return _run_gather(dy, packed_t(), self._row_lists(mask, "t"), None, out)
        return _run_dx(dy, packed())

    def linear_dw(self, dy, x, mask, pattern):
        M, N = dy.shape
        K = x.shape[1]
        out = torch.empty(mask.shape, dtype=dy.dtype, device=dy.device)
        if M == 0 or N * K == 0:
            return out.zero_()
        _check_numel(dy, x, out)
        return _run_dw(dy, x, self.index(mask), out, M, N, K, 1, _Geom(), False)

    def conv_fwd(self, x, weight, mask, bias, pattern, conv: ConvParams):
        return self._conv_fwd(x, lambda: self.packed(weight, mask, pattern), mask, bias, conv)

    def _conv_fwd(self, x, packed, mask, bias, conv: ConvParams):
        B, Cin, H, W = x.shape
        O, Cg, KH, KW = mask.shape
        Ho, Wo = _out_hw(H, W, KH, KW, conv)
        out = torch.empty((B, O, Ho, Wo), dtype=x.dtype, device=x.device)
        M = B * Ho * Wo
        if M == 0 or O == 0:
            return out
        if Cg * KH * KW == 0:
            return out.zero_() if bias is None else out.copy_(bias.reshape(1, O, 1, 1).expand_as(out))
        _check_numel(x, out)
        p = packed()
        geom = _conv_geom((H, W), (Ho, Wo), KW, conv, False)
        return _run_fwd(x, p, bias, out, M, O // conv.groups, Cg, conv.groups, geom, True, False)

    def conv_dx(self, dy, weight, mask, pattern, conv: ConvParams, input_shape):
        return self._conv_dx(dy, lambda: self._packed_view(weight, mask, "dgrad", conv.groups), mask, conv,
                             input_shape)

    def _conv_dx(self, dy, packed_dgrad, mask, conv: ConvParams, input_shape):
        B, Cin, H, W = input_shape
        O, Cg, KH, KW = mask.shape
        out = torch.empty(tuple(input_shape), dtype=dy.dtype, device=dy.device)
        M = B * H * W
        if M == 0 or Cin == 0:
            return out
        if O * KH * KW == 0 or dy.numel() == 0:
            return out.zero_()
        _check_numel(dy, out)
        p = packed_dgrad()
        geom = _conv_geom((H, W), dy.shape[-2:], KW, conv, True)
        return _run_fwd(dy, p, None, out, M, Cg, O // conv.groups, conv.groups, geom, True, True)

    def conv_dw(self, dy, x, mask, pattern, conv: ConvParams, weight_shape):
        O, Cg, KH, KW = weight_shape
        B, Cin, H, W = x.shape
        Ho, Wo = dy.shape[-2:]
        out = torch.empty(tuple(weight_shape), dtype=dy.dtype, device=dy.device)
        M = B * Ho * Wo
        if M == 0 or out.numel() == 0:
            return out.zero_()
        _check_numel(dy, x, out)
        geom = _conv_geom((H, W), (Ho, Wo), KW, conv, False)
        return _run_dw(dy, x, self.index(mask), out, M, O // conv.groups, Cg, conv.groups, geom, True)


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    O, Cg, KH, KW = shape
    return O, Cg * KH * KW


# ================================================================================================
# Cost model for prefer_dense_reason
# ================================================================================================
#: H100 SXM: achievable dense bf16/fp16 tensor-core rate (~65 % of the 989 TFLOP/s peak, as cuBLAS
#: reaches on large GEMMs), TF32 and fp32 FMA rates, HBM bandwidth (~90 % of 3.35 TB/s), SM count.
_H100 = dict(tc16=650e12, tf32=330e12, fp32=50e12, bw=3.0e12, sms=132)
_ISSUE_PER_SM = 128 * 1.75e9   # lane-instructions per second per SM (4 schedulers × 32 lanes)


def _cost_terms(q: OpQuery) -> dict[str, Any]:
    """Every term of the cost model in :meth:`Impl.prefer_dense_reason` for the forward of ``q``
    (seconds; ``flops`` in FLOP; ``unit``: what runs the dense multiply-adds)."""
    R, K = _matrix_shape(q.weight_shape)
    M, N = int(q.m_rows or 1), R
    e = torch.empty((), dtype=q.dtype).element_size()
    d = 0.5 if q.density is None else float(q.density)
    sms = _num_sms(q.device) if q.device.type == "cuda" and torch.cuda.is_available() else _H100["sms"]
    scale = sms / _H100["sms"]
    if q.dtype == torch.float32:
        tf32 = tf32_enabled()
        peak, unit = (_H100["tf32"], "TF32 tensor cores") if tf32 else (_H100["fp32"], "CUDA cores (fp32 FMA)")
    else:
        peak, unit = _H100["tc16"], "tensor cores"
    peak, bw, alu = peak * scale, _H100["bw"] * scale, sms * _ISSUE_PER_SM
    flops = 2.0 * M * N * K
    t_flops = flops / peak
    t_dense_mem = e * (M * K + N * K + M * N) / bw
    t_decode = max(t_flops, DECODE_OPS * N * K * math.ceil(M / 128) / alu)
    t_gather = math.inf
    if M <= 64 and q.op == "linear":
        t_gather = GATHER_OPS.get(q.dtype, 6.5) * d * N * K * _gather_rows(M) / alu
    t_sparse_mem = (e * (M * K + M * N) + N * K * (d * e + 1 / 8)) / bw
    return dict(M=M, N=N, K=K, density=d, flops=flops, unit=unit, t_flops=t_flops, t_dense_mem=t_dense_mem,
                t_dense=max(t_flops, t_dense_mem), t_decode=t_decode, t_gather=t_gather, t_sparse_mem=t_sparse_mem,
                t_sparse=max(min(t_decode, t_gather), t_sparse_mem))


def _cost_model(q: OpQuery) -> tuple[float, float]:
    """(dense seconds, sparse seconds) for the forward of ``q`` under the model in
    :meth:`Impl.prefer_dense_reason`."""
    c = _cost_terms(q)
    return c["t_dense"], c["t_sparse"]


def _roofline_ceiling(q: OpQuery, density: float) -> float | None:
    """Best speedup over dense any zero-skipping design could reach for ``q``'s forward
    (:mod:`sparsefast.roofline`, H100), or None where it cannot say (conv: the query has no image size
    for the activation bytes)."""
    if q.op != "linear":
        return None
    try:
        from ... import roofline
        R, K = _matrix_shape(q.weight_shape)
        return roofline.predict_linear("fwd", int(q.m_rows or 1), K, R, dtype=q.dtype, pattern="unstructured",
                                       density=density).ratio
    except Exception:  # noqa: BLE001 - an explanation must never fail a dispatch
        return None



def aot_compile_configs(*args, **kwargs):
    """Every kernel variant this backend launches on a GPU (:mod:`._unstructured_aot`)."""
    from ._unstructured_aot import aot_compile_configs as build
    return build(*args, **kwargs)
