"""Kept-values storage: the one canonical order of a sparse layer's trainable values.

A sparse layer stores only its kept weights, as a 1-D tensor ``values`` of length ``nnz``. The order is
the row-major order of the kept positions in the weight's *reduction view*
(:func:`sparsefast.masks.reduction_view`): for a Linear weight ``(out, in)`` that is plain row-major
order; for a conv weight ``(O, C/g, kh, kw)`` it is row-major over ``(O, kh, kw, C/g)`` (channel
fastest). This is the CSR order of the matrix the kernels multiply by, so kernel backends read
``values`` as they are (the ``cpu`` kernels' CSR values, the Triton unstructured format's values,
the compact N:M slots when every group is full): no re-pack after an optimizer step.

Everything here depends on the mask only and is cached per mask version (a mask changes through
``set_mask`` / ``load_state_dict``, which bump it):

* :func:`index` — ``flat``: int64 ``(nnz,)`` positions in the *natural* (contiguous, weight-shaped)
  layout, listed in canonical order. ``dense.view(-1)[flat]`` gathers values, ``index_put`` scatters.
* :func:`gather`, :func:`scatter` — dense <-> values (``scatter`` writes exact ``+0`` at pruned positions).
* :func:`remap` — where each value of a new mask comes from in an old one (positions kept in both keep
  their value, newly kept ones start at zero): used for values *and* optimizer state.
"""
from __future__ import annotations

import torch

from .._tensor_cache import TensorCache

__all__ = ["index", "nnz", "cached_index", "cached_nnz", "gather", "scatter", "remap", "remap_tensor", "share_index", "release"]

#: each live mask's index (tag "index"), valid while the mask is alive and unmodified
_INDEX = TensorCache()


def _ext():
    """The compiled CPU helpers when they are already loaded or prebuilt (never builds): O(n) passes for
    the index, the remap merge and top-k selections; ``None`` means the torch paths below."""
    from .. import _build_cpu

    return _build_cpu.loaded_or_prebuilt()


def _cpu_fast(t: torch.Tensor):
    """The extension module when ``t`` is a CPU tensor and the extension is there, else ``None``."""
    if t.device.type != "cpu":
        return None
    ext = _ext()
    return ext if ext is not None and hasattr(ext, "merge_keys") else None


def _canonical_flat(mask: torch.Tensor) -> torch.Tensor:
    """Flat natural-layout positions of the kept entries, in reduction-view row-major order."""
    if mask.dim() == 2:
        ext = _cpu_fast(mask)
        if ext is not None and mask.numel() < 2**31:
            return ext.flat_nonzero(mask)  # int32, two parallel passes (torch's nonzero: ~3x slower)
        return mask.reshape(-1).nonzero().reshape(-1)
    if mask.dim() == 4:
        o, c, kh, kw = mask.shape
        pos = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape)
        rv_mask = mask.permute(0, 2, 3, 1)
        return pos.permute(0, 2, 3, 1)[rv_mask]
    raise ValueError(f"kept values need a 2-D (linear) or 4-D (conv) mask, got shape {tuple(mask.shape)}")


def index(mask: torch.Tensor) -> torch.Tensor:
    """``flat`` positions (``(nnz,)``; int32 when the mask has fewer than 2^31 entries, else int64 — the
    cached copy lives as long as the mask, so half the bytes matter) of ``mask``'s kept entries in
    canonical order; cached while ``mask`` is alive and unmodified (its version counter)."""
    if mask.device.type == "meta":
        raise RuntimeError("kept-values index of a mask on the meta device: the mask's contents are unknown")
    key = (mask,)  # (TensorCache.cached spelled out: asked on every kernel call, no closure per call)
    flat = _INDEX.get("index", key)
    if flat is None:
        flat = _canonical_flat(mask)
        if mask.numel() < 2**31:
            flat = flat.to(torch.int32)
        _INDEX.put("index", key, flat)
    return flat


def share_index(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Let ``dst`` use ``src``'s cached index: call right after ``dst.copy_(src)`` (equal contents), so a
    mask change computes its index once — for the remap — and not again on the next forward."""
    flat = _INDEX.get("index", (src,))
    if flat is None or tuple(dst.shape) != tuple(src.shape) or dst.device != src.device:
        return
    _INDEX.put("index", (dst,), flat)


def release(mask: torch.Tensor) -> None:
    """Forget ``mask``'s cached index (it is rebuilt on the next :func:`index` call): for callers whose
    hot path does not need it, so nnz int32s do not sit in memory beside their own formats."""
    _INDEX.drop("index", (mask,))


def nnz(mask: torch.Tensor) -> int:
    return int(index(mask).numel())


def cached_index(mask: torch.Tensor) -> torch.Tensor | None:
    """``mask``'s :func:`index` when it is cached (current version), else ``None`` (no work)."""
    return _INDEX.get("index", (mask,))


def cached_nnz(mask: torch.Tensor) -> int | None:
    """``mask``'s kept count when its index is cached (current version), else ``None`` (no work)."""
    flat = cached_index(mask)
    return None if flat is None else int(flat.numel())


def gather(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values of ``dense`` (mask-shaped, any layout) at the kept positions, canonical order.
    Differentiable in ``dense`` (the gradient is scattered back, zero at pruned positions)."""
    flat = index(mask)
    if dense.is_contiguous() and not (dense.requires_grad and torch.is_grad_enabled()):
        ext = _cpu_fast(dense)
        if ext is not None and dense.element_size() in (2, 4) and flat.dtype == torch.int32:
            return ext.gather_perm(dense.reshape(-1), flat)  # int32 positions as they are cached, in parallel
    return dense.reshape(-1).index_select(0, flat) if dense.is_contiguous() else dense.contiguous().view(-1)[flat]


def scatter(values: torch.Tensor, mask: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense mask-shaped tensor holding ``values`` at the kept positions and ``+0`` elsewhere.
    Differentiable in ``values``. On the meta device (shape-only runs) an empty meta tensor."""
    if mask.device.type == "meta" or values.device.type == "meta":
        return torch.empty(mask.shape, dtype=dtype or values.dtype, device="meta")
    flat = index(mask)
    if values.shape != flat.shape:
        raise ValueError(f"{values.numel()} values for a mask that keeps {flat.numel()} of {tuple(mask.shape)}")
    v = values if dtype is None else values.to(dtype)
    if not (v.requires_grad and torch.is_grad_enabled()) and flat.dtype == torch.int32:
        ext = _cpu_fast(v)
        if ext is not None and hasattr(ext, "scatter_flat"):  # one pass, int32 positions as cached
            return ext.scatter_flat(v, flat, mask.numel(), mask.dim() == 2).view(mask.shape)
    out = torch.zeros(mask.numel(), dtype=v.dtype, device=v.device)
    # scatter_ with unique positions: 2.5x faster than index_put_ here (CPU, 100K-2M values); it needs
    # int64 positions (the cached index is int32)
    flat = flat.long()
    if v.requires_grad and torch.is_grad_enabled():
        out = out.scatter(0, flat, v)
    else:
        out.scatter_(0, flat, v)
    return out.view(mask.shape)


def _keys(mask: torch.Tensor) -> torch.Tensor:
    """Reduction-view row-major positions of the kept entries, canonical order (ascending); a 2-D mask's
    cached index as it is (int32 below 2^31 entries)."""
    if mask.dim() == 2:
        return index(mask)
    flat = index(mask).long()
    o, c, kh, kw = mask.shape   # natural (o, c, h, w) -> reduction view (o, h, w, c)
    w_ = flat % kw
    h_ = (flat // kw) % kh
    c_ = (flat // (kw * kh)) % c
    o_ = flat // (kw * kh * c)
    return ((o_ * kh + h_) * kw + w_) * c + c_


def remap(old_mask: torch.Tensor, new_mask: torch.Tensor,
          reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, keep)`` for moving values from ``old_mask``'s canonical order to ``new_mask``'s:
    ``new[keep] = old[src[keep]]``; ``keep`` is False at newly kept positions (they start at zero) and at
    the positions of the bool ``reset`` mask (restarted even though they were kept). Both orders are
    sorted by reduction-view position: a 2-D mask on CPU ranks each new key among the old mask's kept
    entries (prefix popcounts over the old mask; its index is not needed), otherwise the two sorted key
    lists are merged (no dense-sized lookup table)."""
    new_k = _keys(new_mask)
    ext = _cpu_fast(new_k)
    if (ext is not None and hasattr(ext, "rank_in_mask") and old_mask.dim() == 2 and new_k.dtype == torch.int32
            and old_mask.device == new_k.device and tuple(old_mask.shape) == tuple(new_mask.shape)):
        # each new key's rank among the old mask's kept entries: no index of the old mask needed
        pos, keep = ext.rank_in_mask(old_mask, new_k)
    else:
        old_k = _keys(old_mask)
        if old_k.numel() == 0:
            src = torch.zeros(new_k.shape, dtype=torch.long, device=new_k.device)
            return src, torch.zeros(new_k.shape, dtype=torch.bool, device=new_k.device)
        if ext is not None:  # a linear merge of the two ascending lists (searchsorted: n log n, ~10x slower)
            pos, keep = ext.merge_keys(old_k, new_k)
        else:
            old_k, new_k = old_k.long(), new_k.long()
            pos = torch.searchsorted(old_k, new_k).clamp_(max=old_k.numel() - 1)
            keep = old_k[pos] == new_k
    if reset is not None:
        keep &= ~reset.reshape(-1)[index(new_mask).long()]
    return pos, keep


def remap_tensor(t: torch.Tensor, src: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A new tensor in the new order (see :func:`remap`): old entries where kept before, zero elsewhere."""
    if src.numel() == 0 or t.numel() == 0:
        return torch.zeros(src.shape, dtype=t.dtype, device=t.device)
    ext = _cpu_fast(t)
    if (ext is not None and hasattr(ext, "gather_keep") and t.dim() == 1 and src.dtype == torch.int64
            and src.device == t.device and t.element_size() in (2, 4, 8)):
        return ext.gather_keep(t, src.contiguous(), keep.contiguous())  # one parallel pass
    # one gather and one masked fill (``src`` is a valid position everywhere, ``keep`` says where it
    # means something); boolean indexing would run a nonzero per tensor moved
    from ..backends.base import masked  # here: backends.base imports this module
    # one bitwise pass where it can (masked_fill_ took ~1.2 ms per 0.4M float32 here)
    return masked(t.index_select(0, src), keep, inplace=True)


def fill_where_(t: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``t.masked_fill_(mask, value)``; one vectorised pass in the cpu extension for contiguous float32 CPU
    tensors (torch's took 6 ms for 4M entries on an AVX2 VM: the DST grow step's ``-inf`` fill)."""
    ext = _cpu_fast(t)
    if (ext is not None and hasattr(ext, "fill_where") and t.dtype == torch.float32 and t.is_contiguous()
            and mask.dtype == torch.bool and mask.is_contiguous() and mask.shape == t.shape):
        ext.fill_where(t, mask, float(value))
        torch.autograd.graph.increment_version(t)  # C++ writes do not bump the version counter
        return t
    return t.masked_fill_(mask, value)
