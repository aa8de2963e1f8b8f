"""Share of training time spent in dynamic-sparse-training mask updates (issue target: <= 5 % at
``update_every=100``). RigL (or SET) on the MLP block 1024 -> 4096 -> GELU -> 1024 at 90 % sparsity, AdamW,
batch 64, ``pruner.step()`` in the loop as users write it.

Two copies of the same model train in one process, step by step interleaved (the order alternates): one
whose pruner updates the masks every ``update_every`` steps (and computes the dense gradient RigL needs on
the step before), and one whose pruner never updates (``start_step`` past the run). Each step position of
the update cycle gets the median of its times over the rounds, for both copies; the cost is the sum of
those medians with updates minus the sum without, as a share of the sum with updates: everything the
updates add to training — the dense gradient, drop and grow, moving values and optimizer state, and the
kernels' index rebuild on the next step — while the machine's jitter of ordinary steps cancels (a
slow step is a slow step for both copies) instead of being booked as update cost.

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
    tw = [[] for _ in range(a.every)]
    to = [[] for _ in range(a.every)]
    for r in range(a.rounds):
        for pos in range(a.every):
            for f, rec in ((with_upd, tw), (without, to)) if (r + pos) % 2 == 0 else ((without, to), (with_upd, tw)):
                t = time.perf_counter()
                f()
                rec[pos].append(time.perf_counter() - t)
    sw = sum(statistics.median(x) for x in tw)
    so = sum(statistics.median(x) for x in to)
    ran = len(pr.last_update) > 0
    slow = sorted(range(a.every), key=lambda p: statistics.median(tw[p]) - statistics.median(to[p]))[-2:]
    print(f"{a.method}, {torch.get_num_threads()} threads, batch {a.batch}, update_every={a.every}, {a.rounds} "
          f"rounds: one cycle of {a.every} steps takes {so * 1e3:.0f} ms without updates and {sw * 1e3:.0f} ms "
          f"with one (steps most above: "
          + ", ".join(f"#{p} +{(statistics.median(tw[p]) - statistics.median(to[p])) * 1e3:.1f} ms" for p in sorted(slow))
          + f"); one update costs {(sw - so) * 1e3:.1f} ms = {(sw - so) / sw * 100:.1f} % of training time "
          f"(target <= 5 %){'' if ran else ' [no update ran]'}")


if __name__ == "__main__":
    main()
