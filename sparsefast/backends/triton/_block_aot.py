"""Ahead-of-time compile list of the block-sparse Triton kernels (what ``python -m sparsefast kernels
--report`` compiles for sm_80/sm_90 without a GPU): one spec per kernel variant the launchers of
:mod:`sparsefast.backends.triton.block` run, for a representative set of block sizes."""
from __future__ import annotations

from typing import Sequence

import torch

from ._block_kernels import _dw_kernel, _dx_kernel, _fwd_kernel
from ._common import DTYPE_NAMES as _TY, AotSpec, specialize
from .block import KSTEP, M_BUCKETS, _br, _configs, bm_cap


def _example_ints(kind: str, b: int, bm: int) -> dict[str, int]:
    """Integer arguments of a representative call: Linear 4096×4096 (contiguous tensors) with
    ``M = bm`` rows for fwd / dx, 8192 rows (one reduction range) for dW."""
    nb = 4096 // b
    if kind == "fwd":
        return dict(M=bm, NBR=nb, s_xm=4096, s_xk=1, s_om=4096, s_on=1)
    if kind == "dx":
        return dict(M=bm, NBC=nb, s_dm=4096, s_dn=1, s_om=4096, s_ok=1)
    if kind == "dw":
        return dict(M=8192, MPS=8192, s_dm=4096, s_dn=1, s_xm=4096, s_xk=1, so_s=0)
    raise ValueError(kind)


def _expect(dtype: torch.dtype, mma_m: int) -> dict:
    """16-bit types: tensor cores, wgmma on sm_90 where the MMA's M side (``BM`` rows of x for fwd /
    dx, the ``64`` kept-block columns for dW) is at least 64; fp32 with ``PREC="ieee"`` (torch's
    default) is an FMA dot on CUDA cores. Every variant is an autotune candidate: ``hot``."""
    if dtype == torch.float32:
        return dict(tensor_core=False, hot=True)
    return dict(tensor_core=True, wgmma=mma_m >= 64, hot=True)


def aot_compile_configs(dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16, torch.float32),
                        blocks: Sequence[int] = (16, 32), m_buckets: Sequence[int] = M_BUCKETS) -> list[AotSpec]:
    """Specs of the block kernels: forward and dX per row block ``BM`` the launchers use (capped for
    fp32 by :func:`~sparsefast.backends.triton.block.bm_cap`), masked dW, each autotune config, for
    each dtype and block size in ``blocks`` (default 16 and 32; B=8 runs the same code as 16 with
    half-masked tiles). Names read ``block-fwd-bf16-B32-BM128-w4s3``. fp32 is compiled with
    ``PREC="ieee"`` (TF32 off, torch's default)."""
    specs: dict[str, AotSpec] = {}

    def add(name, kernel, kind, b, bm, pointers, constexprs, cfg, expect):
        sig, const, attrs = specialize(kernel, pointers, _example_ints(kind, b, bm), constexprs)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        specs.setdefault(name, AotSpec(kernel, sig, const, opts, attrs, name, expect))

    for dt in dtypes:
        t = _TY[dt]
        fp32 = dt == torch.float32
        for b in blocks:
            br, steps = _br(b), KSTEP // b
            for bucket in m_buckets:
                bm = min(bucket, bm_cap(fp32, b))  # block._bm
                for cfg in _configs("fwd"):
                    tag = f"B{b}-BM{bm}-w{cfg.num_warps}s{cfg.num_stages}"
                    add(f"block-fwd-{t}-{tag}", _fwd_kernel, "fwd", b, bm,
                        {"x_ptr": f"*{t}", "rp_ptr": "*i32", "col_ptr": "*i32", "v_ptr": f"*{t}",
                         "bias_ptr": f"*{t}", "out_ptr": f"*{t}"},
                        dict(M_BUCKET=bm, BM=bm, B=b, BR=br, TK=steps, HAS_BIAS=True, PREC="ieee"), cfg,
                        _expect(dt, bm))
                for cfg in _configs("dx"):
                    tag = f"B{b}-BM{bm}-w{cfg.num_warps}s{cfg.num_stages}"
                    add(f"block-dx-{t}-{tag}", _dx_kernel, "dx", b, bm,
                        {"dy_ptr": f"*{t}", "cp_ptr": "*i32", "tb_ptr": "*i32", "v_ptr": f"*{t}", "out_ptr": f"*{t}"},
                        dict(M_BUCKET=bm, BM=bm, B=b, BR=br, TN=steps, PREC="ieee"), cfg, _expect(dt, bm))
            bm = 32 if fp32 else 64  # block._dw_bm
            for cfg in _configs("dw"):
                tag = f"B{b}-BM{bm}-w{cfg.num_warps}s{cfg.num_stages}"
                add(f"block-dw-{t}-{tag}", _dw_kernel, "dw", b, bm,
                    {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "rp_ptr": "*i32", "col_ptr": "*i32", "item_ptr": "*i32",
                     "out_ptr": f"*{t}"},
                    dict(M_BUCKET=bm, BM=bm, B=b, BR=br, TB=steps, PREC="ieee"), cfg, _expect(dt, KSTEP))
    return list(specs.values())
