"""One-shot pruning of pretrained models with calibration data: :class:`Wanda` and :class:`SparseGPT`.

Both prune a trained model in one call, from the activations that calibration data produces, with no
gradient and no retraining::

    pruner = sparsefast.pruning.SparseGPT(model, pattern="2:4")         # or Wanda(model, sparsity=0.5)
    pruner.prune(batch=calibration)    # a tensor, a dict of tensors (model(**batch)), or a list / iterable

**Calibration.** ``batch`` is one model input or an iterable of them. An input is a tensor (called as
``model(x)``), a mapping of tensors such as a tokenizer's ``BatchEncoding`` (``model(**batch)``), or a
tuple / list whose first element is one of those (``(x, y)`` batches of a DataLoader: the rest is ignored).
A single tensor, mapping or tuple is one batch; a list or any other iterable holds batches. The data are
read once per *layer group* (below): an iterator that can be read only once (a generator) is first turned
into a list; pass a re-iterable (a list, a ``DataLoader``) to keep only one batch in memory at a time.
Tensors are moved to the device of the pruned layers; their dtype is not changed (a wrong dtype is an
error naming the layer that receives it).

**Order (sequential pruning).** As in both papers, every layer is pruned from the inputs it receives in
the model whose *preceding* layers are already pruned (and, for SparseGPT, updated). For an arbitrary
model this is done without knowing its block structure:

1. one forward of the first calibration batch records, with forward pre-hooks, the order in which the
   managed layers are first called and groups consecutive layers that receive the very same input tensor
   (``q_proj``/``k_proj``/``v_proj`` of an attention block, ``gate_proj``/``up_proj`` of a gated MLP: the
   groups of the SparseGPT code's ``true_sequential`` option);
2. for each group in that order (progress bar), the calibration data run through the model (eval mode, no
   autograd) with pre-hooks on the group's layers that accumulate the statistics of their inputs; the
   forward stops (an internal exception) as soon as every layer of the group has seen its input, so layers
   after the group are not computed; then the group's layers are pruned, which changes what the next
   group sees.

Memory: no activation is stored beyond the forward of one batch; a group holds one statistics buffer
(its layers share it: same inputs): Wanda a vector of K squared norms, SparseGPT one K x K float32 Hessian
(``groups`` of them for a grouped convolution), accumulated batch by batch in row chunks. Time: one
forward of the calibration set per group, cut at the group (about half a full forward on average).
Layers that are never called in the forward receive no calibration data: they are left unpruned with a
warning naming them.

**Atomicity.** ``prune()`` changes the layers one group at a time (the next group needs them changed).
If anything fails part-way (a bad batch, a forward error, an interrupt), every layer already changed is
put back (mask, pattern and values, from a CPU copy taken before its change) and the model's train/eval
mode is restored, so a failed call leaves the model as it was. Hooks are always removed.

**Default layers.** Without ``filter_fn`` the output head stays dense: the module a Hugging Face model
returns from ``get_output_embeddings()`` (e.g. ``lm_head``), any layer named ``lm_head`` and any layer
whose weight is shared with an embedding (tied heads). Embeddings are never pruned (they are not
``Linear``/``Conv2d``). Hugging Face ``Conv1D`` layers (GPT-2's ``c_attn``/``c_proj``/``c_fc``, weight stored
``(in, out)``) are pruned like ``Linear`` layers: they become :class:`~sparsefast.SparseLinear` layers of the
transposed weight (N:M groups along the input dimension) that keep Conv1D's layout in the state dict and
densify back to ``Conv1D`` (:func:`sparsefast.sparsify`). A ``filter_fn`` replaces this default;
:func:`default_filter` gives it to combine.

**Layer-wise sparsity.** ``sparsity`` with ``distribution`` (default ``"uniform"``, the papers' rule: every
layer at the same sparsity; any layer-wise distribution is accepted) gives each layer's density. The
``"global"`` distribution is refused: calibration scores of different layers are not on one scale, both
methods allocate within a layer. N:M: every layer keeps n of each m-group along the reduction dimension.

Deterministic: no randomness is involved (``seed`` is accepted for the shared protocol). The masks are
the same on every backend up to exact float ties of the scores (activations after the first layer come
from the layers' backend). After ``prune()``, :attr:`layer_stats` holds per layer the calibration rows
seen, the seconds spent and (SparseGPT) the damping used and the reconstruction-error estimate.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks as _masks
from ..backends import SparsefastWarning
from ..formats import kept as _kept
from ..nn.layers import SparseConv2d, SparseLinear, SparseModule
from .base import (Pruner, _check_int, _check_number, expand_units, group_top_mask, progress, top_k_mask,
                   unit_scores)

__all__ = ["Wanda", "SparseGPT", "default_filter", "sparsegpt_prune", "hessian_inverse_factor",
           "wanda_scores"]

# rows of a calibration chunk turned into float32 at once (bounds the temporary copies)
_CHUNK_ELEMS = 1 << 24


# ------------------------------------------------------------------------------------------------
# default layer filter: output heads stay dense
# ------------------------------------------------------------------------------------------------
def default_filter(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The layer filter :class:`Wanda` and :class:`SparseGPT` use without ``filter_fn``: every
    ``Linear``/``Conv2d``/``Conv1D`` (plain or sparse) except the output head, i.e. the module ``model``'s
    ``get_output_embeddings()`` returns (Hugging Face models), layers named ``lm_head`` and layers whose
    weight is shared with an ``nn.Embedding`` (tied heads). Combine it with your own rule as
    ``lambda n, m: default_filter(model)(n, m) and mine(n, m)``."""
    head_ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - a model may implement it partially; then nothing is excluded
            head = None
        if isinstance(head, nn.Module):
            head_ids.add(id(head))
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def keep(name: str, mod: nn.Module) -> bool:
        if id(mod) in head_ids or name.rpartition(".")[2] == "lm_head":
            return False
        return id(getattr(mod, "weight", None)) not in emb_weights

    return keep


# ------------------------------------------------------------------------------------------------
# calibration data
# ------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a pre-hook to cut the forward once the current group has seen its inputs."""


def _calibration_set(method: str, batch: Any) -> Any:
    """A re-iterable of batches (validated shallowly; see the module docstring)."""
    if batch is None:
        raise ValueError(f"{method}.prune() needs calibration data: pass batch= a tensor of model inputs, a dict "
                         "of tensors (called as model(**batch)), or a list / iterable of them")
    if isinstance(batch, (torch.Tensor, Mapping)):
        return [batch]
    if isinstance(batch, tuple):
        if not batch:
            raise ValueError(f"{method}.prune(): the calibration batch is an empty tuple")
        return [batch]
    if isinstance(batch, (str, bytes)) or not hasattr(batch, "__iter__"):
        raise TypeError(f"{method}.prune(): batch must be a tensor, a dict of tensors or a list / iterable of "
                        f"them, got {type(batch).__name__}")
    if iter(batch) is batch:  # single-use iterator: read once here, then once per layer group
        batch = list(batch)
    if isinstance(batch, (list, tuple)) and len(batch) == 0:
        raise ValueError(f"{method}.prune(): the calibration set is empty")
    return batch


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v


def _run(method: str, model: nn.Module, b: Any, i: int, device: torch.device) -> None:
    """One forward of calibration batch ``b`` (number ``i``); a :class:`_Stop` from a hook ends it."""
    if isinstance(b, (tuple, list)):
        if not b:
            raise ValueError(f"{method}.prune(): calibration batch {i} is empty")
        b = b[0]
    try:
        if isinstance(b, torch.Tensor):
            model(_to(b, device))
        elif isinstance(b, Mapping):
            model(**{k: _to(v, device) for k, v in b.items()})
        else:
            raise TypeError(f"{method}.prune(): calibration batch {i} is a {type(b).__name__}; expected a tensor, "
                            "a dict of tensors or an (x, ...) tuple")
    except _Stop:
        pass


# ------------------------------------------------------------------------------------------------
# input statistics of one layer group (columns in the reduction order of the weight)
# ------------------------------------------------------------------------------------------------
def _signature(layer: SparseModule) -> tuple:
    """Layers with equal signatures turn one input into the same columns (they can share statistics)."""
    if isinstance(layer, SparseConv2d):
        return ("conv", tuple(layer.weight_shape[1:]), layer.stride, layer.padding, layer.dilation, layer.groups,
                layer.padding_mode)
    return ("linear", layer.weight_shape[1])


def _check_input(method: str, name: str, layer: SparseModule, x: Any) -> None:
    where = f"{method}.prune(): layer {name!r} ({type(layer).__name__} weight {tuple(layer.weight_shape)})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} received a {type(x).__name__}, not a tensor")
    if not x.is_floating_point():
        raise TypeError(f"{where} received calibration activations of dtype {x.dtype}; a floating dtype "
                        f"({layer.weight.dtype}) is needed (check the calibration inputs' dtype)")
    if x.dtype != layer.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{where} received activations of dtype {x.dtype}, but its weight is {layer.weight.dtype}; "
                        "convert the calibration data or the model to one dtype")
    if isinstance(layer, SparseConv2d):
        c = layer.weight_shape[1] * layer.groups
        if x.dim() not in (3, 4) or x.shape[-3] != c:
            raise ValueError(f"{where} received an input of shape {tuple(x.shape)}; expected (N, {c}, H, W) "
                             "(check the calibration inputs' shape)")
    elif x.dim() < 1 or x.shape[-1] != layer.weight_shape[1]:
        raise ValueError(f"{where} received an input of shape {tuple(x.shape)}; expected (..., "
                         f"{layer.weight_shape[1]}) (check the calibration inputs' shape)")


def _columns(layer: SparseModule, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(groups, rows, K)`` columns in the weight's reduction order (conv: the
    unfolded patches, ``(kh, kw, c)`` with the channel fastest, per group)."""
    if not isinstance(layer, SparseConv2d):
        return x.reshape(1, -1, x.shape[-1])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    kh, kw = layer.weight_shape[2:]
    pad = layer.padding
    if layer.padding_mode != "zeros" and not isinstance(pad, str):
        ph, pw = pad
        x = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode)
        pad = (0, 0)
    if isinstance(pad, str):  # "valid" / "same"
        if pad == "same":
            tot = [d * (k - 1) for d, k in zip(layer.dilation, (kh, kw))]
            x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
        pad = (0, 0)
    cols = F.unfold(x, (kh, kw), dilation=layer.dilation, padding=pad, stride=layer.stride)  # (N, C*kh*kw, L)
    n, _, L = cols.shape
    g, cg = layer.groups, layer.weight_shape[1]
    cols = cols.reshape(n, g, cg, kh * kw, L).permute(1, 0, 4, 3, 2)  # (g, N, L, kh*kw, cg)
    return cols.reshape(g, n * L, kh * kw * cg)


def _add_xtx(H: torch.Tensor, X: torch.Tensor) -> None:
    """``H += Xᵀ X`` for float32 ``X`` (rows, K); only the upper triangle of ``H`` is meaningful afterwards
    on CPU (the symmetric half is skipped, :func:`_symmetrize` restores it)."""
    K = X.shape[1]
    if H.device.type != "cpu" or K < 512:
        H.addmm_(X.t(), X)
        return
    if _ssyrk is not None and X.is_contiguous():
        # BLAS syrk on the transposed views: H (row-major) is Hᵀ column-major; a = Xᵀ (K x rows) col-major
        hn = H.numpy().T
        out = _ssyrk(1.0, X.numpy().T, beta=1.0, c=hn, trans=0, lower=1, overwrite_c=1)
        if not (isinstance(out, type(hn)) and out.ctypes.data == hn.ctypes.data):  # not in place: copy back
            H.copy_(torch.from_numpy(out).T)
        return
    nb = 8  # upper row slabs: (nb+1)/(2nb) of the full product's flops
    b = -(-K // nb)
    for i in range(0, K, b):
        H[i:i + b, i:].addmm_(X[:, i:i + b].t(), X[:, i:])


def _symmetrize(H: torch.Tensor) -> torch.Tensor:
    if H.device.type != "cpu" or H.shape[-1] < 512:
        return H
    return torch.triu(H) + torch.triu(H, 1).transpose(-1, -2)


try:  # BLAS syrk (half the flops of a matmul) when SciPy is installed; torch otherwise
    from scipy.linalg.blas import ssyrk as _ssyrk  # type: ignore
except Exception:  # noqa: BLE001 - optional
    _ssyrk = None
try:  # LAPACK triangular inverse (a third of a triangular solve against the identity)
    from scipy.linalg.lapack import strtri as _strtri  # type: ignore
except Exception:  # noqa: BLE001 - optional
    _strtri = None


class _Stats:
    """Input statistics of one group of layers sharing their input: the number of rows, and the sum of
    squared column norms (Wanda) or the Gram matrix ``Σ xᵀx`` (SparseGPT), per conv group."""

    def __init__(self, layer: SparseModule, hessian: bool) -> None:
        ws = layer.weight_shape
        g = layer.groups if isinstance(layer, SparseConv2d) else 1
        K = int(math.prod(ws[1:]))
        dev = layer.mask.device
        self.layer = layer
        self.hessian = hessian
        self.rows = 0
        self.nonfinite = False
        self.sq = torch.zeros(g, K, dtype=torch.float64, device=dev)
        self.H = torch.zeros(g, K, K, dtype=torch.float32, device=dev) if hessian else None
        self.last: torch.Tensor | None = None
        self.factors: dict[int, tuple] = {}  # SparseGPT: per conv group, hessian_inverse_factor(H)

    def add(self, x: torch.Tensor) -> None:
        cols = _columns(self.layer, x.detach())
        g, rows, K = cols.shape
        step = max(1, _CHUNK_ELEMS // max(K, 1))
        for r0 in range(0, rows, step):
            for gi in range(g):
                X = cols[gi, r0:r0 + step]
                X = X.float() if X.dtype != torch.float32 else X
                if not X.is_contiguous():
                    X = X.contiguous()
                # no finiteness pass over X here (a full read of every chunk): a NaN/Inf in column j makes
                # the accumulated Σ x_j² (H's diagonal / sq) NaN or Inf, which finish() checks once
                if self.hessian:
                    _add_xtx(self.H[gi], X)
                else:
                    self.sq[gi] += X.square().sum(0, dtype=torch.float64)
        self.rows += rows

    def finish(self) -> None:
        if self.hessian:
            for gi in range(self.H.shape[0]):
                self.H[gi] = _symmetrize(self.H[gi])
            self.sq = torch.diagonal(self.H, dim1=-2, dim2=-1).double().clone()
        self.nonfinite = not bool(torch.isfinite(self.sq).all())


# ------------------------------------------------------------------------------------------------
# the two layer-wise solvers (pure functions on reduction-view weights)
# ------------------------------------------------------------------------------------------------
def wanda_scores(weight_rv: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij| · ‖X_j‖₂`` for a reduction-view weight ``(R, K)`` and the summed squared
    input norms ``(K,)`` (float32)."""
    return weight_rv.detach().float().abs() * sq_norms.to(weight_rv.device).float().clamp_min(0).sqrt()


def _row_topk(score: torch.Tensor, keep_total: int) -> torch.Tensor:
    """Keep ``keep_total`` entries of a 2-D ``score``, compared per row: every row keeps ``keep_total //
    rows`` of its largest; the remainder goes to the rows whose next candidate scores highest. ``-inf``
    entries are never kept. Ties: lower index first."""
    R, K = score.shape
    base, extra = divmod(max(0, min(keep_total, R * K)), R)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(K, device=score.device).expand(R, K).contiguous())
    keep_n = torch.full((R, 1), base, dtype=torch.long, device=score.device)
    if extra and base < K:
        nxt = score.gather(1, order[:, base:base + 1]).reshape(-1)
        rows = torch.sort(nxt, descending=True, stable=True).indices[:extra]
        keep_n[rows] += 1
    return (ranks < keep_n) & (score > -math.inf)


def hessian_inverse_factor(H: torch.Tensor, damp: float = 0.01, *, where: str = "layer"
                           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT's preparation of a ``(K, K)`` Gram matrix ``H = Σ xᵀx`` (any positive scale): dead inputs
    (zero diagonal) get a unit diagonal, ``damp · mean(diag H)`` is added to the diagonal (raised ×10 up to
    three times, with a warning, while the Cholesky factorisation fails), and the upper Cholesky factor
    ``U`` of ``H⁻¹`` (``UᵀU = H⁻¹``) is returned with the bool dead-input mask and the damp used. ``U`` is
    computed as the inverse of the upper triangular ``R`` with ``H = RRᵀ`` (a Cholesky factorisation in
    reversed index order) — the factor the reference obtains as ``cholesky(cholesky_inverse(cholesky(H)),
    upper=True)``, with one Cholesky and one triangular solve instead of two Cholesky and an inverse."""
    H = H.detach().float().clone()
    K = H.shape[0]
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{where}: the calibration Hessian is not finite (NaN/Inf activations)")
    dead = torch.diagonal(H) == 0
    if bool(dead.any()):
        idx = torch.nonzero(dead).reshape(-1)
        H[idx, idx] = 1.0
    mean_diag = float(torch.diagonal(H).mean())
    d_used = float(damp)
    for attempt in range(4):
        try:
            Hd = H.clone()
            Hd.diagonal().add_(d_used * mean_diag)
            # H = R Rᵀ with R = J chol(J H J) J upper triangular (J reverses the order), so H⁻¹ = R⁻ᵀ R⁻¹ and
            # U = R⁻¹ is the upper Cholesky factor of H⁻¹: the reference's chol → cholesky_inverse → chol
            # result (to float rounding) from one Cholesky and one triangular solve (3-4x faster on CPU)
            Lr = torch.linalg.cholesky(Hd.flip(0, 1))
            del Hd
            Hinv = _triangular_inverse(Lr.flip(0, 1))
            del Lr
            if bool(torch.isfinite(Hinv).all()):
                return Hinv, dead, d_used
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            pass
        if attempt < 3:
            warnings.warn(f"{where}: the calibration Hessian is not positive definite with damp={d_used:g} "
                          f"(too few calibration rows for {K} inputs, or linearly dependent inputs); retrying "
                          f"with damp={d_used * 10:g}", SparsefastWarning, stacklevel=3)
            d_used *= 10
    raise ValueError(f"{where}: the calibration Hessian stays singular even with damp={d_used:g}; give more "
                     "calibration data or a larger damp=")


def _triangular_inverse(R: torch.Tensor) -> torch.Tensor:
    """``R⁻¹`` of an upper triangular ``R`` (a fresh tensor, overwritten). On CPU with SciPy: LAPACK
    ``strtri`` in place (K³/3 flops, on the transposed view: a lower triangle in column-major order);
    otherwise a triangular solve against the identity (K³ flops)."""
    if _strtri is not None and R.device.type == "cpu" and R.dtype == torch.float32 and R.is_contiguous():
        a = R.numpy().T
        out, info = _strtri(a, lower=1, overwrite_c=1)
        if info == 0:
            if out.ctypes.data != a.ctypes.data:  # not in place: copy back
                R.copy_(torch.from_numpy(out).T)
            return R
        # singular (cannot follow a successful Cholesky) or an argument problem: the torch path below
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def sparsegpt_prune(weight_rv: torch.Tensor, H: torch.Tensor | None, *, sparsity: float = 0.5, n: int = 0,
                    m: int = 0, blocksize: int = 128, damp: float = 0.01, fixed: torch.Tensor | None = None,
                    where: str = "layer", factor: tuple[torch.Tensor, torch.Tensor, float] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) for one weight.

    ``weight_rv``: ``(R, K)`` weight (reduction order); ``H``: the ``(K, K)`` Gram matrix ``Σ xᵀx`` of its
    inputs (any positive scale), prepared by :func:`hessian_inverse_factor` (or pass its result as
    ``factor`` and ``H=None``, to share it between layers reading the same input). Weights on dead inputs
    are zeroed. Columns are processed left to right in blocks of ``blocksize``: the mask of each block is
    chosen by ``w² / [H⁻¹]_jj²`` (unstructured: the ``round(sparsity · R · K)`` lowest of the layer,
    spread over the blocks in proportion; N:M (``n``, ``m`` > 0): the ``m − n`` lowest of each group of
    ``m`` columns in each row, chosen when the column sweep reaches the group), each column's pruning error
    is spread over the remaining columns of the block through the upper Cholesky factor of ``H⁻¹``, and
    the block's accumulated errors update the later columns in one matmul (lazy batch update). ``fixed``
    (bool ``(R, K)``): positions that must be pruned (already pruned weights never return). Returns
    ``(new weight, pruned mask, info)`` (float32, reduction view; info: ``damp`` used, ``dead`` inputs,
    ``error`` = the algorithm's loss estimate ``Σ (w − q)² / d² / 2``).
    """
    W = weight_rv.detach().float().clone()
    R, K = W.shape
    dev = W.device
    fixed = torch.zeros(R, K, dtype=torch.bool, device=dev) if fixed is None else fixed.to(dev)
    Hinv, dead, d_used = hessian_inverse_factor(H, damp, where=where) if factor is None else factor
    Hinv, dead = Hinv.to(dev), dead.to(dev)
    n_dead = int(dead.sum())
    if n_dead:
        W[:, dead] = 0.0
    nm = n > 0
    # column-major work layout: row j of WT is column j of W, so the per-column rank-1 updates and the
    # lazy block updates write contiguous rows (a strided column slice makes them ~25x slower on CPU)
    WT = W.t().contiguous()
    del W
    fixedT = fixed.t()
    losses = torch.zeros(R, dtype=torch.float32, device=dev)
    prunedT = torch.zeros(K, R, dtype=torch.bool, device=dev)
    total_prune = sparsity * R * K
    # the column sweep is thousands of small ops: on CPU they run single-threaded (intra-op threads cost
    # more than they give there, up to 10x on a loaded machine); the block matmuls keep every thread
    threads = torch.get_num_threads() if dev.type == "cpu" else 1
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        count = i2 - i1
        W1 = WT[i1:i2].clone()           # (count, R): the block's columns
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1).reshape(-1, 1)
        fixed1 = fixedT[i1:i2]
        if nm:
            mask1 = fixed1.clone()
        else:  # the block's k lowest w²/d² (ties: lower (row, column) index first, as in natural layout)
            k = int(round(total_prune * i2 / K)) - int(round(total_prune * i1 / K))
            tmp = W1.square() / d1.square()
            tmp = torch.where(fixed1, torch.full_like(tmp, -math.inf), tmp)
            mask1 = top_k_mask(-tmp.t().contiguous(), min(max(k, 0), tmp.numel())).t() | fixed1
        if threads > 1:
            torch.set_num_threads(1)
        try:
            for i in range(count):
                if nm and i % m == 0:  # the m − n lowest w²/d² of each output row in this m-group
                    tmp = W1[i:i + m].square() / d1[i:i + m].square()
                    tmp = torch.where(fixed1[i:i + m], torch.full_like(tmp, -math.inf), tmp)
                    low = torch.sort(tmp, dim=0, stable=True).indices[:m - n]
                    mask1[i:i + m].scatter_(0, low, True)
                w = W1[i]
                q = torch.where(mask1[i], torch.zeros_like(w), w)
                Q1[i] = q
                err = (w - q) / Hinv1[i, i]
                losses += err.square() * 0.5
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
                Err1[i] = err
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        WT[i1:i2] = Q1
        prunedT[i1:i2] = mask1
        if i2 < K:  # lazy batch update of all later columns
            WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
    W = WT.t().contiguous()
    pruned = prunedT.t().contiguous()
    W[pruned] = 0.0
    return W, pruned, {"damp": d_used, "dead": n_dead, "error": float(losses.sum())}


# ------------------------------------------------------------------------------------------------
# the shared engine
# ------------------------------------------------------------------------------------------------
class _Calibrated(Pruner):
    """Sequential layer-wise pruning from calibration activations (see the module docstring)."""

    default_distribution = "uniform"
    _hessian = False

    def __init__(self, model: nn.Module, *, filter_fn: Callable[[str, nn.Module], bool] | None = None,
                 **kw: Any) -> None:
        if filter_fn is None and isinstance(model, nn.Module):
            filter_fn = default_filter(model)
        self.layer_stats: dict[str, dict] = {}
        super().__init__(model, filter_fn=filter_fn, **kw)  # Conv1D layers: swapped by the Pruner base

    def _check_hparams(self) -> None:
        if self.distribution == "global":
            raise ValueError(f"{type(self).__name__} allocates sparsity within each layer (calibration scores of "
                             "different layers are not on one scale): use a layer-wise distribution such as "
                             "'uniform' (the default, as in the paper), not 'global'")

    # ---- per-layer rule (subclasses) --------------------------------------------------------------
    def _solve(self, name: str, layer: SparseModule, stats: _Stats, density: float | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """``(new mask, new dense weight or None, info)`` for one layer."""
        raise NotImplementedError

    # ---- protocol ------------------------------------------------------------------------------
    def _prune(self, batch: Any, loss_fn: Callable | None) -> None:
        method = type(self).__name__
        data = _calibration_set(method, batch)
        model = self.model
        device = self._layers[0][1].mask.device
        densities = None if self.pattern.density is not None else self._densities(self.target_sparsity)
        was_training = model.training
        undo: list[tuple[SparseModule, torch.Tensor, str, torch.Tensor]] = []
        handles: list = []
        stats_out: dict[str, dict] = {}
        try:
            model.eval()
            with torch.no_grad():
                groups, calls = self._plan(data, device, handles)
                for group in progress(groups, total=len(groups), desc=f"{method} layer groups",
                                      enable=self.progress):
                    t0 = time.perf_counter()
                    stats = self._collect(data, device, group, calls, handles)
                    t_collect = (time.perf_counter() - t0) / len(group)
                    for name, layer in group:
                        t1 = time.perf_counter()
                        st = stats[_signature(layer)]
                        if st.nonfinite:
                            raise ValueError(f"{method}.prune(): layer {name!r} received NaN or Inf calibration "
                                             "activations (or values whose squares overflow float32)")
                        if st.rows == 0:
                            raise ValueError(f"{method}.prune(): layer {name!r} received no calibration rows "
                                             "(empty batches?)")
                        mask, weight, info = self._solve(name, layer, st, None if densities is None
                                                         else densities[name])
                        undo.append((layer, layer.mask.detach().cpu().clone(), layer.pattern,
                                     layer.weight.detach().cpu().clone()))
                        self._set_layer_mask(layer, mask, self.pattern, weight)
                        stats_out[name] = {"rows": st.rows, "seconds": t_collect + time.perf_counter() - t1, **info}
                    del stats
        except BaseException:
            for layer, m, pat, vals in reversed(undo):
                dev = layer.mask.device
                mm = m.to(dev)
                layer.set_mask(mm, pat, weight=_kept.scatter(vals.to(dev), mm))
            raise
        finally:
            for h in handles:
                h.remove()
            handles.clear()
            model.train(was_training)
        self.layer_stats = stats_out

    def _plan(self, data: Any, device: torch.device, handles: list
              ) -> tuple[list[list[tuple[str, SparseModule]]], dict[str, int]]:
        """One forward of the first batch: the managed layers in first-call order, grouped when
        consecutive layers receive the same input tensor; the calls per layer per forward."""
        method = type(self).__name__
        order: list[tuple[str, SparseModule, bool]] = []  # (name, layer, same input as the previous one)
        calls: dict[str, int] = {}
        state = {"prev": None, "prev_name": None}  # input and name of the previous managed-layer call

        def hook_for(name: str, layer: SparseModule):
            def pre(mod, args):
                x = args[0] if args else None
                _check_input(method, name, layer, x)
                if name not in calls:
                    same = bool(order) and state["prev_name"] == order[-1][0] and state["prev"] is x
                    order.append((name, layer, same))
                calls[name] = calls.get(name, 0) + 1
                state["prev"], state["prev_name"] = x, name
            return pre

        for name, layer in self._layers:
            handles.append(layer.register_forward_pre_hook(hook_for(name, layer)))
        nb = 0
        for i, b in enumerate(data):
            _run(method, self.model, b, i, device)
            nb += 1
            break
        for h in handles:
            h.remove()
        handles.clear()
        state["prev"] = None
        if nb == 0:
            raise ValueError(f"{method}.prune(): the calibration set is empty (the iterable yielded no batch)")
        missing = [n for n in self._names if n not in calls]
        if missing:
            warnings.warn(f"{method}: layer(s) {missing} were not called in the forward of the calibration data; "
                          "they receive no calibration input and are left unpruned", SparsefastWarning,
                          stacklevel=4)
        groups: list[list[tuple[str, SparseModule]]] = []
        for name, layer, same in order:
            if same and groups and _signature(groups[-1][-1][1]) == _signature(layer):
                groups[-1].append((name, layer))
            else:
                groups.append([(name, layer)])
        return groups, calls

    def _collect(self, data: Any, device: torch.device, group: list[tuple[str, SparseModule]],
                 calls: dict[str, int], handles: list) -> dict[tuple, _Stats]:
        """Run the calibration set through the model (cut after the group) accumulating its inputs' stats."""
        method = type(self).__name__
        stats: dict[tuple, _Stats] = {}
        for _, layer in group:
            stats.setdefault(_signature(layer), _Stats(layer, self._hessian))
        seen: dict[str, int] = {}
        need = {n: calls[n] for n, _ in group}

        def hook_for(name: str, layer: SparseModule):
            st = stats[_signature(layer)]

            def pre(mod, args):
                x = args[0] if args else None
                _check_input(method, name, layer, x)
                if st.last is not x:
                    st.add(x)
                    st.last = x
                seen[name] = seen.get(name, 0) + 1
                if all(seen.get(n, 0) >= k for n, k in need.items()):
                    raise _Stop
            return pre

        for name, layer in group:
            handles.append(layer.register_forward_pre_hook(hook_for(name, layer)))
        try:
            nb = 0
            for i, b in enumerate(data):
                seen.clear()
                for st in stats.values():
                    st.last = None
                _run(method, self.model, b, i, device)
                nb += 1
            if nb == 0:
                raise ValueError(f"{method}.prune(): the calibration set is empty (the iterable yielded no batch)")
        finally:
            for st in stats.values():
                st.last = None
            for h in handles:
                h.remove()
            handles.clear()
        for st in stats.values():
            st.finish()
        return stats


def _fixed_rv(layer: SparseModule) -> torch.Tensor:
    return _masks.reduction_view(~layer.mask)


class Wanda(_Calibrated):
    """Wanda (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
    Models"): prune by ``|W_ij| · ‖X_j‖₂``, the weight magnitude times the L2 norm of its input feature
    over all calibration tokens, compared **per output row**: every row keeps ``round(d · K)`` of its
    highest-scoring weights (``d`` the layer's density; the rounding remainder of the layer goes to the
    rows whose next weight scores highest, so the layer density is exact). Kept weights are not changed.
    Layers run sequentially from calibration data (module docstring of
    :mod:`sparsefast.pruning.calibrated`).

    Args: ``sparsity`` (unstructured; implied by N:M), ``pattern`` (``"unstructured"``, ``"N:M"``: the
    top-n score of each m-group along the reduction dim; ``"block:B"``: the b x b blocks of largest summed
    score per layer), ``distribution`` (default ``"uniform"``; ``"global"`` refused), ``filter_fn``
    (default: :func:`default_filter`, output head dense), ``seed``/``backend``/``progress`` as for every
    pruner. Already pruned weights never return. Convolutions: ``‖X_j‖`` over the unfolded patches.
    """

    supports_block = True

    def _solve(self, name, layer, stats, density):
        ws = layer.weight_shape
        W = _masks.reduction_view(layer.dense_weight())
        R, K = W.shape
        g = stats.sq.shape[0]
        sq = stats.sq.repeat_interleave(R // g, dim=0)  # (R, K): each output row's group statistics
        score = W.float().abs() * sq.float().clamp_min(0).sqrt()
        fixed = _fixed_rv(layer)
        pat = self.pattern
        if pat.kept_per_group is not None:  # per-group rule (N:M: the top n of each m-group, ties to the lower index)
            keep = group_top_mask(score, pat)
        else:
            score = torch.where(fixed, torch.full_like(score, -math.inf), score)
            unit = self.unit
            if unit == (1, 1):
                keep = _row_topk(score, int(round(density * R * K)))
            else:
                us = unit_scores(_masks.from_reduction_view(score, ws), unit)
                k = max(1, int(round(density * us.numel())))
                keep = _masks.reduction_view(expand_units(top_k_mask(us, k), unit, ws))
                keep &= ~fixed
        return _masks.from_reduction_view(keep, ws).to(layer.mask.device), None, {}


class SparseGPT(_Calibrated):
    """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot"): layer-wise OBS reconstruction. For every layer, from the Hessian ``H ∝ XᵀX`` of its
    calibration inputs (``Σ xᵀx`` accumulated in row chunks; the paper's ``2XᵀX/n`` up to a scale the
    algorithm does not depend on), :func:`sparsegpt_prune` chooses the mask block by block
    (``blocksize`` columns; score ``w² / [H⁻¹]_jj²``) and updates the **kept** weights so that the layer's
    output on the calibration data changes least; ``damp`` (fraction of the mean Hessian diagonal added to
    it, default 0.01) regularises the inverse. Dead inputs (never non-zero in the calibration data) are
    damped and their weights pruned first, with a warning naming the layer. Layers run sequentially
    (module docstring of :mod:`sparsefast.pruning.calibrated`), each from the outputs of the already
    pruned and updated layers before it.

    Args: ``sparsity``, ``pattern`` (``"unstructured"`` or ``"N:M"``; ``blocksize`` must be a multiple of
    m), ``blocksize`` (128), ``damp`` (0.01), ``distribution`` (default ``"uniform"``; ``"global"``
    refused), ``filter_fn`` (default :func:`default_filter`), ``seed``/``backend``/``progress``. Already
    pruned weights stay pruned. ``block:B`` is refused. Convolutions: the Hessian of the unfolded patches
    (one per group of a grouped convolution). Memory: one K x K float32 Hessian per layer group (shared by
    layers that read the same input) and its inverse factor, plus a float32 copy of the layer's weight.
    CPU: the Hessian uses BLAS ``syrk`` (SciPy, when installed: half a matmul's flops; the inverse factor
    LAPACK ``strtri``) and the column sweep
    runs single-threaded (its thousands of small ops lose to threading overhead); see
    ``benchmarks/sparsegpt_time.py`` for the time of a 4096 x 4096 layer.
    """

    supports_block = ("SparseGPT removes single weights column by column with an OBS update of the rest; "
                      "whole-block removal is a different update (use Wanda or Magnitude for block:B)")
    _hessian = True

    def __init__(self, model: nn.Module, *, blocksize: int = 128, damp: float = 0.01, **kw: Any) -> None:
        self.blocksize = _check_int("blocksize", blocksize, 1)
        self.damp = _check_number("damp", damp, 0.0, math.inf)
        super().__init__(model, **kw)

    def _check_hparams(self) -> None:
        super()._check_hparams()
        pat = self.pattern
        if pat.kept_per_group is not None and pat.group_shape[0] != 1:
            raise ValueError(f"SparseGPT does not support pattern {pat}: its groups span {pat.group_shape[0]} rows of "
                             "the reduction view; SparseGPT removes single weights column by column with an OBS "
                             "update of the rest, and its per-group rule keeps n of every m consecutive weights "
                             "of one row (groups of shape (1, m), as N:M)")
        if pat.kept_per_group is not None and self.blocksize % pat.group_shape[1]:
            raise ValueError(f"SparseGPT: blocksize={self.blocksize} must be a multiple of m={pat.group_shape[1]} "
                             f"(pattern {self.pattern}) so that no m-group straddles two blocks")

    def _solve(self, name, layer, stats, density):
        ws = layer.weight_shape
        W = _masks.reduction_view(layer.dense_weight())
        R, K = W.shape
        fixed = _fixed_rv(layer)
        g = stats.H.shape[0]
        rg = R // g
        pat = self.pattern
        # the solver's per-group rule: keep n of every m consecutive weights of a row (groups are one row:
        # _check_hparams refuses others); n = m = 0 for an allocated pattern (per-block sparsity)
        per_group = pat.kept_per_group is not None
        n, m = (int(pat.kept_per_group), int(pat.group_shape[1])) if per_group else (0, 0)
        new = torch.empty(R, K, dtype=torch.float32, device=W.device)
        pruned = torch.empty(R, K, dtype=torch.bool, device=W.device)
        info = {"damp": self.damp, "dead": 0, "error": 0.0}
        cache = stats.factors  # H⁻¹ factors shared by the layers reading this input
        for gi in range(g):
            H = stats.H[gi]
            dead = int((torch.diagonal(H) == 0).sum())
            where = f"SparseGPT: layer {name!r}" + (f" (group {gi})" if g > 1 else "")
            if dead:
                warnings.warn(f"{where}: {dead} of {K} inputs are never non-zero in the calibration data (singular "
                              "Hessian): they get a unit Hessian diagonal plus damping, and their weights are "
                              "set to zero and pruned first", SparsefastWarning, stacklevel=5)
            rows = slice(gi * rg, (gi + 1) * rg)
            if gi not in cache:
                cache[gi] = hessian_inverse_factor(H, self.damp, where=where)
            w, p, inf = sparsegpt_prune(W[rows], None, sparsity=0.0 if per_group else 1.0 - density, n=n, m=m,
                                        blocksize=self.blocksize, damp=self.damp, fixed=fixed[rows], where=where,
                                        factor=cache[gi])
            new[rows], pruned[rows] = w, p
            info = {"damp": max(info["damp"], inf["damp"]), "dead": info["dead"] + inf["dead"],
                    "error": info["error"] + inf["error"]}
        mask = _masks.from_reduction_view(~pruned, ws).to(layer.mask.device)
        weight = _masks.from_reduction_view(new, ws).to(layer.mask.device, layer.weight.dtype)
        return mask, weight, info

    def _extra_state(self) -> dict:
        return {"blocksize": self.blocksize, "damp": self.damp}
