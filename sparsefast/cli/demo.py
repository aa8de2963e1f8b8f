"""Main job: sparsify a small model, train it with RigL on the best backend, check it, time it."""
from __future__ import annotations

import argparse
import copy
import time
import warnings


def _best_backend(device) -> str:
    from sparsefast import backends
    order = [*backends.PRIORITY.get(device.type, []), "reference"]
    return next(n for n in order if backends.why_unavailable(n) is None)


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

    import torch
    import torch.nn.functional as F
    from torch import nn

    import sparsefast
    from sparsefast import backends
    from sparsefast.nn import set_backend, sparse_layers

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
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
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(dev)
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
    err_g = max((a.weight.grad - b.weight.grad).abs().max().item()
                for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(ref)))
    pruned_ok = all(bool((l.weight[~l.mask] == 0).all()) and bool((l.weight.grad[~l.mask] == 0).all())
                    for _, l in sparse_layers(model))
    ok = err_y < 1e-3 and err_g < 1e-3 and pruned_ok
    print(f"check vs reference: max |dy| {err_y:.2e}, max |dW| {err_g:.2e}, pruned weights and grads zero: "
          f"{pruned_ok} -> {'OK' if ok else 'MISMATCH'}")

    # 4. speed: one 2048x2048 layer, batch 64, float32 — dense vs every available backend
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


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
