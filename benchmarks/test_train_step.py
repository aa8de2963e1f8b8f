"""End-to-end training step as users time it: forward + backward + ``optimizer.step()`` + ``zero_grad()``,
with SGD (momentum 0.9) and AdamW, on three blocks:

- ``mlp-M{16,64,256}``: ``Linear(1024, 4096) -> GELU -> Linear(4096, 1024)`` on M tokens;
- ``conv``: ResNet-style ``3x3 conv 128->128 (pad 1) -> ReLU -> 3x3 conv 128->128`` at 28x28, batch 8;
- ``transformer``: pre-LN block, d=256, 4 heads (own qkv / out Linear layers around
  ``F.scaled_dot_product_attention``), MLP 4d with GELU, 128 tokens x batch 4.

Variants, all built from the same dense initialisation and timed in ONE process with rounds interleaved
(round r runs every variant once): dense fp32, dense bf16 (the baseline is the faster of the two and is
named), sparsefast 90 % unstructured, sparsefast 2:4, sparsefast block:16 at 90 % (``backend="auto"``;
layers whose shape does not fit 16x16 blocks stay dense, with sparsify's warning), sparseprop 90 % (CPU fp32,
Linear/Conv2d masked to 90 % by magnitude then ``sparseprop.modules.*.from_dense``; skipped with the reason
when it cannot run or does not match the masked dense layer). Sparse variants run in fp32 on CPU and bf16 on GPU.

Before timing, every sparsefast variant is checked (a wrong result fails the test): each sparse layer's
forward equals ``F.linear/F.conv2d`` with ``layer.dense_weight()``; one training step gives a finite loss
equal to the masked-dense model's; after the step the weights equal the masked-dense model's after the same
optimizer step with the gradient masked, and the model still matches its masked-dense form.

``--benchmark-disable`` (CI): tiny shapes, correctness only, nothing timed. Otherwise ``--sf-train-rounds``
(default 7, at least 5) timed rounds after 2 warm-up steps per variant; a cell is the median with min–max.
AdamW cases also record memory (see ``train_table.MEM_NOTE``). Rows go to ``conftest.TRAIN`` and from
there to results.json / RESULTS.md (``append_results.py``).
"""
from __future__ import annotations

import copy
import gc
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefast

from .conftest import DEVICE, TRAIN
from .test_e2e import _glibc, _rss_kb

GPU = DEVICE == "cuda"
SPARSE_DTYPE = torch.bfloat16 if GPU else torch.float32
SF_TYPES = (sparsefast.SparseLinear, sparsefast.SparseConv2d)

FULL_SHAPES = {
    "mlp-M16": dict(kind="mlp", d=1024, h=4096, M=16),
    "mlp-M64": dict(kind="mlp", d=1024, h=4096, M=64),
    "mlp-M256": dict(kind="mlp", d=1024, h=4096, M=256),
    "conv": dict(kind="conv", C=128, hw=28, B=8),
    "transformer": dict(kind="tf", d=256, heads=4, T=128, B=4),
}
# CI: same structure, tiny (sparseprop's conv needs batch 8 and >= 16 channels to be right)
TINY_SHAPES = {
    "mlp-M16": dict(kind="mlp", d=64, h=256, M=8),
    "mlp-M64": dict(kind="mlp", d=64, h=256, M=16),
    "mlp-M256": dict(kind="mlp", d=64, h=256, M=32),
    "conv": dict(kind="conv", C=16, hw=8, B=8),
    "transformer": dict(kind="tf", d=64, heads=4, T=16, B=2),
}
VARIANTS = ["dense fp32", "dense bf16", "sparsefast 90%", "sparsefast 2:4", "sparsefast block:16 90%", "sparseprop 90%"]
LR = 1e-3


class TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.out(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _base(cfg: dict) -> tuple[nn.Module, torch.Tensor]:
    """The dense fp32 block (seeded) and its input."""
    torch.manual_seed(0)
    if cfg["kind"] == "mlp":
        m = nn.Sequential(nn.Linear(cfg["d"], cfg["h"]), nn.GELU(), nn.Linear(cfg["h"], cfg["d"]))
        x = torch.randn(cfg["M"], cfg["d"])
    elif cfg["kind"] == "conv":
        c = cfg["C"]
        m = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False))
        x = torch.randn(cfg["B"], c, cfg["hw"], cfg["hw"])
    else:
        m = TransformerBlock(cfg["d"], cfg["heads"])
        x = torch.randn(cfg["B"], cfg["T"], cfg["d"])
    return m.to(DEVICE), x.to(DEVICE)


def _magnitude_mask_(m: nn.Module, sparsity: float) -> None:
    """Zero all but the largest-magnitude (1 - sparsity) of each Linear/Conv2d weight, in place."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                w = mod.weight
                k = max(1, int(round(w.numel() * (1 - sparsity))))
                thr = w.abs().flatten().kthvalue(w.numel() - k + 1).values
                w.mul_((w.abs() >= thr).to(w.dtype))


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def build(variant: str, cfg: dict) -> tuple[nn.Module, torch.Tensor]:
    """(model, input) of one variant; RuntimeError (or ImportError) when it cannot be built here."""
    m, x = _base(cfg)
    if variant == "dense fp32":
        return m, x
    if variant == "dense bf16":
        return m.to(torch.bfloat16), x.to(torch.bfloat16)
    if variant.startswith("sparsefast"):
        m, x = m.to(SPARSE_DTYPE), x.to(SPARSE_DTYPE)
        if variant.endswith("2:4"):
            kw = dict(pattern="2:4")
        elif "block:" in variant:
            kw = dict(pattern=variant.split()[1], sparsity=0.9)
        else:
            kw = dict(pattern="unstructured", sparsity=0.9)
        return sparsefast.sparsify(m, **kw), x
    if variant.startswith("sparseprop"):
        if GPU:
            raise RuntimeError("sparseprop is CPU only")
        from sparseprop.modules import SparseConv2d as SPConv
        from sparseprop.modules import SparseLinear as SPLinear
        _magnitude_mask_(m, 0.9)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, nn.Linear):
                _set_child(m, name, SPLinear.from_dense(mod))
            elif isinstance(mod, nn.Conv2d):
                if mod.stride[0] not in (1, 2) or mod.stride[0] != mod.stride[1] or mod.padding[0] != mod.padding[1]:
                    raise RuntimeError("sparseprop conv: square stride 1 or 2 and square padding only")
                _set_child(m, name, SPConv.from_dense(mod))
        return m, x
    raise ValueError(variant)


def make_opt(opt: str, params) -> torch.optim.Optimizer:
    if opt == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    return torch.optim.AdamW(params, lr=LR)


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().square().mean()


def make_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer):
    def step():
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _sync():
    if GPU:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------
def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _masked_dense_twin(model: nn.Module, cfg: dict) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A dense copy of ``model`` whose sparse layers hold ``layer.dense_weight()``, and their masks."""
    ref, _ = _base(cfg)
    ref = ref.to(SPARSE_DTYPE)
    ref.load_state_dict({k: v for k, v in model.state_dict().items()
                         if k in ref.state_dict() and v.shape == ref.state_dict()[k].shape}, strict=False)
    masks = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, SF_TYPES):
                dw = mod.dense_weight()
                ref.get_submodule(name).weight.copy_(dw)
                masks[name] = mod.mask.to(dw.dtype)
    return ref, masks


def check_sparsefast(variant: str, model: nn.Module, x: torch.Tensor, cfg: dict, opt_name: str,
                     opt: torch.optim.Optimizer) -> None:
    """Assert the sparsefast model equals its masked-dense twin: per-layer forward, one training step
    (loss, kept-value gradients, weight update), and the model forward after the step. Does the model's
    first training step with ``opt``."""
    tol = 3e-2 if SPARSE_DTYPE != torch.float32 else 1e-4
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SF_TYPES)]
    assert layers, f"{variant}: sparsify made no sparse layer"
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, mod in layers:
            if isinstance(mod, sparsefast.SparseLinear):
                xi = torch.randn(8, mod.in_features, generator=g).to(DEVICE, SPARSE_DTYPE)
                want = F.linear(xi, mod.dense_weight(), mod.bias)
            else:
                xi = torch.randn(2, mod.in_channels, 9, 9, generator=g).to(DEVICE, SPARSE_DTYPE)
                want = F.conv2d(xi, mod.dense_weight(), mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
            err = _rel(mod(xi), want)
            assert err < tol, f"{variant} {name}: forward differs from the masked dense weight (rel err {err:.3g})"
    ref, masks = _masked_dense_twin(model, cfg)
    before = {name: mod.dense_weight().float() for name, mod in layers}
    ref_opt = make_opt(opt_name, ref.parameters())
    ref_loss = loss_of(ref, x)
    ref_loss.backward()
    with torch.no_grad():
        for name, mk in masks.items():
            ref.get_submodule(name).weight.grad.mul_(mk)
    ref_opt.step()
    loss_t = loss_of(model, x)  # the model's first training step
    loss_t.backward()
    loss, ref_loss = float(loss_t.detach()), float(ref_loss.detach())
    assert math.isfinite(loss), f"{variant}: loss after one step is {loss}"
    assert abs(loss - ref_loss) <= tol * abs(ref_loss) + 1e-12, f"{variant}: loss {loss:.6g} vs masked dense {ref_loss:.6g}"
    gtol = 5e-3 if SPARSE_DTYPE == torch.float32 else 5e-2  # dW sums B*H*W products (6272 for the conv)
    # errors relative to the largest gradient entry of any sparse layer: a layer whose true gradient is
    # ~0 (e.g. a 90 %-block-sparse qkv whose kept block feeds only q, so attention is uniform) would
    # otherwise compare float noise with float noise
    scale = max(float(ref.get_submodule(n).weight.grad.abs().max()) for n, _ in layers)
    degenerate = set()  # layers whose true gradient is float noise: their AdamW update is noise too
    for name, mod in layers:
        g = mod.dense_grad()
        assert g is not None, f"{variant} {name}: no weight gradient"
        rg = ref.get_submodule(name).weight.grad
        if float(rg.abs().max()) < 1e-3 * scale:
            degenerate.add(name)
        err = float((g.float() - rg.float()).abs().max()) / max(float(rg.abs().max()), 1e-3 * scale, 1e-30)
        assert err <= gtol, f"{variant} {name}: kept-value gradient differs from masked dense (rel err {err:.3g})"
    opt.step()
    opt.zero_grad(set_to_none=True)
    # the weight update equals the masked-dense one, relative to the largest update, plus the rounding of
    # the weights themselves (an SGD update can be below it); AdamW's lr * m / (sqrt(v) + eps) amplifies
    # the rounding of tiny gradients, hence its looser bound
    utol = max(tol, 1e-2 if opt_name == "adamw" else 1e-3)
    eps = torch.finfo(SPARSE_DTYPE).eps
    for name, mod in layers:
        if name in degenerate and opt_name == "adamw":
            continue
        want = ref.get_submodule(name).weight.detach().float() - before[name]
        got = mod.dense_weight().float() - before[name]
        diff = float((got - want).abs().max())
        bound = utol * float(want.abs().max()) + 4 * eps * float(before[name].abs().max())
        assert diff <= bound, (f"{variant} {name}: {opt_name} weight update differs from masked dense "
                               f"(max abs diff {diff:.3g} > {bound:.3g})")
    with torch.no_grad():
        ref2, _ = _masked_dense_twin(model, cfg)
        err = _rel(model(x), ref2(x))
    assert err < tol, f"{variant}: forward after one step differs from the masked dense model (rel err {err:.3g})"


def check_sparseprop(model: nn.Module, x: torch.Tensor, cfg: dict) -> str | None:
    """None if the sparseprop model matches the 90 %-magnitude-masked dense model, else the reason."""
    ref, _ = _base(cfg)
    _magnitude_mask_(ref, 0.9)
    with torch.no_grad():
        err = _rel(model(x), ref(x))
    return None if err < 1e-4 else f"sparseprop output differs from the masked dense block (rel err {err:.3g})"


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def _state_mb(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for st in opt.state.values():
        for v in st.values():
            add(v)
    return total / 2**20


def _second_step(model, x, opt) -> float:
    """A training step that returns the state MB while the gradients exist (before zero_grad)."""
    loss_of(model, x).backward()
    opt.step()
    state = _state_mb(model, opt)
    opt.zero_grad(set_to_none=True)
    return state


def measure_memory_fresh(variant: str, block: str, opt_name: str, tiny: bool = False) -> tuple[float | None, float]:
    """``measure_memory`` in a fresh Python process: after other work the allocator's heap holds free
    chunks that big allocations reuse and never give back within a step, which inflates a peak RSS taken
    in this process (seen: 90 % sparse variants at 1.0x dense in-process, 0.23x in a fresh one)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # a tiny run first loads and initialises what any first step would (threads, kernels), so it is not counted
    code = ("import json, sys; from benchmarks.test_train_step import measure_memory, FULL_SHAPES, TINY_SHAPES; "
            f"measure_memory({variant!r}, TINY_SHAPES[{block!r}], {opt_name!r}); "
            f"print('MEM ' + json.dumps(measure_memory({variant!r}, "
            f"({'TINY_SHAPES' if tiny else 'FULL_SHAPES'})[{block!r}], {opt_name!r})))")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("MEM ")]
    if p.returncode or not lines:
        raise RuntimeError(f"memory subprocess failed: {(p.stderr or p.stdout).strip()[-300:]}")
    peak, state = json.loads(lines[-1][4:])
    return peak, state


def measure_memory(variant: str, cfg: dict, opt_name: str) -> tuple[float | None, float]:
    """(peak MB of two training steps above the memory before the build, state MB) of a fresh model, in
    this process (use ``measure_memory_fresh``)."""
    gc.collect()
    if GPU:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        model, x = build(variant, cfg)
        opt = make_opt(opt_name, model.parameters())
        step = make_step(model, x, opt)
        torch.cuda.reset_peak_memory_stats()
        step()
        state = _second_step(model, x, opt)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        libc = _glibc()
        try:
            if libc is not None:
                libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks come from (and go back to) mmap
                libc.malloc_trim(0)
            base = _rss_kb("VmRSS")
            model, x = build(variant, cfg)
            opt = make_opt(opt_name, model.parameters())
            step = make_step(model, x, opt)
            gc.collect()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := current RSS (the built model), so construction spikes do not count
                step()
                state = _second_step(model, x, opt)
                peak = (_rss_kb("VmHWM") - base) / 1024
            except OSError:
                step()
                state, peak = _second_step(model, x, opt), None
        finally:
            if libc is not None:
                libc.mallopt(-3, 32 * 1024 * 1024)
    del model, x, opt, step
    gc.collect()
    return peak, state


# ------------------------------------------------------------------------------------------------
# the test
# ------------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("block", list(FULL_SHAPES))
def test_train_step(block, opt_name, request):
    timed = not request.config.getoption("benchmark_disable", default=False)
    cfg = (FULL_SHAPES if timed else TINY_SHAPES)[block]
    n_rounds = request.config.getoption("--sf-train-rounds")
    assert n_rounds >= 5, "--sf-train-rounds must be >= 5"
    rows: dict[str, dict] = {}
    live: dict[str, tuple] = {}
    for v in VARIANTS:
        row = rows[v] = dict(block=block, opt=opt_name, variant=v, backend="torch", status="checked",
                             samples_s=None, peak_mb=None, state_mb=None, reason="", note="")
        if v.startswith("sparseprop"):
            row["backend"] = "sparseprop"
        try:
            model, x = build(v, cfg)
        except (ImportError, RuntimeError, NotImplementedError, ValueError) as e:
            row.update(status="skip", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            print(f"train_step {block}/{opt_name}: skip {v}: {row['reason']}")
            continue
        opt = make_opt(opt_name, model.parameters())
        step = make_step(model, x, opt)
        if v.startswith("sparsefast"):
            check_sparsefast(v, model, x, cfg, opt_name, opt)  # fails the test on a wrong result
            layers = [m for m in model.modules() if isinstance(m, SF_TYPES)]
            row["backend"] = ",".join(sorted({m.backend for m in layers}))
        else:
            if v.startswith("sparseprop"):
                why = check_sparseprop(model, x, cfg)
                if why:
                    row.update(status="skip", reason=why)
                    print(f"train_step {block}/{opt_name}: skip {v}: {why}")
                    continue
            loss = step()
            assert math.isfinite(float(loss)), f"{v}: loss after one step is {float(loss)}"
        live[v] = (model, x, opt, step)
    if timed:
        _time_interleaved(live, rows, n_rounds)
        if opt_name == "adamw":
            for v in live:
                rows[v]["peak_mb"], rows[v]["state_mb"] = measure_memory_fresh(v, block, opt_name)
                rows[v]["mem_method"] = "fresh-process"
    dense = [rows[v] for v in ("dense fp32", "dense bf16") if rows[v]["status"] != "skip"]
    timed_dense = [r for r in dense if r["samples_s"]]
    if timed_dense:  # baseline: the faster dense dtype (by median)
        min(timed_dense, key=lambda r: statistics.median(r["samples_s"]))["baseline"] = True
    elif dense:
        dense[0]["baseline"] = True
    TRAIN.extend(rows.values())


def _time_interleaved(live: dict[str, tuple], rows: dict[str, dict], n_rounds: int) -> None:
    """Warm up every variant, then ``n_rounds`` rounds, each running every variant once (a few steps when
    one step is under 2 ms). A variant whose warm-up step is over 5x the fp32 dense one and over 1 s
    (bf16 on a CPU without bf16 units) is timed for 5 rounds only, to bound the run; its note says so."""
    warm: dict[str, float] = {}
    for v, (_, _, _, step) in live.items():
        step()
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        warm[v] = time.perf_counter() - t0
    iters = {v: max(1, math.ceil(2e-3 / max(w, 1e-7))) for v, w in warm.items()}
    ref = warm.get("dense fp32")
    limit = {v: (5 if ref and w > 5 * ref and w > 1.0 else n_rounds) for v, w in warm.items()}
    samples: dict[str, list[float]] = {v: [] for v in live}
    for r in range(n_rounds):
        for v, (_, _, _, step) in live.items():
            if r >= limit[v]:
                continue
            _sync()
            t0 = time.perf_counter()
            for _ in range(iters[v]):
                step()
            _sync()
            samples[v].append((time.perf_counter() - t0) / iters[v])
    for v, s in samples.items():
        rows[v].update(status="ok", samples_s=s)
        if limit[v] < n_rounds:
            rows[v]["note"] = f"{limit[v]} rounds: slow"
