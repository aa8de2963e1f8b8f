"""Share of training time spent in dynamic-sparse-training mask updates (issue target: <= 5 % at
``update_every=100``). RigL (or SET) on the MLP block 1024 -> 4096 -> GELU -> 1024 at 90 % sparsity, AdamW,
batch 64, ``pruner.step()`` in the loop as users write it.

Copies of the same model train in one process, two at a time, step by step interleaved (the order
alternates): first one whose pruner updates the masks every ``update_every`` steps (and computes the dense
gradient RigL needs on the update step) beside one whose pruner never updates (``start_step`` past the
run) but which is given the updating copy's masks after every update, outside the timing ("same masks");
then that same-masks copy beside one that keeps its initial masks. Each step position of the update cycle
gets the median of its times over the rounds, per copy. The update cost is the sum of those medians with
updates minus the sum of the same-masks copy, as a share of the sum with updates: everything an update
adds — the dense gradient, drop and grow, moving values and optimizer state, the kernels' index rebuild
on the next step — while the machine's jitter of ordinary steps cancels. The second pair is reported
beside it: what the masks the method grows cost per step (RigL concentrates kept weights in fewer rows;
that is the method's choice of mask, paid whether or not the update itself is cheap).

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

    return step, pr, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--method", default="RigL", choices=("RigL", "SET"))
    a = ap.parse_args()
    with_upd, pr, m_upd = build(a.method, a.every, True, a.batch)
    same, _, m_same = build(a.method, a.every, False, a.batch)
    initial, _, _ = build(a.method, a.every, False, a.batch)
    copies = [with_upd, same, initial]
    upd_layers = [mod for mod in m_upd.modules() if hasattr(mod, "set_mask")]
    same_layers = [mod for mod in m_same.modules() if hasattr(mod, "set_mask")]

    def sync_masks():  # outside the timing: the same-masks copy takes the masks the updates made
        for la, lb in zip(upd_layers, same_layers):
            lb.set_mask(la.mask.clone())

    for _ in range(a.every):  # warm-up: one update, caches and allocator in steady state
        for f in copies:
            f()
    sync_masks()

    def interleaved(pair, rounds):  # per copy of the pair and step position: times over the rounds
        times = [[[] for _ in range(a.every)] for _ in pair]
        for r in range(rounds):
            for pos in range(a.every):
                for c in ((0, 1) if (r + pos) % 2 == 0 else (1, 0)):
                    t = time.perf_counter()
                    pair[c]()
                    times[c][pos].append(time.perf_counter() - t)
            sync_masks()
        return times

    # two models at a time (a third one interleaved would evict the others' caches and slow every step)
    tw, ts = interleaved((with_upd, same), a.rounds)      # the update's cost
    ts2, ti = interleaved((same, initial), a.rounds)      # the grown masks' cost per step
    sw, ss = (sum(statistics.median(x) for x in tc) for tc in (tw, ts))
    ss2, si = (sum(statistics.median(x) for x in tc) for tc in (ts2, ti))
    ran = len(pr.last_update) > 0
    slow = sorted(range(a.every), key=lambda p: statistics.median(tw[p]) - statistics.median(ts[p]))[-2:]
    print(f"{a.method}, {torch.get_num_threads()} threads, batch {a.batch}, update_every={a.every}, {a.rounds} "
          f"rounds: one cycle of {a.every} steps takes {ss * 1e3:.0f} ms without updates (same masks) and "
          f"{sw * 1e3:.0f} ms with one (steps most above: "
          + ", ".join(f"#{p} +{(statistics.median(tw[p]) - statistics.median(ts[p])) * 1e3:.1f} ms" for p in sorted(slow))
          + f"); one update costs {(sw - ss) * 1e3:.1f} ms = {(sw - ss) / sw * 100:.1f} % of training time "
          f"(target <= 5 %){'' if ran else ' [no update ran]'}. The grown masks themselves: "
          f"{(ss2 - si) / si * 100:+.1f} % per step against the initial masks ({ss2 * 1e3:.0f} vs {si * 1e3:.0f} ms "
          f"per cycle)")


if __name__ == "__main__":
    main()
