"""Share of training time spent in dynamic-sparse-training mask updates (issue target: <= 5 % at
``update_every=100``). RigL (or SET) on the MLP block 1024 -> 4096 -> GELU -> 1024 at 90 % sparsity, AdamW,
batch 64, ``pruner.step()`` in the loop as users write it.

Two copies of the same model train in one process, in interleaved rounds of ``update_every`` steps: one
whose pruner updates the masks (one update per round, and the dense gradient RigL needs on the step
before it), and one whose pruner never updates (``start_step`` past the run). The cost is the median over
rounds of ``(time with updates - time without) / time with updates``: everything the updates add to
training — the dense gradient, drop and grow, moving values and optimizer state, and the kernels'
index rebuild on the next step — and nothing else (run-to-run jitter of ordinary steps cancels
instead of being booked as update cost).

    python benchmarks/mask_update_cost.py [--rounds 7] [--batch 64] [--method RigL|SET] [--every 100]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparsefast.pruning as P


def build(method: str, every: int, updates: bool, batch: int):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
    start = 0 if updates else 10**9
    pr = getattr(P, method)(m, sparsity=0.9, distribution="uniform", update_every=every, start_step=start,
                            end_step=10**9 + 1)
    pr.prune()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randn(batch, 1024)

    def step():
        m(x).square().mean().backward()
        opt.step()
        pr.step()
        opt.zero_grad(set_to_none=True)

    return step, pr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--method", default="RigL", choices=("RigL", "SET"))
    a = ap.parse_args()
    with_upd, pr = build(a.method, a.every, True, a.batch)
    without, _ = build(a.method, a.every, False, a.batch)
    for _ in range(a.every):  # warm-up: one update, caches and allocator in steady state
        with_upd()
        without()
    shares, t_with, t_without = [], [], []
    for r in range(a.rounds):
        order = (with_upd, without) if r % 2 == 0 else (without, with_upd)
        spent = {}
        for f in order:
            t = time.perf_counter()
            for _ in range(a.every):
                f()
            spent[f] = time.perf_counter() - t
        t_with.append(spent[with_upd])
        t_without.append(spent[without])
        shares.append((spent[with_upd] - spent[without]) / spent[with_upd])
    n_upd = len(pr.last_update) > 0
    med = statistics.median(shares)
    per_update = statistics.median(w - o for w, o in zip(t_with, t_without))
    print(f"{a.method}, {torch.get_num_threads()} threads, batch {a.batch}, update_every={a.every}: "
          f"{a.every} steps take {statistics.median(t_without) * 1e3:.0f} ms without updates, "
          f"{statistics.median(t_with) * 1e3:.0f} ms with one; one update costs {per_update * 1e3:.1f} ms = "
          f"{med * 100:.1f} % of training time (rounds: {min(shares) * 100:.1f}..{max(shares) * 100:.1f} %; "
          f"target <= 5 %){'' if n_upd else ' [no update ran]'}")


if __name__ == "__main__":
    main()
