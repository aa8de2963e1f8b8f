"""``SparseLinear`` and ``SparseConv2d``: masked-dense semantics, kept-values storage, any backend.

**What a layer stores.** Only its kept weights: ``layer.weight`` is a 1-D Parameter of ``nnz`` values in
canonical order (the row-major order of the kept positions in the weight's reduction view — plain
row-major for Linear, ``(O, kh, kw, C/groups)`` for conv; :mod:`sparsefast.formats.kept`), plus the bool
``mask`` buffer (weight-shaped) and the optional ``bias``. An optimizer therefore sees, updates and keeps
state for the kept values only; the backward produces the values' gradient directly (kept-sized), and
kernel backends read the values as they are (no re-pack per step).

What keeps its meaning: ``weight_shape`` (the dense shape), ``dense_weight()`` (the masked dense tensor),
``set_dense_weight(w)`` (take the kept values from a dense tensor), ``state_dict()`` (a dense-shaped
``weight`` with zeros at pruned positions, ``bias``, ``mask``; loads those dicts and plain
``nn.Linear``/``nn.Conv2d`` dicts), ``to_dense()``, ``freeze()`` / ``layer.weight.requires_grad_(False)``.
A ``SparseLinear`` made from a Hugging Face ``transformers`` ``Conv1D`` (GPT-2: weight stored
``(in_features, out_features)``, ``y = x @ W + b``) holds its weight as ``(out, in)`` like any other, but keeps
``Conv1D``'s ``(in, out)`` layout for ``weight`` and ``mask`` in its state dict (loads only that layout) and
``to_dense()`` gives back a ``Conv1D``.
Weight-decay grouping by name (``name.endswith("weight")``) keeps working; grouping by ``p.ndim >= 2`` would
put the 1-D values with biases — use :func:`sparsefast.nn.param_groups` (see the docs).

**Mask changes** (``set_mask``, pruners, ``load_state_dict``): validated first (a failing call changes
nothing), then the values move to the new mask's order — positions kept before and after keep their value,
newly kept ones start at zero — and so does the optimizer state of every ``torch.optim`` optimizer that
has stepped this Parameter (state tensors shaped like the values; new positions start at zero state).
The Parameter object stays the same (its ``.data`` is replaced when ``nnz`` changes), so optimizers,
``clip_grad_norm_`` and schedulers keep working without being told.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.optim.optimizer as _optim
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .. import backends as _bk
from .. import masks as _masks
from ..formats import kept as _kept
from ..ops import _autocast, _run_linear, sparse_conv2d_kept, sparse_linear_kept

__all__ = ["SparseLinear", "SparseConv2d", "SparseModule", "param_groups"]


_LAYERS: "weakref.WeakValueDictionary[int, SparseModule]" = weakref.WeakValueDictionary()
#: optimizers that have stepped (their state may hold kept-sized tensors to move on a mask change)
_OPTIMIZERS: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def _is_conv1d(m: Any) -> bool:
    """A Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 style: ``weight`` stored ``(in_features,
    out_features)``, ``y = x @ W + b``), recognised without importing transformers: the class name, the
    ``nf`` (out_features) attribute and a 2-D weight whose second dimension is ``nf``."""
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == m.nf)


def _track_optimizer(optimizer, args, kwargs) -> None:
    _OPTIMIZERS.add(optimizer)


_optim.register_optimizer_step_pre_hook(_track_optimizer)


@torch._dynamo.assume_constant_result
def _layer_backend_static(layer_id: int, device_type: str, dtype_name: str) -> str:
    """The layer's backend for ``torch.compile`` tracing: evaluated eagerly, once, at trace time."""
    layer = _LAYERS[layer_id]
    dtype = _bk._effective_dtype(device_type, getattr(torch, dtype_name.replace("torch.", "")))
    q = _bk.OpQuery(layer._op, torch.device(device_type), dtype, tuple(layer.mask.shape), layer._pattern,
                    None, layer.density, layer._conv_params())
    return _bk.resolve(layer.requested_backend, q)


def param_groups(model: nn.Module, weight_decay: float, **no_decay_options: Any) -> list[dict]:
    """Two optimizer parameter groups, the usual habit made safe for kept-values layers: weights (every
    ``p.ndim >= 2`` tensor and every sparse layer's 1-D kept ``weight``) get ``weight_decay``; biases and
    other 1-D parameters (norms) get 0. ``no_decay_options`` go into the second group.
    ``torch.optim.AdamW(sparsefast.nn.param_groups(model, 0.05), lr=1e-3)``."""
    kept = {id(m.weight) for m in model.modules() if isinstance(m, SparseModule)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 or id(p) in kept else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0,
                                                             **no_decay_options}]


def _resize_param(p: nn.Parameter, values: torch.Tensor) -> None:
    """``p.data = values`` where the length changes. Autograd caches a leaf's gradient accumulator with
    the leaf's old shape while any graph that used it is alive, and ``.data =`` only drops that cache on
    a dtype/device change: so swap in an empty tensor of another dtype first (drops it), then the values.
    Otherwise the next backward fails ("invalid gradient ... expected [old nnz]") whenever the user
    still holds the previous step's graph (``loss`` from the last iteration)."""
    other = torch.float64 if values.dtype != torch.float64 else torch.float32
    p.data = torch.empty(0, dtype=other, device=values.device)
    p.data = values


class SparseModule(nn.Module):
    """Shared behaviour of the sparse layers (kept-values storage, mask handling, backend choice, state dict)."""

    weight: nn.Parameter
    mask: torch.Tensor
    _op: str = "?"

    def _setup_sparse(self, pattern: str, backend: str) -> None:
        self._pattern = _masks.parse_pattern(pattern)
        self.pattern = str(self._pattern)
        if backend == "auto":
            backend = _bk.default()
        self.requested_backend = _bk.check_requested(backend)
        self._density_cache: tuple[int, float] | None = None
        self._used_backend: str | None = None

    def _init_storage(self, dense: torch.Tensor, mask: torch.Tensor, requires_grad: bool = True,
                      param: nn.Parameter | None = None) -> None:
        """Mask buffer + kept-values Parameter from a dense weight. ``param``: reuse this Parameter object
        (its data becomes the kept values), so optimizers built on it keep training it."""
        self.register_buffer("mask", mask)
        if mask.device.type == "meta":
            values = torch.empty(int(dense.numel()), dtype=dense.dtype, device=dense.device)
        else:
            values = _kept.gather(dense.detach(), mask).clone()
        if param is not None:
            with torch.no_grad():
                param.data = values
            param.requires_grad_(requires_grad)
            self.weight = param
        else:
            self.weight = nn.Parameter(values, requires_grad=requires_grad)
        _LAYERS[id(self)] = self

    def __setstate__(self, state):  # pickling / deepcopy
        super().__setstate__(state)
        _LAYERS[id(self)] = self

    def _name(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense weight's shape: ``(out, in)`` or ``(O, C/groups, kh, kw)``."""
        return tuple(self.mask.shape)

    def _initial_mask(self, dense: torch.Tensor, sparsity: float | None, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            return self._validated(mask, dense)
        if sparsity is not None:
            _masks.check_sparsity(sparsity)
        elif self._pattern.density is None:
            raise ValueError(f"{self._name()}: pattern {self.pattern} needs sparsity= (or mask= with from_dense)")
        self._check_divisible(tuple(dense.shape))
        return _masks.magnitude_mask(dense.detach(), self._pattern, sparsity)

    def _check_divisible(self, shape: tuple, pattern: "_masks.Pattern | None" = None) -> None:
        pat = self._pattern if pattern is None else pattern
        why = pat.fits(tuple(shape), self._op)
        if why is not None:
            raise ValueError(f"{self._name()}: {why}")

    def _validated(self, mask: torch.Tensor, like: torch.Tensor | None = None,
                   pattern: "_masks.Pattern | None" = None, where: str | None = None) -> torch.Tensor:
        like = self.mask if like is None else like
        if isinstance(mask, torch.Tensor) and mask.device != like.device and mask.device.type != "meta":
            mask = mask.to(like.device)
        pat = self._pattern if pattern is None else pattern
        self._check_divisible(tuple(like.shape), pat)
        return _masks.validate_mask(mask, like, pat, where=where or self._name())

    # ---- public API -----------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor, pattern: str | None = None, *, weight: torch.Tensor | None = None,
                 reset: torch.Tensor | None = None) -> None:
        """Replace the mask — and the pattern with it when ``pattern`` is given. Validated first: on error
        the layer (values, mask, pattern, optimizer state) is unchanged. Positions kept before and after
        keep their value and optimizer state; newly kept ones start at zero (or, with ``weight``, a dense
        weight-shaped tensor, take their values from it — every kept position does). ``reset`` (bool,
        weight-shaped): positions that restart at zero value and zero state although they were kept (a
        weight dropped and regrown in the same DST update)."""
        pat = self._pattern if pattern is None else _masks.parse_pattern(pattern)
        m = self._validated(mask, pattern=pat)
        if weight is not None and tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{self._name()}: set_mask(weight=...) has shape {tuple(weight.shape)}, expected "
                             f"{self.weight_shape}")
        if reset is not None:
            reset = self._validated(reset, pattern=_masks.Unstructured(), where=f"{self._name()} set_mask(reset=...)")
        if m.device.type == "meta" or m.untyped_storage().data_ptr() == self.mask.untyped_storage().data_ptr():
            m = m.clone()  # the new mask is (a view of) the layer's own: the remap needs the old one intact
        self._commit_mask(m, pat, None if weight is None else _kept.gather(
            weight.detach().to(self.weight.dtype), m).clone(), reset)

    def _commit_mask(self, m: torch.Tensor, pat, new_values: torch.Tensor | None,
                     reset: torch.Tensor | None = None) -> None:
        """Move values, gradient and optimizer state to the validated mask ``m`` and install it. Everything
        that can fail (shapes, allocations) is computed before the first change."""
        p = self.weight
        old_nnz = p.shape[0]
        had_index = _kept.cached_index(m) is not None  # (another layer's mask, say: it keeps its index)
        src, keep = _kept.remap(self.mask, m, reset)
        with torch.no_grad():
            values = _kept.remap_tensor(p.detach(), src, keep) if new_values is None else new_values
            grad = None if p.grad is None else _kept.remap_tensor(p.grad, src, keep)
            states = []
            for opt in list(_OPTIMIZERS):
                st = opt.state.get(p) if hasattr(opt, "state") else None
                if not st:
                    continue
                moved = {k: _kept.remap_tensor(v, src, keep) for k, v in st.items()
                         if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == old_nnz}
                states.append((st, moved))
            # commit (no more failures expected)
            self.mask.copy_(m)
            _kept.share_index(m, self.mask)  # the remap computed m's index: not again on the next forward
            if not had_index:  # the caller's tensor is not copied: the index the remap cached on it goes
                _kept.release(m)
            if values.shape[0] == old_nnz:
                p.copy_(values)
            else:
                _resize_param(p, values)
            if p.grad is not None:
                p.grad = grad
            for st, moved in states:
                st.update(moved)
        self._pattern, self.pattern = pat, str(pat)
        self._density_cache = None

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Set the kept values from a dense weight-shaped tensor (its pruned positions are ignored)."""
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{self._name()}: set_dense_weight needs a tensor of shape {self.weight_shape}, got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        with torch.no_grad():
            self.weight.copy_(_kept.gather(weight.detach().to(self.weight.device, self.weight.dtype), self.mask))

    @property
    def density(self) -> float:
        """Fraction of kept weights (cached until the mask changes)."""
        c = self._density_cache
        v = self.mask._version
        if c is None or c[0] != v:
            c = (v, self.weight.shape[0] / max(self.mask.numel(), 1))
            self._density_cache = c
        return c[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def _all_kept(self) -> bool:
        return self.density >= 1.0

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (weight-shaped, zeros at pruned positions; a detached copy)."""
        return _kept.scatter(self.weight.detach(), self.mask)

    def dense_grad(self) -> torch.Tensor | None:
        """The weight gradient as a dense weight-shaped tensor (zeros at pruned positions), or None."""
        g = self.weight.grad
        return None if g is None else _kept.scatter(g.detach(), self.mask)

    def freeze(self) -> "SparseModule":
        """Freeze the weight: backward computes only the input (and trainable bias) gradient."""
        self.weight.requires_grad_(False)
        return self

    def unfreeze(self) -> "SparseModule":
        self.weight.requires_grad_(True)
        return self

    @property
    def backend(self) -> str:
        """The backend actually used: by the last forward, or the one ``auto`` picks for the weight's
        device and dtype if the layer has not run yet."""
        if self._used_backend is not None:
            return self._used_backend
        return _bk.resolve(self.requested_backend, self._op_query(None))

    def _op_query(self, x: torch.Tensor | None):
        return _bk.make_query(self._op, x, self.mask, self._pattern, self._conv_params(), self.density,
                              dtype=self.weight.dtype)

    def _conv_params(self):
        return None

    # ---- state dict: a dense-shaped weight, as a plain layer's --------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, mask, any extra params/buffers
        w = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "weight"] = _kept.scatter(w, self.mask) if self.mask.device.type != "meta" \
            else torch.empty(self.weight_shape, dtype=w.dtype, device="meta")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey, bkey, mkey = prefix + "weight", prefix + "bias", prefix + "mask"
        if wkey not in state_dict and mkey not in state_dict:
            missing_keys.append(wkey)
        if self.bias is not None and bkey not in state_dict:
            missing_keys.append(bkey)
        if self.bias is None and bkey in state_dict:
            unexpected_keys.append(bkey)
        err = self._staged_load(state_dict, wkey, bkey, mkey)
        if isinstance(err, str):
            error_msgs.append(err)
            return
        # everything else (extra parameters/buffers a method registered, e.g. EdgePopup's scores) the
        # default way: hide the three entries handled here from nn.Module's loader
        ours = {wkey, bkey, mkey}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        params, buffers = self._parameters, self._buffers
        self._parameters = {k: v for k, v in params.items() if k not in ("weight", "bias")}
        self._buffers = {k: v for k, v in buffers.items() if k != "mask"}
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters, self._buffers = params, buffers
        err()

    def _staged_load(self, sd, wkey, bkey, mkey):
        """Validate a state dict's entries for this layer; returns an error string, or a function that
        applies them (nothing is changed before every check passed)."""
        w = sd.get(wkey)
        if w is not None and (not isinstance(w, torch.Tensor) or tuple(w.shape) != self.weight_shape):
            return (f"{self._name()}: weight shape {tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__} "
                    f"in the checkpoint differs from {self.weight_shape}")
        if w is not None and not w.is_floating_point():
            return f"{self._name()}: weight in the checkpoint has dtype {w.dtype}, expected a floating dtype"
        b = sd.get(bkey) if self.bias is not None else None
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != tuple(self.bias.shape)):
            return (f"{self._name()}: bias shape {tuple(b.shape) if isinstance(b, torch.Tensor) else '?'} in the "
                    f"checkpoint differs from {tuple(self.bias.shape)}")
        m = None
        if mkey in sd:
            m, where = sd[mkey], f"{self._name()} loading {mkey}"
        elif w is not None:  # a plain nn.Linear / nn.Conv2d dict: the mask comes from the nonzeros
            m, where = w != 0, f"{self._name()} loading a dense state dict (mask from the nonzeros of {wkey})"
        if m is not None:
            try:
                if isinstance(m, torch.Tensor):
                    m = m.to(self.mask.device)
                m = _masks.validate_mask(m, self.mask, self._pattern, where=where)
            except (ValueError, TypeError) as e:
                return str(e)
        values = None
        if w is not None:
            values = _kept.gather(w.detach().to(self.mask.device, self.weight.dtype), m).clone()

        def commit():
            if m is not None:
                self._commit_mask(m.clone(), self._pattern, values)
            elif values is not None:
                with torch.no_grad():
                    self.weight.copy_(values)
            if b is not None:
                with torch.no_grad():
                    self.bias.copy_(b)
        return commit

    def _check_input(self, x) -> None:
        """Clear errors naming the layer before any backend is asked (0-D input, dtype mismatch)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._name()}: input must be a torch.Tensor, got {type(x).__name__}")
        want = 3 if self._op == "conv" else 1
        if x.dim() < want:
            raise ValueError(f"{self._name()}: input must have at least {want} dimension(s), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{self._name()}: input must be floating point, got {x.dtype}")
        if (x.dtype != self.weight.dtype and not _bk._autocast_on(x.device.type)):
            raise TypeError(f"{self._name()}: input dtype {x.dtype} does not match the layer's dtype "
                            f"{self.weight.dtype}; convert one (x.to({self.weight.dtype}) or layer.to({x.dtype}))")
        if x.device != self.weight.device:
            raise ValueError(f"{self._name()}: input is on {x.device} but the layer is on {self.weight.device}; "
                             f"move one (x.to({str(self.weight.device)!r}) or layer.to({str(x.device)!r}))")
        self._check_shape(x)

    def _check_shape(self, x: torch.Tensor) -> None:
        """Op-specific input and parameter shape rules (subclasses)."""

    def _resolve(self, x: torch.Tensor) -> str:
        if not torch.compiler.is_compiling():
            self._check_input(x)
        if torch.compiler.is_compiling():
            return _layer_backend_static(id(self), x.device.type, str(x.dtype))
        name = _bk.resolve(self.requested_backend, self._op_query(x))
        self._used_backend = name
        return name

    def _ran(self, name: str, y: torch.Tensor) -> torch.Tensor:
        """After a forward on ``name``: a backend whose kernels keep their own formats (built during the
        call, from the kept index where one was cached) lets the nnz-sized index go."""
        if not torch.compiler.is_compiling() and not _bk.get(name).uses_kept_index:
            _kept.release(self.mask)
        return y

    def _density_arg(self) -> float | None:
        return None if torch.compiler.is_compiling() else self.density


class SparseLinear(SparseModule):
    """Drop-in ``nn.Linear`` with a sparse weight stored as its kept values (``weight``: 1-D, see the
    module docstring; ``weight_shape == (out_features, in_features)``).

    x ``(*, in_features)`` -> ``(*, out_features)``. ``pattern`` is ``"unstructured"`` (then ``sparsity``
    is required) or ``"N:M"`` (sparsity implied, ``1 - n/m``; ``in_features % m == 0``).
    """

    _op = "linear"
    #: the ``transformers`` ``Conv1D`` class this layer was made from (``from_dense(conv1d)``), else None:
    #: then the state dict keeps Conv1D's ``(in, out)`` layout and ``to_dense()`` returns that class
    _conv1d: type | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float | None = None,
                 pattern: str = "unstructured", backend: str = "auto", device=None, dtype=None,
                 _mask: torch.Tensor | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"SparseLinear needs positive in/out features, got ({in_features}, {out_features})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        fk = {"device": device, "dtype": dtype}
        self._setup_sparse(pattern, backend)
        dense = torch.empty(out_features, in_features, **fk)
        self._init_dense(dense)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **fk)) if bias else None)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_storage(dense, self._initial_mask(dense, sparsity, _mask))

    @staticmethod
    def _init_dense(dense: torch.Tensor) -> None:
        if dense.device.type != "meta":
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))

    def reset_parameters(self) -> None:
        dense = torch.empty(self.weight_shape, dtype=self.weight.dtype, device=self.weight.device)
        self._init_dense(dense)
        self.set_dense_weight(dense)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, sparsity: float | None = None, pattern: str = "unstructured",
                   mask: torch.Tensor | None = None, backend: str = "auto", _adopt: bool = False) -> "SparseLinear":
        """A SparseLinear with ``linear``'s weights (copied). Without ``mask`` keeps the largest |w|.
        (``_adopt``, used by :func:`sparsefast.sparsify`: take over ``linear``'s Parameter objects, so an
        optimizer built on the dense model keeps training the sparse one.) ``linear`` may also be a
        ``transformers`` ``Conv1D``: its weight is used transposed (``mask``, if given, is ``(out, in)``),
        and the layer remembers it (state-dict layout, ``to_dense()``; module docstring)."""
        conv1d = _is_conv1d(linear)
        if not isinstance(linear, nn.Linear) and not conv1d:
            raise TypeError(f"from_dense expects an nn.Linear (or a transformers Conv1D), got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls.__new__(cls)
        SparseModule.__init__(layer)
        if conv1d:
            w = w.t()
            layer._conv1d = type(linear)
            layer.in_features, layer.out_features = int(w.shape[1]), int(w.shape[0])
        else:
            layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer._setup_sparse(pattern, backend)
        if linear.bias is None:
            layer.register_parameter("bias", None)
        elif _adopt:
            layer.bias = linear.bias
        else:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        m = layer._initial_mask(w, sparsity, mask)
        layer._init_storage(w, m, linear.weight.requires_grad, linear.weight if _adopt else None)
        layer.train(linear.training)
        return layer

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self._name()}: input of shape {tuple(x.shape)} has {x.shape[-1]} features in its last "
                             f"dimension; the layer takes in_features={self.in_features}")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(f"{self._name()}: bias of shape {tuple(self.bias.shape)}; the layer needs "
                             f"({self.out_features},)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._resolve(x)
        if torch.compiler.is_compiling():
            return sparse_linear_kept(x, self.weight, self.mask, self.bias, backend=name, pattern=self.pattern,
                                      density=None)
        # eager: _resolve checked x against this layer (naming it) and chose the backend for the call as
        # it will run (autocast included); the layer's own tensors are consistent by construction, so
        # the call runs without sparse_linear_kept's second round of checks and resolution (~10-20 us)
        x, values, bias = _autocast(x, self.weight, self.bias, device_type=x.device.type)
        return self._ran(name, _run_linear(x, values, self.mask, bias, name, self.pattern))

    def to_dense(self) -> nn.Module:
        """A plain ``nn.Linear`` holding the masked weights (a ``Conv1D`` for a layer made from one)."""
        if self._conv1d is not None:
            with torch.device(self.weight.device):
                conv = self._conv1d(self.out_features, self.in_features)
            conv.to(self.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(self.dense_weight().t())
                if self.bias is not None:
                    conv.bias.copy_(self.bias)
                else:
                    conv.bias.zero_()
            conv.weight.requires_grad_(self.weight.requires_grad)
            conv.train(self.training)
            return conv
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        lin.train(self.training)
        return lin

    # ---- a Conv1D-made layer: Conv1D's (in, out) layout in the state dict ---------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._conv1d is not None:
            for k in (prefix + "weight", prefix + "mask"):
                destination[k] = destination[k].t().contiguous()

    def _staged_load(self, sd, wkey, bkey, mkey):
        if self._conv1d is None:
            return super()._staged_load(sd, wkey, bkey, mkey)
        want = (self.in_features, self.out_features)
        view = {k: sd[k] for k in (wkey, bkey, mkey) if k in sd}
        for k in (wkey, mkey):
            t = view.get(k)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                hint = (" (that is nn.Linear's (out_features, in_features) layout: transpose it, or load it into "
                        "the densify()'d model)") if got == self.weight_shape else ""
                return (f"{self._name()}: {k} shape {got} in the checkpoint differs from {want}: this layer was made "
                        f"from a transformers Conv1D and its state dict keeps Conv1D's (in_features, out_features) "
                        f"layout{hint}")
            view[k] = t.t()
        return super()._staged_load(view, wkey, bkey, mkey)

    def extra_repr(self) -> str:
        d = f", density={self.density:.3g}" if hasattr(self, "mask") else ""
        c = ", layout=Conv1D" if self._conv1d is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={self.pattern}{d}, backend={self.requested_backend}{c}")


class SparseConv2d(SparseModule):
    """Drop-in ``nn.Conv2d`` with a sparse weight stored as its kept values (``weight``: 1-D, canonical
    order ``(O, kh, kw, C/groups)``; ``weight_shape == (O, C/groups, kh, kw)``). NCHW in and out.

    For N:M the reduction order is ``(kh, kw, c)`` with input channels fastest, so
    ``in_channels/groups`` must be divisible by m (see :mod:`sparsefast.masks`).
    """

    _op = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, sparsity: float | None = None,
                 pattern: str = "unstructured", backend: str = "auto", device=None, dtype=None,
                 _mask: torch.Tensor | None = None, _weight: torch.Tensor | None = None,
                 _param: nn.Parameter | None = None) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"SparseConv2d: in_channels={in_channels} and out_channels={out_channels} must be "
                             f"divisible by groups={groups}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"SparseConv2d: unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        for what, v, lo in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                            ("dilation", self.dilation, 1)):
            if any(not isinstance(i, int) or i < lo for i in v):
                raise ValueError(f"SparseConv2d: {what} must be positive integers, got {v}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"SparseConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("SparseConv2d: padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding)
            if any(not isinstance(i, int) or i < 0 for i in self.padding):
                raise ValueError(f"SparseConv2d: padding must be non-negative integers, got {self.padding}")
        self.padding_mode = padding_mode
        fk = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._setup_sparse(pattern, backend)
        dense = torch.empty(shape, **fk) if _weight is None else _weight
        if _weight is None:
            SparseLinear._init_dense(dense)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels, **fk)) if bias else None)
        if self.bias is not None and _weight is None:
            self._init_bias()
        self._init_storage(dense, self._initial_mask(dense, sparsity, _mask), True, _param)

    def _init_bias(self) -> None:
        fan_in = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3] if hasattr(self, "mask") else \
            (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)

    def reset_parameters(self) -> None:
        dense = torch.empty(self.weight_shape, dtype=self.weight.dtype, device=self.weight.device)
        SparseLinear._init_dense(dense)
        self.set_dense_weight(dense)
        if self.bias is not None:
            self._init_bias()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, sparsity: float | None = None, pattern: str = "unstructured",
                   mask: torch.Tensor | None = None, backend: str = "auto", _adopt: bool = False) -> "SparseConv2d":
        """A SparseConv2d with ``conv``'s weights (copied). Without ``mask`` keeps the largest |w|.
        (``_adopt``: take over ``conv``'s Parameter objects, see :meth:`SparseLinear.from_dense`.)"""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, sparsity=sparsity,
                    pattern=pattern, backend=backend, _mask=mask, _weight=conv.weight.detach(),
                    device=conv.weight.device, dtype=conv.weight.dtype, _param=conv.weight if _adopt else None)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            if _adopt:
                layer.bias = conv.bias
            else:
                with torch.no_grad():
                    layer.bias.copy_(conv.bias)
                layer.bias.requires_grad_(conv.bias.requires_grad)
        layer.train(conv.training)
        return layer

    def _conv_params(self):
        pad = (0, 0) if isinstance(self.padding, str) else self.padding
        return _bk.ConvParams(self.stride, pad, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            if isinstance(padding, str):
                raise ValueError("SparseConv2d: string padding with a non-zero padding_mode is not supported")
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        name = self._resolve(x)
        return self._ran(name, sparse_conv2d_kept(x, self.weight, self.mask, self.bias, self.stride, padding,
                                                  self.dilation, self.groups, backend=name, pattern=self.pattern,
                                                  density=self._density_arg()))

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the masked weights."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.weight.requires_grad)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        d = f", density={self.density:.3g}" if hasattr(self, "mask") else ""
        return s + f", pattern={self.pattern}{d}, backend={self.requested_backend}"
