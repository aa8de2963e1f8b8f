"""End-to-end: one training step (forward + backward + SGD-momentum step) of a ViT-style MLP block and
of a ResNet-style bottleneck conv block — dense vs sparsefast 2:4 vs sparsefast 90 % unstructured
(``backend="auto"``) — with the step time and the peak memory of the step.

Peak memory = the high-water mark during the step above the memory in use just before it (model,
optimizer state and inputs are already allocated): on GPU ``torch.cuda.max_memory_allocated()``
after ``reset_peak_memory_stats()``; on CPU the process's peak resident set (``VmHWM`` from
``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``), minus ``VmRSS`` before, with
glibc told to serve allocations >= 64 KiB by mmap during that step (so freed memory is not reused
invisibly); neither tracemalloc (blind to torch's allocator) nor ``resource`` (monotonic) can do that.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import sparsefast
from sparsefast.cli import bench as H

from .conftest import DEVICE, E2E

GPU = DEVICE == "cuda"
# GPU: ViT-L MLP (d=1024, 4d hidden) on 8192 tokens; ResNet-50 conv2_x bottleneck at batch 64.
# CPU: small versions that run in seconds on 2 cores.
MLP = dict(d=1024, tokens=8192) if GPU else dict(d=256, tokens=256)
CONV = dict(batch=64, hw=56) if GPU else dict(batch=4, hw=28)
DTYPE = torch.bfloat16 if GPU else torch.float32


class MLPBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Bottleneck(nn.Module):
    def __init__(self, c: int = 256, mid: int = 64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(x + self.bn3(self.conv3(y)))


def _build(block: str):
    torch.manual_seed(0)
    if block == "vit-mlp":
        m = MLPBlock(MLP["d"])
        x = torch.randn(MLP["tokens"], MLP["d"])
    else:
        m = Bottleneck()
        x = torch.randn(CONV["batch"], 256, CONV["hw"], CONV["hw"])
    m, x = m.to(DEVICE, DTYPE), x.to(DEVICE, DTYPE)
    if block == "resnet-bottleneck" and GPU:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return m, x


def _rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def _glibc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _peak_mb(step) -> tuple[float | None, str]:
    if GPU:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda max_memory_allocated above resident"
    libc = _glibc()
    try:
        # glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so RSS
        # would not show memory reused from the warm-up step: for the measured step, serve every
        # allocation >= 64 KiB by mmap (returned on free) and trim the heap first.
        if libc is not None:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS")
        step()
        return (_rss_kb("VmHWM") - base) / 1024, "peak RSS (VmHWM) above RSS before the step"
    except OSError:
        import resource
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "ru_maxrss growth (lower bound)"
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 * 1024 * 1024)


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["dense", "2:4", "90%"])
@pytest.mark.parametrize("block", ["vit-mlp", "resnet-bottleneck"])
def test_train_step(block, variant, benchmark, budget):
    model, x = _build(block)
    if variant != "dense":
        kw = dict(pattern="2:4") if variant == "2:4" else dict(pattern="unstructured", sparsity=0.9)
        sparsefast.sparsify(model, **kw)
        # correctness first: the sparse block equals the masked-dense block on fresh inputs
        ref = sparsefast.densify(copy.deepcopy(model))
        with torch.no_grad():
            got, want = model(x), ref(x)
        tol = 3e-2 if DTYPE != torch.float32 else 1e-4
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        assert err < tol, f"{block} {variant}: relative error {err:.3g} vs masked dense"
        del ref
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        out = model(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up; allocates the optimizer state
    layers = [m for m in model.modules() if isinstance(m, (sparsefast.SparseLinear, sparsefast.SparseConv2d))]
    backend = ",".join(sorted({m.backend for m in layers})) if layers else "torch"
    peak, metric = _peak_mb(step)
    benchmark.group = f"e2e-{block}"
    if benchmark.disabled:
        benchmark(step)
        E2E.append(dict(block=block, variant=variant, backend=backend, step_s=None, peak_mb=peak, mem_metric=metric))
        return
    if GPU:
        t = H.time_call(step, "cuda", budget)
        benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=3, iterations=1)
    else:
        _, rounds, iters = H.cpu_plan(step, budget)
        benchmark.pedantic(step, rounds=rounds, iterations=iters, warmup_rounds=1)
        t = benchmark.stats.stats.median
    E2E.append(dict(block=block, variant=variant, backend=backend, step_s=t, peak_mb=peak, mem_metric=metric))
