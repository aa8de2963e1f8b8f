"""Main job: sparsify a small model, train it with RigL on the best backend, check it, time it."""
from __future__ import annotations

import argparse
import copy
import time
import warnings


def _best_backend(device) -> str:
    """The first available backend ``auto`` would try for an unstructured float32 Linear on ``device``."""
    import dataclasses

    import torch

    from sparsefast import backends
    q = dataclasses.replace(backends.make_query("linear", None, torch.empty(256, 256, device="meta"), "unstructured",
                                                dtype=torch.float32), device=device)
    return next(n for n in backends.auto_order(q) if backends.why_unavailable(n) is None)


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up (and first pack)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsefast demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="global sparsity for RigL (default 0.9)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from . import usage_error
    if args.steps < 1:
        return usage_error(ap.prog, f"argument --steps: must be a positive number of steps, got {args.steps}")
    if not 0.0 <= args.sparsity < 1.0:  # (NaN fails too)
        return usage_error(ap.prog, f"argument --sparsity: must be in [0, 1), got {args.sparsity}")

    import torch
    import torch.nn.functional as F
    from torch import nn

    dev, why = _parse_device(args.device)
    if why:
        return usage_error(ap.prog, f"argument --device: {why}")

    import sparsefast
    from sparsefast import backends
    from sparsefast.nn import set_backend, sparse_layers

    torch.manual_seed(args.seed)
    backend = _best_backend(dev)
    print(f"sparsefast demo on {dev} — best available backend: {backend}")

    # 1. data: a fixed random teacher network labels Gaussian inputs (10 classes)
    g = torch.Generator().manual_seed(args.seed)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    xs = torch.randn(4096, 64, generator=g)
    with torch.no_grad():
        ys = teacher(xs).argmax(1)
    xtr, ytr, xte, yte = xs[:3584].to(dev), ys[:3584].to(dev), xs[3584:].to(dev), ys[3584:].to(dev)

    # 2. model: a plain MLP, made sparse, trained with RigL (ERK layer densities)
    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(dev)

    model = mlp()
    with backends.use(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsefast.SparsefastWarning)
        pruner = sparsefast.pruning.RigL(model, sparsity=args.sparsity, distribution="erk", update_every=50,
                                         end_step=int(0.75 * args.steps), seed=args.seed)
        pruner.prune()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    print(f"model: {sum(1 for _ in sparse_layers(model))} sparse layers, sparsity {pruner.sparsity():.3f}, "
          f"pattern unstructured, distribution erk")
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, xtr.shape[0], (128,), generator=g).to(dev)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f}s: test accuracy {acc:.3f} "
          f"(chance 0.1), sparsity {pruner.sparsity():.3f}")

    # 3. check the trained model against the masked-dense reference (outputs and gradients)
    ref = set_backend(copy.deepcopy(model), "reference")
    xb = xte[:64]
    out, out_ref = model(xb), ref(xb)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    err_y = (out - out_ref).abs().max().item()
    err_g = max((a.dense_grad() - b.dense_grad()).abs().max().item()
                for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(ref)))
    # kept-values storage: each layer holds (and trains) exactly its kept weights; pruned ones read as zero
    kept_ok = all(l.weight.shape == (int(l.mask.sum()),) and l.weight.grad is not None
                  and l.weight.grad.shape == l.weight.shape and bool((l.dense_weight()[~l.mask] == 0).all())
                  for _, l in sparse_layers(model))
    ok = err_y < 1e-3 and err_g < 1e-3 and kept_ok
    print(f"check vs reference: max |dy| {err_y:.2e}, max |dW| {err_g:.2e}, only kept weights stored and trained: "
          f"{kept_ok} -> {'OK' if ok else 'MISMATCH'}")

    # 4. end to end: one AdamW training step of this model, sparse vs dense
    _training_step_comparison(model, mlp, backend, xtr, ytr, dev)

    # 5. speed: one 2048x2048 layer, batch 64, float32 — dense vs every available backend
    print("\nspeed (2048x2048 linear, batch 64, float32, median ms; ratio = dense / backend):")
    print(f"  {'pattern':14s} {'backend':10s} {'fwd ms':>8s} {'ratio':>6s} {'train ms':>9s} {'ratio':>6s}")
    x = torch.randn(64, 2048, device=dev)
    w = torch.randn(2048, 2048, device=dev)
    dense_f = _median_ms(lambda: F.linear(x, w), 10)
    wr = w.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    dense_t = _median_ms(lambda: F.linear(xr, wr).sum().backward(), 5)
    print(f"  {'dense':14s} {'torch':10s} {dense_f:8.3f} {1.0:6.2f} {dense_t:9.3f} {1.0:6.2f}")
    interp = __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for pattern, sp in (("2:4", None), ("unstructured", 0.9)):
        for name in backends.available():
            if name == "triton" and interp and dev.type == "cpu":
                continue  # the interpreter checks correctness; it is not timed
            layer = sparsefast.SparseLinear(2048, 2048, bias=False, sparsity=sp, pattern=pattern, backend=name,
                                            device=dev)
            try:
                f_ms = _median_ms(lambda: layer(x), 10)
                xg = x.clone().requires_grad_(True)
                t_ms = _median_ms(lambda: layer(xg).sum().backward(), 5)
            except RuntimeError as e:
                print(f"  {pattern + (f' {sp:.0%}' if sp else ''):14s} {name:10s} unsupported: {e}")
                continue
            label = pattern + (f" {sp:.0%}" if sp else "")
            print(f"  {label:14s} {name:10s} {f_ms:8.3f} {dense_f / f_ms:6.2f} {t_ms:9.3f} {dense_t / t_ms:6.2f}")
    print("\n(`python -m sparsefast bench` for the full table; `pytest benchmarks` for the suite)")
    return 0 if ok else 1


def _parse_device(spec: str):
    """``(torch.device, None)``, or ``(None, why)`` for a device this demo cannot run on."""
    import torch
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        return None, f"invalid device {spec!r} (use cpu or cuda[:N])"
    if dev.type not in ("cpu", "cuda"):
        return None, f"unsupported device {spec!r} (use cpu or cuda[:N])"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None, f"{spec!r} requested but no CUDA device is available here"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return None, f"{spec!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    return dev, None


def _state_bytes(model, opt) -> int:
    """Bytes a training step holds for ``model``: parameters + their gradients (one per trainable
    parameter) + optimizer state + buffers (a sparse layer's mask)."""
    import torch
    params = [p for p in model.parameters()]
    n = sum(p.numel() * p.element_size() for p in params)
    n += sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    n += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
             if isinstance(v, torch.Tensor))
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    return n


def _training_step_comparison(model, make, backend: str, xtr, ytr, dev, *, batch: int = 128, rounds: int = 7,
                              steps: int = 10) -> tuple[float, float]:
    """Time one full AdamW training step (forward + backward + ``step()`` + ``zero_grad()``) of the trained
    sparse ``model`` against the same architecture dense (its masked weights as plain dense layers), on
    fresh copies; median over ``rounds`` interleaved rounds of ``steps`` steps each. Prints and returns
    ``(time ratio dense/sparse, training-state-bytes ratio sparse/dense)``."""
    import torch
    import torch.nn.functional as F

    from sparsefast.nn import set_backend, sparsify

    sd = model.state_dict()
    dense = make()
    dense.load_state_dict({k: v for k, v in sd.items() if not k.endswith(".mask")})
    sparse = set_backend(sparsify(make(), sparsity=None), backend)  # all-kept, then the trained masks:
    sparse.load_state_dict(sd)
    xb, yb = xtr[:batch], ytr[:batch]
    runs = []
    for m in (dense, sparse):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt):
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):  # warm-up: optimizer state, backend caches
            step()
        runs.append((m, opt, step))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    per = ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # interleaved, alternating order
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                runs[i][2]()
            sync()
            per[i].append((time.perf_counter() - t) / steps)
    ms = [1e3 * sorted(p)[len(p) // 2] for p in per]
    ratio = ms[0] / ms[1]
    sb = [_state_bytes(m, opt) for m, opt, _ in runs]
    mem = sb[1] / sb[0]
    print(f"\ntraining step (this MLP, batch {batch}, AdamW: forward+backward+step+zero_grad, median of {rounds} "
          f"interleaved rounds x {steps} steps):")
    print(f"  dense {ms[0]:.3f} ms, sparse ({backend}) {ms[1]:.3f} ms -> speedup dense/sparse {ratio:.2f}x")
    print(f"  training state bytes (params + grads + AdamW state + masks): dense {sb[0] / 1e6:.2f} MB, "
          f"sparse {sb[1] / 1e6:.2f} MB -> sparse/dense {mem:.3f} (backend caches not counted)")
    if dev.type == "cuda":
        peaks = []
        for _, _, step in runs:
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            step()
            sync()
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        print(f"  CUDA peak memory of one step above resident (activations, grads, workspaces): dense "
              f"{peaks[0] / 1e6:.2f} MB, sparse {peaks[1] / 1e6:.2f} MB")
    return ratio, mem


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
