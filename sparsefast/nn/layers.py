"""``SparseLinear`` and ``SparseConv2d``: masked-dense semantics, any backend.

A layer holds a dense-shaped ``weight`` Parameter (exactly zero at pruned positions), an optional
``bias`` and a bool ``mask`` buffer. Forward/backward go through :mod:`sparsefast.ops` on the backend
chosen per call (``auto``) or fixed at construction. Pruned weights never receive gradient (the
weight-gradient primitive writes zeros there) and an optimizer post-step hook re-applies the mask, so
they stay exactly zero even after a mask change left optimizer state (momentum) behind.
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
from ..backends.base import masked
from ..ops import sparse_conv2d, sparse_linear

__all__ = ["SparseLinear", "SparseConv2d", "SparseModule"]


# Pruned weights stay exactly zero: after every optimizer step, re-apply the masks of the sparse
# layers whose weights that optimizer updated (cheap: one multiply per layer per step).
_WEIGHT_OWNERS: "weakref.WeakValueDictionary[int, SparseModule]" = weakref.WeakValueDictionary()
_LAYERS: "weakref.WeakValueDictionary[int, SparseModule]" = weakref.WeakValueDictionary()


@torch._dynamo.assume_constant_result
def _layer_backend_static(layer_id: int, device_type: str, dtype_name: str) -> str:
    """The layer's backend for ``torch.compile`` tracing: evaluated eagerly, once, at trace time."""
    layer = _LAYERS[layer_id]
    dtype = _bk._effective_dtype(device_type, getattr(torch, dtype_name.replace("torch.", "")))
    q = _bk.OpQuery(layer._op, torch.device(device_type), dtype, tuple(layer.weight.shape), layer._pattern,
                    None, layer.density, layer._conv_params())
    return _bk.resolve(layer.requested_backend, q)


def _reapply_masks(optimizer, args, kwargs) -> None:
    if not _WEIGHT_OWNERS:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                layer = _WEIGHT_OWNERS.get(id(p))
                if layer is not None and layer.weight is p and not layer._all_kept():
                    masked(p, layer.mask, inplace=True)


_optim.register_optimizer_step_post_hook(_reapply_masks)


class SparseModule(nn.Module):
    """Shared behaviour of the sparse layers (mask handling, backend choice, state dict)."""

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

    def _register_owner(self) -> None:
        _WEIGHT_OWNERS[id(self.weight)] = self
        _LAYERS[id(self)] = self

    def __setstate__(self, state):  # pickling / deepcopy: re-register the new weight
        super().__setstate__(state)
        self._register_owner()

    def _name(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def _initial_mask(self, sparsity: float | None, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            return self._validated(mask)
        if sparsity is not None:
            _masks.check_sparsity(sparsity)
        elif not self._pattern.is_nm:
            raise ValueError(f"{self._name()}: an unstructured pattern needs sparsity= (or mask= with from_dense)")
        self._check_divisible()
        return _masks.magnitude_mask(self.weight.detach(), self._pattern, sparsity)

    def _check_divisible(self) -> None:
        if self._pattern.is_nm:
            k = _masks.reduction_view(self.weight).shape[1]
            if self._op == "conv" and self.weight.shape[1] % self._pattern.m:
                raise ValueError(f"{self._name()}: pattern {self.pattern} groups {self._pattern.m} consecutive input "
                                 f"channels per kernel position, but in_channels/groups={self.weight.shape[1]} "
                                 f"is not divisible by {self._pattern.m}")
            if k % self._pattern.m:
                raise ValueError(f"{self._name()}: reduction dim {k} is not divisible by m={self._pattern.m} "
                                 f"(pattern {self.pattern}, weight {tuple(self.weight.shape)})")

    def _validated(self, mask: torch.Tensor) -> torch.Tensor:
        if isinstance(mask, torch.Tensor) and mask.device != self.weight.device and mask.device.type != "meta":
            mask = mask.to(self.weight.device)
        self._check_divisible()
        return _masks.validate_mask(mask, self.weight, self._pattern, where=self._name())

    # ---- public API -----------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (validated first: on error the layer is unchanged). Pruned weights are
        zeroed; the backend's packed format is rebuilt on the next call."""
        m = self._validated(mask)
        with torch.no_grad():
            self.mask.copy_(m)
            masked(self.weight, self.mask, inplace=True)
        self._density_cache = None

    @property
    def density(self) -> float:
        """Fraction of kept weights (cached until the mask changes)."""
        c = self._density_cache
        v = self.mask._version
        if c is None or c[0] != v:
            c = (v, _masks.density(self.mask))
            self._density_cache = c
        return c[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def _all_kept(self) -> bool:
        return self.density >= 1.0

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight ``weight * mask`` (detached copy)."""
        return masked(self.weight.detach(), self.mask)

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
        return _bk.make_query(self._op, x, self.weight, self._pattern, self._conv_params(), self.density)

    def _conv_params(self):
        return None

    # ---- state dict -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey, mkey = prefix + "weight", prefix + "mask"
        if wkey in state_dict:
            w = state_dict[wkey]
            if tuple(w.shape) != tuple(self.weight.shape):
                error_msgs.append(f"{self._name()}: weight shape {tuple(w.shape)} in the checkpoint differs "
                                  f"from {tuple(self.weight.shape)}")
                return
            if mkey in state_dict:
                m = state_dict[mkey]
                where = f"{self._name()} loading {mkey}"
            else:  # a plain nn.Linear / nn.Conv2d dict: the mask comes from the nonzeros
                m = w != 0
                where = f"{self._name()} loading a dense state dict (mask from the nonzeros of {wkey})"
            try:
                m = _masks.validate_mask(m.to(self.weight.device), self.weight, self._pattern, where=where)
            except (ValueError, TypeError) as e:
                error_msgs.append(str(e))
                return  # nothing touched
            state_dict[mkey] = m
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        with torch.no_grad():
            masked(self.weight, self.mask, inplace=True)
        self._density_cache = None

    def _resolve(self, x: torch.Tensor) -> str:
        if torch.compiler.is_compiling():
            return _layer_backend_static(id(self), x.device.type, str(x.dtype))
        name = _bk.resolve(self.requested_backend, self._op_query(x))
        self._used_backend = name
        return name

    def _density_arg(self) -> float | None:
        return None if torch.compiler.is_compiling() else self.density


class SparseLinear(SparseModule):
    """Drop-in ``nn.Linear`` with a sparse weight.

    x ``(*, in_features)`` -> ``(*, out_features)``. ``pattern`` is ``"unstructured"`` (then ``sparsity``
    is required) or ``"N:M"`` (sparsity implied, ``1 - n/m``; ``in_features % m == 0``).
    """

    _op = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float | None = None,
                 pattern: str = "unstructured", backend: str = "auto", device=None, dtype=None,
                 _mask: torch.Tensor | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"SparseLinear needs positive in/out features, got ({in_features}, {out_features})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **fk)) if bias else None)
        self._setup_sparse(pattern, backend)
        self.reset_parameters()
        self.register_buffer("mask", self._initial_mask(sparsity, _mask))
        with torch.no_grad():
            masked(self.weight, self.mask, inplace=True)
        self._register_owner()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        if hasattr(self, "mask"):
            with torch.no_grad():
                masked(self.weight, self.mask, inplace=True)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, sparsity: float | None = None, pattern: str = "unstructured",
                   mask: torch.Tensor | None = None, backend: str = "auto") -> "SparseLinear":
        """A SparseLinear with ``linear``'s weights (copied). Without ``mask`` keeps the largest |w|."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls.__new__(cls)
        SparseModule.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
        layer.register_parameter("bias", nn.Parameter(linear.bias.detach().clone(),
                                                      requires_grad=linear.bias.requires_grad)
                                 if linear.bias is not None else None)
        layer._setup_sparse(pattern, backend)
        layer.register_buffer("mask", layer._initial_mask(sparsity, mask))
        with torch.no_grad():
            masked(layer.weight, layer.mask, inplace=True)
        layer.train(linear.training)
        layer._register_owner()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight, self.mask, self.bias, backend=self._resolve(x),
                             pattern=self.pattern, density=self._density_arg())

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the masked weights."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(masked(self.weight.detach(), self.mask))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        d = f", density={self.density:.3g}" if hasattr(self, "mask") else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={self.pattern}{d}, backend={self.requested_backend}")


class SparseConv2d(SparseModule):
    """Drop-in ``nn.Conv2d`` with a sparse weight (NCHW in and out; kernels may work NHWC inside).

    For N:M the reduction order is ``(kh, kw, c)`` with input channels fastest, so
    ``in_channels/groups`` must be divisible by m (see :mod:`sparsefast.masks`).
    """

    _op = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, sparsity: float | None = None,
                 pattern: str = "unstructured", backend: str = "auto", device=None, dtype=None,
                 _mask: torch.Tensor | None = None, _weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"SparseConv2d: in_channels={in_channels} and out_channels={out_channels} must be "
                             f"divisible by groups={groups}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"SparseConv2d: unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"SparseConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("SparseConv2d: padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        self.padding_mode = padding_mode
        fk = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **fk) if _weight is None else _weight)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels, **fk)) if bias else None)
        self._setup_sparse(pattern, backend)
        if _weight is None:
            self.reset_parameters()
        self.register_buffer("mask", self._initial_mask(sparsity, _mask))
        with torch.no_grad():
            masked(self.weight, self.mask, inplace=True)
        self._register_owner()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        if hasattr(self, "mask"):
            with torch.no_grad():
                masked(self.weight, self.mask, inplace=True)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, sparsity: float | None = None, pattern: str = "unstructured",
                   mask: torch.Tensor | None = None, backend: str = "auto") -> "SparseConv2d":
        """A SparseConv2d with ``conv``'s weights (copied). Without ``mask`` keeps the largest |w|."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, sparsity=sparsity,
                    pattern=pattern, backend=backend, _mask=mask, _weight=conv.weight.detach().clone(),
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
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
        return sparse_conv2d(x, self.weight, self.mask, self.bias, self.stride, padding, self.dilation,
                             self.groups, backend=self._resolve(x), pattern=self.pattern, density=self._density_arg())

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the masked weights."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(masked(self.weight.detach(), self.mask))
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
