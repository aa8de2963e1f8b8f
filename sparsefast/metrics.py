"""Metrics on (sparse) models.

:func:`psp_entropy` — PSP-entropy (Tartaglione et al. 2020): how class-specific each neuron's
activation state is.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["psp_entropy"]

_CLAMP = (1e-4, 0.9999)


def _is_layer(m: nn.Module) -> bool:
    from .nn.layers import SparseModule, _is_conv1d
    return isinstance(m, (SparseModule, nn.Linear, nn.Conv2d)) or _is_conv1d(m)


@torch.no_grad()
def psp_entropy(model: nn.Module, loader: Iterable, *, layers: list[str] | None = None,
                reduction: str = "none") -> dict[str, torch.Tensor]:
    """PSP-entropy of every neuron of every Linear / Conv2d (plain or sparse) layer (and every Hugging Face
    ``transformers`` ``Conv1D``, GPT-2's Linear-like layers, whose output is ``(..., out_features)`` as a Linear's).

    For each neuron (each output element of the layer: a feature of a Linear, a ``(channel, h, w)``
    element of a Conv2d) and class ``c``: ``p_c = P[z > 0 | c]`` over the samples of ``loader`` (``z`` the
    pre-activation, i.e. the layer output), clamped to ``[1e-4, 0.9999]``;
    ``H(z) = Σ_c −p_c log₂ p_c − (1 − p_c) log₂(1 − p_c)`` over the classes present in the data.
    Lower = more class-specific.

    Args:
        model: run in eval mode under ``no_grad`` (its mode is restored).
        loader: iterable of ``(x, y)`` batches, ``y`` integer class labels ``(B,)``.
        layers: names of the layers to measure (default: every Linear/Conv2d/Conv1D/sparse layer).
        reduction: ``"none"`` (default) returns per-neuron tensors shaped like one sample's layer output
            (``(out_features,)`` or ``(C, H, W)``); ``"mean"`` returns the mean over neurons (0-d).

    Returns ``{layer name: float32 tensor}`` on the CPU. Raises ``ValueError`` for a model without such
    layers, unknown layer names, an empty loader or batches without labels.

    Reference: EIDOSlab/PSP-entropy ``src/PSPentropy.py:18-63`` (``compute_PSPentropy``, order 1): the
    same per-neuron values (checked in ``tests/pruning/test_fidelity_b.py``). Departures
    (``docs/methods.md``): classes absent from the data are left out (theirs sums over ``classes``
    declared classes, and an absent one gives 0/0 = NaN); the model is measured in eval mode (theirs
    keeps the mode it finds, so dropout / batch-norm in training mode change the result); the layers are
    the Linear / Conv2d / sparse layers anywhere in the model (theirs hooks every *top-level* module:
    a ReLU right after a layer gives that layer's values, relu(z) > 0 iff z > 0); ``1 − p`` is clamped
    as ``p`` (theirs counts ``z ≤ 0`` separately: the same up to float rounding).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"psp_entropy expects an nn.Module, got {type(model).__name__}")
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    mods = dict(model.named_modules())
    if layers is None:
        names = [n for n, m in mods.items() if _is_layer(m)]
    else:
        unknown = [n for n in layers if n not in mods]
        if unknown:
            raise ValueError(f"psp_entropy: no module named {unknown}")
        names = list(layers)
    if not names:
        raise ValueError(f"psp_entropy: {type(model).__name__} has no Linear / Conv2d layers")

    pos: dict[str, torch.Tensor] = {}      # (num_classes, *neuron shape) counts of z > 0
    count: torch.Tensor | None = None      # samples per class
    shapes: dict[str, tuple[int, ...]] = {}
    current: dict[str, Any] = {}

    def make_hook(n: str):
        def hook(mod, inputs, out):
            current[n] = out.detach()
        return hook

    handles = [mods[n].register_forward_hook(make_hook(n)) for n in names]
    was = model.training
    model.eval()
    seen = 0
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("psp_entropy: the loader must yield (x, y) batches with class labels")
            x, y = batch[0], batch[1]
            y = torch.as_tensor(y).long().reshape(-1).cpu()
            current.clear()
            model(x)
            k = int(y.max()) + 1 if y.numel() else 0
            if count is None or k > count.shape[0]:
                grow = k - (0 if count is None else count.shape[0])
                count = torch.zeros(k, dtype=torch.float64) if count is None else torch.cat(
                    [count, torch.zeros(grow, dtype=torch.float64)])
                for n in list(pos):
                    pos[n] = torch.cat([pos[n], torch.zeros((grow, *pos[n].shape[1:]), dtype=torch.float64)])
            count.index_add_(0, y, torch.ones(y.numel(), dtype=torch.float64))
            for n in names:
                z = current.get(n)
                if z is None:
                    continue
                act = (z > 0).reshape(z.shape[0], -1).to(torch.float64).cpu()
                if n not in pos:
                    pos[n] = torch.zeros((count.shape[0], act.shape[1]), dtype=torch.float64)
                    shapes[n] = tuple(z.shape[1:])
                pos[n].index_add_(0, y, act)
            seen += y.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if seen == 0 or count is None:
        raise ValueError("psp_entropy: the loader yielded no samples")
    present = count > 0
    out: dict[str, torch.Tensor] = {}
    for n in names:
        if n not in pos:
            continue
        shape = shapes[n]
        p = (pos[n][present] / count[present].unsqueeze(1)).clamp(*_CLAMP)
        h = (-p * torch.log2(p) - (1 - p) * torch.log2(1 - p)).sum(dim=0).float()
        h = h.reshape(shape)
        out[n] = h.mean() if reduction == "mean" else h
    return out
