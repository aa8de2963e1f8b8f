"""Measure the ``cpu`` backend against dense, torch CSR and sparseprop (developer tool, not a test).

    python csrc/cpu/measure.py table   [--threads N]   # speed table (docs/PERF.md CPU targets)
    python csrc/cpu/measure.py crossover               # density sweep behind crossover_density()

``table`` times, in one process and interleaved, per case: dense (``F.linear`` / ``F.conv2d`` on
the masked weight), torch CSR (``torch.sparse.mm``; conv: ``F.unfold`` + ``sparse.mm``), sparseprop
(``pip install sparseprop``; needs pybind11 and ``--no-build-isolation``) and this backend, forward
and the training step (forward + dX + masked dW; sparseprop: forward + its backward). With
``--threads 1`` every library runs single-threaded and the time is the thread's CPU time (stable on
a loaded machine); otherwise wall-clock medians. Ratios are what docs/PERF.md asks for.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings


def _setup(threads: int):
    if threads == 1:
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    return torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["table", "crossover"])
    ap.add_argument("--threads", type=int, default=0, help="0: torch default")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch = _setup(args.threads)
    threads = args.threads or torch.get_num_threads()
    import torch.nn.functional as F

    from sparsefast.backends.base import ConvParams
    from sparsefast.backends.cpu import CpuBackend
    from sparsefast.masks import from_reduction_view, nm_mask, parse_pattern, reduction_view
    try:
        import sparseprop.modules as spm
    except ImportError:
        spm = None
    cb = CpuBackend()
    if cb.unavailable_reason():
        sys.exit(f"cpu backend unavailable: {cb.unavailable_reason()}")
    clock = time.thread_time if threads == 1 else time.perf_counter
    agg = min if threads == 1 else statistics.median

    def run(fns: dict, reps: int) -> dict:
        ts = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(reps):
            for k, f in fns.items():
                t0 = clock()
                f()
                ts[k].append(clock() - t0)
        return {k: agg(v) * 1e3 for k, v in ts.items()}

    uns = parse_pattern("unstructured")
    print(f"# {cb.describe()}; torch {torch.__version__}; {threads} thread(s); "
          f"{'min thread CPU time' if threads == 1 else 'median wall clock'} (ms)")

    if args.what == "crossover":
        for dt in (torch.float32, torch.bfloat16):
            for n, k in ((4096, 4096), (1024, 1024)):
                for m in (1, 16, 64, 256):
                    x, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
                    row = []
                    for d in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7):
                        mask = torch.rand(n, k) < d
                        wm = w * mask
                        r = run({"dense": lambda: F.linear(x, wm), "ours": lambda: cb.linear_fwd(x, w, mask, None, uns)},
                                args.reps)
                        row.append(f"{d}:{r['dense'] / r['ours']:.2f}")
                    print(f"linear {str(dt)[6:]} {n}x{k} M={m}: dense/sparse by density " + " ".join(row), flush=True)
        cp = ConvParams((1, 1), (1, 1), (1, 1), 1)
        for dt in (torch.float32, torch.bfloat16):
            for b, c, h in ((16, 256, 14), (8, 128, 28), (8, 64, 56)):
                x, w = torch.randn(b, c, h, h, dtype=dt), torch.randn(c, c, 3, 3, dtype=dt)
                row = []
                for d in (0.1, 0.2, 0.3, 0.5):
                    mask = torch.rand(w.shape) < d
                    wm = w * mask
                    r = run({"dense": lambda: F.conv2d(x, wm, None, 1, 1),
                             "ours": lambda: cb.conv_fwd(x, w, mask, None, uns, cp)}, args.reps)
                    row.append(f"{d}:{r['dense'] / r['ours']:.2f}")
                print(f"conv3x3 {str(dt)[6:]} B={b} C=O={c} {h}x{h}: dense/sparse by density " + " ".join(row), flush=True)
        return

    def fmt(name: str, r: dict) -> None:
        out = [f"{name}:", " ".join(f"{k}={v:.2f}" for k, v in r.items()), "|"]
        base = [r[k] for k in ("csr", "sprop") if k in r]
        if base:
            out.append(f"fwd vs best(csr,sprop) {min(base) / r['ours']:.2f}x")
        out.append(f"fwd vs dense {r['dense'] / r['ours']:.2f}x")
        if "sprop_tr" in r:
            out.append(f"train vs sprop {r['sprop_tr'] / r['ours_tr']:.2f}x")
            if "ours_tr_rp" in r:
                out.append(f"(incl. re-pack {r['sprop_tr'] / r['ours_tr_rp']:.2f}x)")
        if "dense_tr" in r:
            out.append(f"train vs dense {r['dense_tr'] / r['ours_tr']:.2f}x")
        print(" ".join(out), flush=True)

    # --- Linear 4096x4096, float32, 90% / 95% sparsity
    for d in (0.1, 0.05):
        for m in (1, 16, 64, 256):
            torch.manual_seed(0)
            w, mask = torch.randn(4096, 4096), torch.rand(4096, 4096) < d
            wm, x, b, dy = w * mask, torch.randn(m, 4096), torch.randn(4096), torch.randn(m, 4096)
            f = {"dense": lambda: F.linear(x, wm, b), "ours": lambda: cb.linear_fwd(x, w, mask, b, uns)}
            wc, xt = wm.to_sparse_csr(), x.t()
            f["csr"] = lambda: torch.sparse.mm(wc, xt)
            if spm is not None:
                lin = torch.nn.Linear(4096, 4096)
                lin.weight.data.copy_(wm)
                lin.bias.data.copy_(b)
                sl = spm.SparseLinear.from_dense(lin)

                def sp_fwd():
                    with torch.no_grad():
                        sl(x)

                def sp_tr():
                    xx = x.detach().requires_grad_()
                    sl.zero_grad()
                    sl(xx).backward(dy)
                f["sprop"] = sp_fwd
                f["sprop_tr"] = sp_tr

            def dense_tr():
                xx, ww = x.detach().requires_grad_(), wm.detach().requires_grad_()
                F.linear(xx, ww, b).backward(dy)

            def ours_tr():
                cb.linear_fwd(x, w, mask, b, uns)
                cb.linear_dx(dy, w, mask, uns)
                cb.linear_dw(dy, x, mask, uns)

            def ours_tr_rp():
                w.add_(0.0)  # an optimizer step: the packed values are gathered again
                ours_tr()
            f.update(dense_tr=dense_tr, ours_tr=ours_tr, ours_tr_rp=ours_tr_rp)
            fmt(f"linear 4096x4096 fp32 sparsity {1 - d:.0%} M={m}", run(f, args.reps))

    # --- bfloat16 vs dense bfloat16 (90%)
    for m in (1, 16, 64, 256):
        w, mask = torch.randn(4096, 4096, dtype=torch.bfloat16), torch.rand(4096, 4096) < 0.1
        wm, x = w * mask, torch.randn(m, 4096, dtype=torch.bfloat16)
        fmt(f"linear 4096x4096 bf16 sparsity 90% M={m}",
            run({"dense": lambda: F.linear(x, wm), "ours": lambda: cb.linear_fwd(x, w, mask, None, uns)}, args.reps))

    # --- 2:4 vs dense
    p24 = parse_pattern("2:4")
    for dt in (torch.float32, torch.bfloat16):
        for m in (1, 4, 16, 64, 256):
            w = torch.randn(4096, 4096, dtype=dt)
            mask = nm_mask(w, 2, 4)
            wm, x = w * mask, torch.randn(m, 4096, dtype=dt)
            r = run({"dense": lambda: F.linear(x, wm), "ours": lambda: cb.linear_fwd(x, w, mask, None, p24)}, args.reps)
            q = cb.prefer_dense_reason(__import__("sparsefast").backends.make_query("linear", x, w, p24, density=0.5))
            fmt(f"linear 4096x4096 {str(dt)[6:]} 2:4 M={m} (auto: {'dense' if q else 'cpu'})", r)

    # --- ResNet-style 3x3 conv, float32
    cp = ConvParams((1, 1), (1, 1), (1, 1), 1)
    for d in (0.1, 0.05):
        for bsz, c, h in ((16, 256, 14), (8, 128, 28)):
            torch.manual_seed(0)
            w, x, b = torch.randn(c, c, 3, 3), torch.randn(bsz, c, h, h), torch.randn(c)
            mask = torch.rand(w.shape) < d
            wm = w * mask
            dy = torch.randn(bsz, c, h, h)
            wc = wm.reshape(c, -1).to_sparse_csr()

            def csr():
                cols = F.unfold(x, 3, padding=1)
                out = torch.sparse.mm(wc, cols.permute(1, 0, 2).reshape(c * 9, -1))
                return out.reshape(c, bsz, h, h).permute(1, 0, 2, 3) + b.view(1, -1, 1, 1)

            def dense_tr():
                xx, ww = x.detach().requires_grad_(), wm.detach().requires_grad_()
                F.conv2d(xx, ww, b, 1, 1).backward(dy)

            def ours_tr():
                cb.conv_fwd(x, w, mask, b, uns, cp)
                cb.conv_dx(dy, w, mask, uns, cp, x.shape)
                cb.conv_dw(dy, x, mask, uns, cp, w.shape)
            f = {"dense": lambda: F.conv2d(x, wm, b, 1, 1), "ours": lambda: cb.conv_fwd(x, w, mask, b, uns, cp),
                 "csr": csr, "dense_tr": dense_tr, "ours_tr": ours_tr}
            if spm is not None:
                cv = torch.nn.Conv2d(c, c, 3, 1, 1)
                cv.weight.data.copy_(wm)
                cv.bias.data.copy_(b)
                sc = spm.SparseConv2d.from_dense(cv)

                def sp_fwd():
                    with torch.no_grad():
                        sc(x)

                def sp_tr():
                    xx = x.detach().requires_grad_()
                    sc.zero_grad()
                    sc(xx).backward(dy)
                f.update(sprop=sp_fwd, sprop_tr=sp_tr)
            fmt(f"conv3x3 fp32 B={bsz} C=O={c} {h}x{h} sparsity {1 - d:.0%}", run(f, max(3, args.reps // 2)))


if __name__ == "__main__":
    main()
