"""Ahead-of-time compile list of the unstructured Triton kernels (what ``python -m sparsefast kernels
--report`` compiles for sm_80/sm_90 without a GPU): one spec per kernel variant the launchers of
:mod:`sparsefast.backends.triton.unstructured` run."""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import DTYPE_NAMES as _TY, AotSpec, specialize
from ._unstructured_kernels import (_dw_kernel, _dx_kernel, _fwd_kernel, _gather_kernel, _index_kernel, _pack_kernel,
                                    _xt_kernel)
from .unstructured import M_BUCKETS, _INDEX_BR, _PACK_BR, _PACK_CPP, _XT_BK, _gemm_configs, _keep_config

# ================================================================================================
# Ahead-of-time compilation list
# ================================================================================================
def _example_ints(kind: str, bm: int) -> dict[str, int]:
    """Integer arguments of a representative call: Linear 4096×4096 with M = ``bm`` (contiguous
    tensors), or a 3×3 / stride-1 / pad-1 conv, 64→64 channels on 56×56 NCHW maps."""
    lin_geom = dict(AH=1, AW=1, OH=1, OW=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1)
    conv_geom = dict(AH=56, AW=56, OH=56, OW=56, KW=3, SH=1, SW=1, PH=1, PW=1, DH=1, DW=1)
    nchw = (64 * 56 * 56, 56 * 56, 56, 1)
    if kind == "fwd-linear":
        return dict(M=bm, NG=4096, CA=4096, K=4096, C=64, CPS=16, sa_b=4096, sa_c=1, sa_h=0, sa_w=0,
                    so_s=0, so_b=4096, so_c=1, so_h=0, so_w=0, **lin_geom)
    if kind in ("fwd-conv", "fwd-dgrad"):
        return dict(M=bm * 56 * 56, NG=64, CA=64, K=576, C=9, CPS=9,
                    **dict(zip(("sa_b", "sa_c", "sa_h", "sa_w"), nchw)), so_s=0,
                    **dict(zip(("so_b", "so_c", "so_h", "so_w"), nchw)), **conv_geom)
    if kind == "dx":
        return dict(M=bm, N=4096, K=4096, C=64, RPS=4096, s_dm=4096, s_dn=1, so_s=0, so_m=4096, so_k=1)
    if kind == "dw-linear":
        return dict(M=bm, NG=4096, CA=4096, K=4096, C=64, MPS=bm, sa_b=4096, sa_c=1, sa_h=0, sa_w=0,
                    sd_b=4096, sd_c=1, sd_h=0, sd_w=0, so_s=0, RD=4096, RS0=4096, RS1=0, CD=4096, CS0=1,
                    CS1=0, CS2=0, **lin_geom)
    if kind == "dw-conv":
        return dict(M=bm * 56 * 56, NG=64, CA=64, K=576, C=9, MPS=bm * 56 * 56,
                    **dict(zip(("sa_b", "sa_c", "sa_h", "sa_w"), nchw)),
                    **dict(zip(("sd_b", "sd_c", "sd_h", "sd_w"), nchw)),
                    so_s=0, RD=64, RS0=576, RS1=0, CD=64, CS0=9, CS1=1, CS2=3, **conv_geom)
    if kind == "xt":
        return dict(M=bm, K=4096, s_xm=4096, s_xk=1)
    if kind == "gather":
        return dict(RPS=64, R=4096, M=bm, so_m=4096, so_n=1)
    if kind in ("index", "pack"):
        return dict(R=4096, K=4096, C=64, RD=4096, RS0=4096, RS1=0, CD=4096, KW=1, CS0=1, CS1=0, CS2=0)
    raise ValueError(kind)


#: What the compiled kernels must show (checked by ``python -m sparsefast kernels``, keys in
#: :data:`sparsefast.kernel_report.EXPECT_KEYS`). Every GEMM config below is a run-time autotune
#: candidate, so all are ``hot`` (no spills allowed). The tile-decode kernels in 16-bit types multiply
#: the decoded tiles on tensor cores; on sm_90 Triton emits wgmma when the MMA's M dimension (``BM``
#: for fwd/dx, ``BN`` for dW, whose MMA is dyᵀ·A) is at least 64, else mma.sync. fp32 with
#: ``input_precision="ieee"`` (torch's default, TF32 off) is an FMA dot on CUDA cores: tensor_core=False.
#: The gather kernel is CUDA-core by design (nnz × M FMAs) and, like the transpose feeding it, reads
#: with 128-bit loads. index (per mask change) and pack (per optimizer step) are plain CUDA-core
#: kernels; pack is on the training step's path, so it is hot too.
def _expect_mma(dtype: torch.dtype, mma_m: int) -> dict:
    if dtype == torch.float32:
        return dict(tensor_core=False, hot=True)
    return dict(tensor_core=True, wgmma=mma_m >= 64, hot=True)


_EXPECT_GATHER = dict(tensor_core=False, vector_loads=True, hot=True)


def aot_compile_configs(dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16, torch.float32),
                        m_buckets: Sequence[int] = M_BUCKETS) -> list[AotSpec]:
    """Every kernel variant this backend launches on a GPU, one :class:`AotSpec` per autotune config.

    Returns ``[AotSpec(kernel, signature, constexprs, options, attrs, name, expect), ...]`` (see
    :class:`~sparsefast.backends.triton._common.AotSpec`); ``name`` is readable, e.g.
    ``"fwd-linear-bf16-BM16-BN64-w4s3"``. Covers the index and pack kernels, the gather path (x
    transpose + gather), the forward (Linear, conv, conv input gradient), Linear dx and masked dW
    (Linear, conv) for each dtype, each row block ``BM`` the launcher uses (:data:`M_BUCKETS`, capped
    by :func:`_dw_cap` for dW) and every autotune config the launcher's pruning keeps
    (:func:`_keep_config`), specialised like a representative call (:func:`_example_ints`) with
    ``PREC="ieee"`` (fp32: torch's default leaves TF32 off; with TF32 on, fp32 runs the tensor-core
    variants of the same kernels, not compiled here)."""
    specs: dict[str, AotSpec] = {}

    def add(name, kernel, kind, bm, pointers, constexprs, cfg=None, expect=None):
        sig, const, attrs = specialize(kernel, pointers, _example_ints(kind, bm), constexprs)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {"num_warps": 4, "num_stages": 1}
        specs.setdefault(name, AotSpec(kernel, sig, const, opts, attrs, name, expect))

    add("index", _index_kernel, "index", 16, {"mask_ptr": "*u8", "bm_ptr": "*i32", "cnt_ptr": "*i32"},
        {"BR": _INDEX_BR}, expect=dict(tensor_core=False))
    add("pack-cols", _pack_kernel, "pack", 16, {"w_ptr": "*u8", "bm_ptr": "*i32", "cp_ptr": "*i32", "v_ptr": "*i16"},
        {"BR": _PACK_BR, "CPP": _PACK_CPP, "COLS": True}, expect=dict(tensor_core=False))
    for dt in dtypes:
        t = _TY[dt]
        add(f"pack-{t}", _pack_kernel, "pack", 16,
            {"w_ptr": f"*{t}", "bm_ptr": "*i32", "cp_ptr": "*i32", "v_ptr": f"*{t}"},
            {"BR": _PACK_BR, "CPP": _PACK_CPP, "COLS": False}, expect=dict(tensor_core=False, hot=True))
        for bmx in (16, 32, 64):  # _gather_rows(M) for M <= 64
            add(f"xt-{t}-BMX{bmx}", _xt_kernel, "xt", bmx, {"x_ptr": f"*{t}", "xt_ptr": f"*{t}", "flags_ptr": "*i32"},
                {"BMX": bmx, "BK": _XT_BK}, expect=_EXPECT_GATHER)
            for cfg in _gemm_configs("gather"):
                ptrs = {"xt_ptr": f"*{t}", "flags_ptr": "*i32", "rp_ptr": "*i32", "col_ptr": "*i16", "v_ptr": f"*{t}",
                        "perm_ptr": "*i32", "bias_ptr": f"*{t}", "out_ptr": f"*{t}"}
                add(f"gather-{t}-BMX{bmx}-BR{cfg.kwargs['BR']}-w{cfg.num_warps}s{cfg.num_stages}", _gather_kernel,
                    "gather", bmx, ptrs, dict(BMX=bmx, HAS_BIAS=True, **cfg.kwargs), cfg, _EXPECT_GATHER)
        prec = "ieee"  # fp32: torch's default leaves TF32 off for matmuls
        fp32 = dt == torch.float32
        tag = lambda cfg: f"BN{cfg.kwargs['BN']}-w{cfg.num_warps}s{cfg.num_stages}"  # noqa: E731
        for bucket in m_buckets:
            bm = min(bucket, 64 if fp32 else 128)  # _mm_cap (PREC="ieee")
            for cfg in [c for c in _gemm_configs("fwd") if _keep_config(bm, c, fp32)]:
                for kind, is_conv, tr in (("fwd-linear", False, False), ("fwd-conv", True, False),
                                          ("fwd-dgrad", True, True)):
                    ptrs = {"a_ptr": f"*{t}", "bm_ptr": "*i32", "cp_ptr": "*i32", "v_ptr": f"*{t}",
                            "bias_ptr": f"*{t}", "out_ptr": f"*{t}"}
                    c = dict(M_BUCKET=bm, BM=bm, IS_CONV=is_conv, TRANSPOSED=tr, CA_GE64=is_conv, HAS_BIAS=not tr,
                             PREC=prec, **cfg.kwargs)
                    add(f"{kind}-{t}-BM{bm}-{tag(cfg)}", _fwd_kernel, kind, bm, ptrs, c, cfg, _expect_mma(dt, bm))
            for cfg in [c for c in _gemm_configs("dx") if _keep_config(bm, c, fp32, "dx")]:
                ptrs = {"dy_ptr": f"*{t}", "bm_ptr": "*i32", "cp_ptr": "*i32", "v_ptr": f"*{t}", "out_ptr": f"*{t}"}
                add(f"dx-{t}-BM{bm}-{tag(cfg)}", _dx_kernel, "dx", bm, ptrs,
                    dict(M_BUCKET=bm, BM=bm, PREC=prec, **cfg.kwargs), cfg, _expect_mma(dt, bm))
            b = min(bucket, 32 if fp32 else 64)  # _dw_cap (PREC="ieee")
            for cfg in [c for c in _gemm_configs("dw") if _keep_config(b, c, fp32, "dw")]:
                for kind, is_conv in (("dw-linear", False), ("dw-conv", True)):
                    ptrs = {"dy_ptr": f"*{t}", "a_ptr": f"*{t}", "bm_ptr": "*i32", "out_ptr": f"*{t}"}
                    add(f"{kind}-{t}-BM{b}-{tag(cfg)}", _dw_kernel, kind, b, ptrs,
                        dict(M_BUCKET=b, BM=b, IS_CONV=is_conv, CA_GE64=is_conv, PREC=prec, **cfg.kwargs), cfg,
                        _expect_mma(dt, cfg.kwargs["BN"]))
    return list(specs.values())

