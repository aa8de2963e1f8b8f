"""Shared helpers for the tests: random masks per pattern and reference computations in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefast import masks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2),
       torch.bfloat16: (8e-2, 3e-2)}


def random_mask(shape, pattern: str, *, seed: int = 0, empty_rows: bool = True) -> tuple[torch.Tensor, str]:
    """A mask for ``pattern`` ("N:M" or "unstructured:<density>"); returns (mask, pattern string)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=g)
    if pattern.startswith("unstructured"):
        d = float(pattern.split(":")[1]) if ":" in pattern else 0.5
        m = torch.rand(shape, generator=g) < d
        if empty_rows and shape[0] > 2:
            m[0] = False  # an empty row
            m[1] = True   # an all-kept row
        return m, "unstructured"
    n, mm = map(int, pattern.split(":"))
    rv = masks.reduction_view(scores)
    return masks.from_reduction_view(masks.nm_mask(rv, n, mm), shape), pattern


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def ref_linear(x, w, m, b, dy):
    """Float64 masked-dense forward and grads."""
    x, w, b, dy = (t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, dy))
    y = F.linear(x, w * m, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad * m, (b.grad if b is not None else None)


def ref_conv(x, w, m, b, dy, stride, padding, dilation, groups):
    x, w, b, dy = (t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, dy))
    y = F.conv2d(x, w * m, b, stride, padding, dilation, groups)
    y.backward(dy)
    return y.detach(), x.grad, w.grad * m, (b.grad if b is not None else None)


def mlp(seed: int = 0, hidden: int = 24) -> nn.Module:
    """The pruning tests' small classifier, 12 -> hidden -> 16 -> 4, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded batches of 16 (x: 12 features, y: 4 classes) for :func:`mlp`."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


class LMLogits(nn.Module):
    """A Hugging Face causal LM as ``ids -> logits`` for ONNX export. The explicit attention mask matters:
    without one transformers 5 builds the causal mask with ``aten::diff``, which the TorchScript ONNX
    exporter (opset 17) cannot export (a dense model fails the same way)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
