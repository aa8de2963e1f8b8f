"""N:M Conv2d as implicit GEMM (Triton): forward, input gradient, masked weight gradient.

GEMM view per group ``g`` (``Cg = C/groups``, ``Og = O/groups``, reduction index
``k = (kh*KW + kw)*Cg + c``, channel fastest -- the reduction order of ``masks.reduction_view`` and
of the packed rows, so an N:M group is m consecutive input channels at one kernel position):

* forward: rows = output pixels ``(b, oh, ow)``, cols = output channels, reduce over ``k``; the
  x tile is gathered on the fly (``ih = oh*stride - pad + kh*dil``), zero outside the image.
* dx:      rows = input pixels ``(b, ih, iw)``, cols = input channels, reduce over kernel positions
  and output channels; ``oh = (ih + pad - kh*dil) / stride`` must be whole and in range.
* dW:      rows = output channels, cols = ``k``, reduce over output pixels (split-K), written where
  the mask keeps (bitmap), zero elsewhere, straight into the (O, C/g, kh, kw) gradient.

Tensors are read and written through their strides, so NCHW and channels-last (NHWC, the
coalesced layout along the reduction) both work without copies; outputs use the input's layout.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from ...formats import nm as fmt
from ..base import ConvParams, conv_output_hw
from .nm import (_AOT_HINTS, _check_numel, _class_rows, _dev_index, _launch, _m_class, _num_sms, _pick_split,
                 _prec, _store_tile, _bitmap_keep, _dot, _nm_tile)


@triton.jit
def _conv_fwd_kernel(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M_CLASS, B, H, W, Ho, Wo, Cg, Og, KW, Kred,
                     sxb, sxc, sxh, sxw, svr, smr, syb, syc, syh, syw, sh, sw, ph, pw, dh, dw,
                     HAS_BIAS: tl.constexpr, NK: tl.constexpr, MG: tl.constexpr, BITS: tl.constexpr,
                     PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y = conv2d(x, W*M) (+ b). Grid (pixel tiles x channel tiles, groups)."""
    pid, grp = tl.program_id(0), tl.program_id(1)
    grid_n = tl.cdiv(Og, BN)
    rp = (pid // grid_n) * BM + tl.arange(0, BM)
    ro = (pid % grid_n) * BN + tl.arange(0, BN)
    p_ok, o_ok = rp < B * Ho * Wo, ro < Og
    b, oh, ow = rp // (Ho * Wo), (rp // Wo) % Ho, rp % Wo
    x_pix = x_ptr + b * sxb + grp * Cg * sxc
    rows = grp * Og + ro
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kred, BK):
        rk = k0 + tl.arange(0, BK)
        kpos, c = rk // Cg, rk % Cg
        ih = (oh * sh - ph)[:, None] + ((kpos // KW) * dh)[None, :]
        iw = (ow * sw - pw)[:, None] + ((kpos % KW) * dw)[None, :]
        ok = p_ok[:, None] & (rk < Kred)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_pix[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=ok, other=0.0)
        w = _nm_tile(v_ptr, m_ptr, rows, o_ok, k0 // MG * NK, Kred // MG * NK, svr, smr, BN, BK, NK, MG, BITS)
        acc = _dot(x, tl.trans(w), acc, PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + (b * syb + oh * syh + ow * syw)[:, None] + rows[None, :] * syc
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


@triton.jit
def _conv_dx_kernel(dy_ptr, v_ptr, m_ptr, dx_ptr, M_CLASS, B, H, W, Ho, Wo, Cg, Og, KH, KW,
                    sdb, sdc, sdh, sdw, svr, smr, sxb, sxc, sxh, sxw, sh, sw, ph, pw, dh, dw,
                    NK: tl.constexpr, MG: tl.constexpr, BITS: tl.constexpr, PREC: tl.constexpr,
                    ALIGNED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dx = conv2d_input(dy, W*M). Grid (input-pixel tiles x input-channel tiles, groups); the
    loops walk kernel positions and chunks of BN output channels (packed rows). ``ALIGNED``: each
    kernel position's slots start on a metadata byte (Cg*NK/MG divisible by 8/BITS)."""
    pid, grp = tl.program_id(0), tl.program_id(1)
    grid_c = tl.cdiv(Cg, BK)
    rq = (pid // grid_c) * BM + tl.arange(0, BM)
    c0 = (pid % grid_c) * BK
    rc = c0 + tl.arange(0, BK)
    q_ok = rq < B * H * W
    b, ih, iw = rq // (H * W), (rq // W) % H, rq % W
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for kpos in range(0, KH * KW):
        th = ih + ph - (kpos // KW) * dh
        tw = iw + pw - (kpos % KW) * dw
        oh, ow = th // sh, tw // sw
        ok = q_ok & (th >= 0) & (tw >= 0) & (th % sh == 0) & (tw % sw == 0) & (oh < Ho) & (ow < Wo)
        dy_pix = dy_ptr + b * sdb + oh * sdh + ow * sdw + grp * Og * sdc
        s0 = (kpos * Cg + c0) // MG * NK
        s_lim = (kpos + 1) * Cg // MG * NK
        for o0 in range(0, Og, BN):
            ro = o0 + tl.arange(0, BN)
            dy = tl.load(dy_pix[:, None] + ro[None, :] * sdc, mask=ok[:, None] & (ro < Og)[None, :], other=0.0)
            w = _nm_tile(v_ptr, m_ptr, grp * Og + ro, ro < Og, s0, s_lim, svr, smr, BN, BK, NK, MG, BITS, ALIGNED)
            acc = _dot(dy, w, acc, PREC)
    dx = dx_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + (grp * Cg + rc)[None, :] * sxc
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & (rc < Cg)[None, :])


@triton.jit
def _conv_dw_kernel(dy_ptr, x_ptr, bm_ptr, dw_ptr, ws_ptr, lock_ptr, M_CLASS, G, B, H, W, Ho, Wo, Cg, Og, KW, Kred,
                    sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw, sbr, swo, swc, swh, sww, sh, sw, ph, pw, dh, dw,
                    PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, SPLIT_K: tl.constexpr):
    """dW = conv2d_weight(x, dy) * mask. Grid (channel x k tiles, groups, SPLIT_K); loop over
    output pixels in chunks of BB. ``G`` (= groups) and ``M_CLASS`` (class of the output pixels)
    are only autotune keys: SPLIT_K is a function of them."""
    pid, grp, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    grid_k = tl.cdiv(Kred, BK)
    ro = (pid // grid_k) * BN + tl.arange(0, BN)
    rk = (pid % grid_k) * BK + tl.arange(0, BK)
    o_ok, k_ok = ro < Og, rk < Kred
    rows = grp * Og + ro
    kpos, c = rk // Cg, rk % Cg
    kh, kw = kpos // KW, kpos % KW
    P = B * Ho * Wo
    p_tiles = tl.cdiv(P, BB)
    per_split = tl.cdiv(p_tiles, SPLIT_K)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(pid_k * per_split, tl.minimum(p_tiles, (pid_k + 1) * per_split)):
        rp = t * BB + tl.arange(0, BB)
        p_ok = rp < P
        b, oh, ow = rp // (Ho * Wo), (rp // Wo) % Ho, rp % Wo
        a = tl.load(dy_ptr + (b * sdb + oh * sdh + ow * sdw)[None, :] + rows[:, None] * sdc,
                    mask=o_ok[:, None] & p_ok[None, :], other=0.0)
        ih = (oh * sh - ph)[:, None] + (kh * dh)[None, :]
        iw = (ow * sw - pw)[:, None] + (kw * dw)[None, :]
        ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_pix = x_ptr + (b * sxb)[:, None] + ((grp * Cg + c) * sxc)[None, :]
        x = tl.load(x_pix + ih * sxh + iw * sxw, mask=ok, other=0.0)
        acc = _dot(a, x, acc, PREC)
    keep = _bitmap_keep(bm_ptr, tl.where(o_ok, rows, 0), tl.where(k_ok, rk, 0), sbr)
    acc = tl.where(keep, acc, 0.0)
    out = dw_ptr + rows[:, None] * swo + (c * swc + kh * swh + kw * sww)[None, :]
    tile = grp * tl.cdiv(Og, BN) * grid_k + pid
    _store_tile(acc, out, o_ok[:, None] & k_ok[None, :], ws_ptr, rows[:, None] * Kred + rk[None, :],
                Og * tl.num_programs(1) * Kred, lock_ptr, tile, pid_k, SPLIT_K)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
_CONV_CONFIGS = [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in ((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3),
                                          (32, 32, 64, 4, 3))]
_CONV_DW_CONFIGS = [triton.Config(dict(BN=bn, BK=bk, BB=bb, SPLIT_K=1), num_warps=w, num_stages=s)
                    for bn, bk, bb, w, s in ((64, 64, 64, 4, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3))]
_CONV_KEY = ["M_CLASS", "Cg", "Og", "KW", "Kred", "PREC"]
#: dW's SPLIT_K (and the workspace sized for it) depends on this key only: pixel class and groups too
_CONV_DW_KEY = _CONV_KEY + ["G"]
_NHWC = ("sxb", "sxh", "sxw", "syb", "syh", "syw", "sdb", "sdh", "sdw")
_AOT_HINTS.update({
    "_conv_fwd_kernel": (("Cg", "Og", "Kred", "svr", "smr", *_NHWC), ("sxc", "syc")),
    "_conv_dx_kernel": (("Cg", "Og", "svr", "smr", *_NHWC), ("sdc", "sxc")),
    "_conv_dw_kernel": (("Cg", "Og", "Kred", "sbr", "swo", *_NHWC), ("sdc", "sxc", "sww")),
})


def _dw_candidates(configs, p_class, Og, Kred, groups, sms) -> list:
    """Each dW config with its SPLIT_K over the output pixels, for every P = B*Ho*Wo of class
    ``p_class`` (``_m_class(P)``; the split is computed for the class's smallest P, so it is the same
    for all of them -- the autotuner reuses one config per key)."""
    P = _class_rows(p_class)
    out = []
    for c in configs:
        tiles = groups * triton.cdiv(Og, c.kwargs["BN"]) * triton.cdiv(Kred, c.kwargs["BK"])
        split = _pick_split(tiles, triton.cdiv(P, c.kwargs["BB"]), sms, max_split=16)
        out.append(triton.Config(dict(c.kwargs, SPLIT_K=split), num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _prune_dw(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}  # positional args arrive as named_args, keyword ones (all, here) as kwargs
    return _dw_candidates(configs, a["M_CLASS"], a["Og"], a["Kred"], a["G"], _num_sms(a["dw_ptr"].device.index))


@functools.lru_cache(maxsize=4096)
def _max_dw_split(p_class: int, Og: int, Kred: int, groups: int, sms: int) -> int:
    """Largest SPLIT_K of any dW candidate for this autotune key (sizes the workspace)."""
    return max(c.kwargs["SPLIT_K"] for c in _dw_candidates(_CONV_DW_CONFIGS, p_class, Og, Kred, groups, sms))


_FWD = (triton.autotune(_CONV_CONFIGS, key=_CONV_KEY)(_conv_fwd_kernel), _CONV_CONFIGS)
#: dx takes KH instead of Kred (= KH * KW * Cg). Triton <= 3.8 silently dropped key names that are not
#: kernel arguments (so dx was keyed without the kernel height); 3.9 rejects them
_CONV_DX_KEY = ["M_CLASS", "Cg", "Og", "KH", "KW", "PREC"]
_DX = (triton.autotune(_CONV_CONFIGS, key=_CONV_DX_KEY)(_conv_dx_kernel), _CONV_CONFIGS)
_DW = (triton.autotune(_CONV_DW_CONFIGS, key=_CONV_DW_KEY,
                       prune_configs_by={"early_config_prune": _prune_dw})(_conv_dw_kernel), _CONV_DW_CONFIGS)


def _out_hw(h: int, w: int, kh: int, kw: int, conv: ConvParams) -> tuple[int, int]:
    return conv_output_hw(h, w, (kh, kw), conv.stride, conv.padding, conv.dilation)


def _empty_like_layout(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Empty tensor of ``shape`` in ``like``'s layout (channels-last stays channels-last)."""
    cl = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(list(shape), dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _conv_args(conv: ConvParams) -> dict:
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    return dict(sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw)


def conv_fwd(x: torch.Tensor, p: fmt.NMPacked, bias: torch.Tensor | None, conv: ConvParams) -> torch.Tensor:
    """conv2d(x, unpack(p), bias): x (B, C, H, W) any layout -> (B, O, Ho, Wo) in x's layout."""
    B, C, H, W = x.shape
    O, Cg, KH, KW = p.shape
    G = conv.groups
    Ho, Wo = _out_hw(H, W, KH, KW, conv)
    y = _empty_like_layout((B, O, Ho, Wo), x)
    if y.numel() == 0:
        return y
    _check_numel(x, y, p.values)
    args = dict(x_ptr=x, v_ptr=p.values, m_ptr=p.meta, b_ptr=bias.contiguous() if bias is not None else y, y_ptr=y,
                M_CLASS=_m_class(B * Ho * Wo), B=B, H=H, W=W, Ho=Ho, Wo=Wo, Cg=Cg, Og=O // G, KW=KW, Kred=KH * KW * Cg,
                sxb=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
                svr=p.values.stride(0), smr=p.meta.stride(0),
                syb=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3), **_conv_args(conv),
                HAS_BIAS=bias is not None, NK=p.n, MG=p.m, BITS=p.bits, PREC=_prec(x.dtype))
    grid = lambda c: (triton.cdiv(B * Ho * Wo, c["BM"]) * triton.cdiv(O // G, c["BN"]), G)  # noqa: E731
    _launch(_conv_fwd_kernel, _FWD, grid, args, y, lambda: 1, 0)
    return y


def conv_dx(dy: torch.Tensor, p: fmt.NMPacked, conv: ConvParams, input_shape: Sequence[int]) -> torch.Tensor:
    """conv2d_input: dy (B, O, Ho, Wo) -> dx ``input_shape`` (B, C, H, W), in dy's layout."""
    B, C, H, W = input_shape
    O, Cg, KH, KW = p.shape
    G = conv.groups
    _, _, Ho, Wo = dy.shape
    dx = _empty_like_layout(input_shape, dy)
    if dx.numel() == 0:
        return dx
    _check_numel(dy, dx, p.values)
    args = dict(dy_ptr=dy, v_ptr=p.values, m_ptr=p.meta, dx_ptr=dx, M_CLASS=_m_class(B * H * W),
                B=B, H=H, W=W, Ho=Ho, Wo=Wo, Cg=Cg, Og=O // G, KH=KH, KW=KW,
                sdb=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
                svr=p.values.stride(0), smr=p.meta.stride(0),
                sxb=dx.stride(0), sxc=dx.stride(1), sxh=dx.stride(2), sxw=dx.stride(3), **_conv_args(conv),
                NK=p.n, MG=p.m, BITS=p.bits, PREC=_prec(dy.dtype), ALIGNED=(Cg // p.m * p.n) % p.per_byte == 0)
    grid = lambda c: (triton.cdiv(B * H * W, c["BM"]) * triton.cdiv(Cg, c["BK"]), G)  # noqa: E731
    _launch(_conv_dx_kernel, _DX, grid, args, dx, lambda: 1, 0)
    return dx


def conv_dw(dy: torch.Tensor, x: torch.Tensor, bm: torch.Tensor, conv: ConvParams,
            weight_shape: Sequence[int]) -> torch.Tensor:
    """conv2d_weight(x, dy) * mask (mask as a reduction-view bitmap) -> ``weight_shape`` (contiguous)."""
    B, C, H, W = x.shape
    O, Cg, KH, KW = weight_shape
    G = conv.groups
    _, _, Ho, Wo = dy.shape
    dw = torch.empty(list(weight_shape), dtype=dy.dtype, device=dy.device)
    Kred = KH * KW * Cg
    if dw.numel() == 0:
        return dw
    _check_numel(dy, x, dw)
    p_class = _m_class(B * Ho * Wo)
    args = dict(dy_ptr=dy, x_ptr=x, bm_ptr=bm, dw_ptr=dw,
                M_CLASS=p_class, G=G, B=B, H=H, W=W, Ho=Ho, Wo=Wo, Cg=Cg, Og=O // G, KW=KW, Kred=Kred,
                sdb=dy.stride(0), sdc=dy.stride(1), sdh=dy.stride(2), sdw=dy.stride(3),
                sxb=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3), sbr=bm.stride(0),
                swo=dw.stride(0), swc=dw.stride(1), swh=dw.stride(2), sww=dw.stride(3), **_conv_args(conv),
                PREC=_prec(dy.dtype))
    grid = lambda c: (triton.cdiv(O // G, c["BN"]) * triton.cdiv(Kred, c["BK"]), G, c["SPLIT_K"])  # noqa: E731
    max_split = lambda: _max_dw_split(p_class, O // G, Kred, G, _num_sms(_dev_index(dw.device)))  # noqa: E731
    _launch(_conv_dw_kernel, _DW, grid, args, dw, max_split, G * triton.cdiv(O // G, 16) * triton.cdiv(Kred, 16))
    return dw


def aot_specs(pat, dtype: torch.dtype, nm: dict) -> list:
    """AOT specs (see ``nm.aot_compile_configs``) of the conv kernels' autotune configs, for
    channels-last activations (unit channel stride)."""
    from .nm import _EXPECT_MMA, _spec
    out = []
    for c in _CONV_CONFIGS:
        out.append(_spec(_conv_fwd_kernel, dtype, c, dict(nm, PREC="ieee", HAS_BIAS=True), f"conv_fwd {pat}",
                         _EXPECT_MMA))
        out.append(_spec(_conv_dx_kernel, dtype, c, dict(nm, PREC="ieee", ALIGNED=True), f"conv_dx {pat}", _EXPECT_MMA))
    for c in _CONV_DW_CONFIGS:
        out.append(_spec(_conv_dw_kernel, dtype, c, dict(PREC="ieee", SPLIT_K=4), f"conv_dw {pat} split4", _EXPECT_MMA))
    return out
