"""Share of training time spent in dynamic-sparse-training mask updates (issue target: <= 5 % at
``update_every=100``). RigL on the MLP block 1024 -> 4096 -> GELU -> 1024 at 90 % sparsity, AdamW, batch 64,
``pruner.step()`` in the loop as users write it; 300 timed steps (3 updates) after warm-up.

    python benchmarks/mask_update_cost.py [--steps 300] [--batch 64] [--method RigL|SET]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparsefast.pruning as P


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--method", default="RigL", choices=("RigL", "SET"))
    a = ap.parse_args()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
    pr = getattr(P, a.method)(m, sparsity=0.9, distribution="uniform", update_every=100, end_step=100_000)
    pr.prune()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 1024)

    def step():
        m(x).square().mean().backward()
        opt.step()
        pr.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    base = statistics.median(times)
    extra = sum(times) - base * len(times)
    slow = sorted(times)[-max(1, a.steps // 100):]
    print(f"{a.method}, {torch.get_num_threads()} threads: median step {base * 1e3:.2f} ms; update steps "
          f"{', '.join(f'{t * 1e3:.0f}' for t in slow)} ms; mask updates = {extra / sum(times) * 100:.1f} % of "
          f"training time at update_every=100 (target <= 5 %)")


if __name__ == "__main__":
    main()
