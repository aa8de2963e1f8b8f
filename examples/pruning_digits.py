#!/usr/bin/env python
"""Every pruning method of sparsefast on real data: scikit-learn's handwritten digits (8x8, 10 classes,
1797 images, shipped with scikit-learn — no download).

Models: a LeNet-300-100-style MLP (64-300-100-10) and a small CNN (conv 8, conv 16, pool, linear),
both made of sparsefast sparse layers. For each method and each sparsity (50/80/90/95%) the script
trains from several seeds and reports test accuracy (mean ± std), writes a Markdown table, checks
three qualitative claims of the papers, and plots accuracy vs sparsity:

    python examples/pruning_digits.py                  # full run (~15-20 min on 2 CPU cores)
    python examples/pruning_digits.py --quick          # CI smoke run (seconds; tiny budget)
    python examples/pruning_digits.py --out docs       # where results.md / results.png go

Needs scikit-learn, matplotlib and (optionally) tqdm: ``pip install scikit-learn matplotlib tqdm``.
The numbers in docs/results.md are written by this script only.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsefast  # noqa: E402
from sparsefast import pruning as P  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # optional
    def tqdm(it=None, **kw):  # type: ignore[no-redef]
        return it


# ---------------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------------
@dataclass
class Data:
    xtr: torch.Tensor
    ytr: torch.Tensor
    xval: torch.Tensor
    yval: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor


def load_data(quick: bool) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    xtr, xval, ytr, yval = train_test_split(xtr, ytr, test_size=0.1, random_state=0, stratify=ytr)
    mean, std = xtr.mean(), xtr.std()
    f = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # (N, 1, 8, 8)
    data = Data(f(xtr), torch.from_numpy(ytr), f(xval), torch.from_numpy(yval), f(xte), torch.from_numpy(yte))
    if quick:
        data.xtr, data.ytr = data.xtr[:128], data.ytr[:128]
    return data


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def make_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


ARCHS = {"mlp": make_mlp, "cnn": make_cnn}


@dataclass
class Cfg:
    epochs: int
    batch: int
    lr: float
    quick: bool
    synflow_iters: int
    data: Data
    cache: dict = field(default_factory=dict)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.xtr.shape[0] / self.batch)

    def total(self, epochs: int | None = None) -> int:
        return (self.epochs if epochs is None else epochs) * self.steps_per_epoch()


def build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch]()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(cfg: Cfg, model: nn.Module, seed: int, *, epochs: int | None = None, lr: float | None = None,
          pruner=None, params=None, make_pruner: Callable | None = None, adv: Callable | None = None,
          on_epoch: Callable | None = None, weight_decay: float = 5e-4):
    """SGD (momentum 0.9, cosine LR per step). ``make_pruner(opt)`` builds a pruner that needs the
    optimizer; ``pruner.step()`` runs after every optimizer step."""
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if make_pruner is not None:
        pruner = make_pruner(opt)
    T = max(cfg.total(epochs), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, T) / T)))
    g = torch.Generator().manual_seed(10_000 + seed)
    n = cfg.data.xtr.shape[0]
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch):
            idx = perm[i:i + cfg.batch]
            x, y = cfg.data.xtr[idx], cfg.data.ytr[idx]
            if adv is not None:
                x = adv(x, y)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step()
            opt.zero_grad(set_to_none=True)
        if on_epoch is not None:
            on_epoch(ep)
    return pruner


def score_batch(cfg: Cfg, per_class: int = 10):
    """~10 training samples per class (GraSP's recipe; SNIP/FreezeNet use the same batch)."""
    idx = torch.cat([torch.nonzero(cfg.data.ytr == c).flatten()[:per_class] for c in range(10)])
    return cfg.data.xtr[idx], cfg.data.ytr[idx]


def dense_trained(cfg: Cfg, arch: str, seed: int) -> tuple[nn.Module, float]:
    key = ("dense", arch, seed)
    if key not in cfg.cache:
        m = build(arch, seed)
        train(cfg, m, seed)
        cfg.cache[key] = (m, accuracy(m, cfg.data.xte, cfg.data.yte))
    m, acc = cfg.cache[key]
    return copy.deepcopy(m), acc


def robust_trained(cfg: Cfg, arch: str, seed: int, eps: float, alpha: float, steps: int) -> nn.Module:
    """Dense model trained with PGD adversarial examples (RobustTicket's first stage)."""
    key = ("robust", arch, seed)
    if key not in cfg.cache:
        m = build(arch, seed)
        helper = P.RobustTicket(m, sparsity=0.0, eps=eps, alpha=alpha, pgd_steps=steps, seed=seed)
        train(cfg, m, seed, adv=helper.adversarial_batch)
        cfg.cache[key] = m
    return copy.deepcopy(cfg.cache[key])


# ---------------------------------------------------------------------------------------------------
# one run per (method, arch, sparsity or pattern, seed) -> (test accuracy, achieved sparsity)
# ---------------------------------------------------------------------------------------------------
def run(cfg: Cfg, method: str, arch: str, s: float, seed: int, pattern: str = "unstructured") -> tuple[float, float]:
    T = cfg.total()
    upd = max(1, T // 10)  # DST mask updates every ~10% of training (until 75%: ~7 updates)
    kw = dict(seed=seed, progress=False)
    sp = dict(sparsity=s) if pattern == "unstructured" else dict(pattern=pattern)
    te = (cfg.data.xte, cfg.data.yte)

    if method == "Dense":
        return dense_trained(cfg, arch, seed)[1], 0.0

    if method in ("Magnitude", "RobustTicket (OMP)"):
        if method == "Magnitude":
            m = dense_trained(cfg, arch, seed)[0]
            pr = P.Magnitude(m, **sp, **kw)
        else:
            m = robust_trained(cfg, arch, seed, eps=0.25, alpha=0.1, steps=3)
            pr = P.RobustTicket(m, method="omp", eps=0.25, alpha=0.1, pgd_steps=3, **sp, **kw)
        pr.prune()
        train(cfg, m, seed, epochs=max(1, cfg.epochs // 3), lr=cfg.lr / 10, pruner=pr)  # fine-tune
        return accuracy(m, *te), pr.sparsity()

    m = build(arch, seed)
    if method == "GradualMagnitude":
        pr = P.GradualMagnitude(m, end_step=max(1, int(0.6 * T)), update_every=max(1, T // 50), distribution="global", **sp, **kw)
        train(cfg, m, seed, pruner=pr)
    elif method == "LotteryTicket":
        rounds = 2
        rate = 1 - (1 - s) ** (1 / rounds)
        pr = P.LotteryTicket(m, sparsity=s, rate=rate, rewind_step=cfg.steps_per_epoch(), **kw)
        for _ in range(pr.rounds):
            train(cfg, m, seed, pruner=pr)
            pr.prune()
        train(cfg, m, seed, pruner=pr)
    elif method.startswith("Random"):
        dist = method[method.index("(") + 1:-1].lower() if "(" in method else "erk"
        pr = P.Random(m, distribution=dist, **sp, **kw) if pattern == "unstructured" else P.Random(m, **sp, **kw)
        pr.prune()
        train(cfg, m, seed, pruner=pr)
    elif method in ("SNIP", "GraSP", "FreezeNet"):
        pr = getattr(P, method)(m, **sp, **kw)
        pr.prune(batch=score_batch(cfg))
        train(cfg, m, seed, pruner=pr)
    elif method == "SynFlow":
        pr = P.SynFlow(m, iterations=cfg.synflow_iters, input_shape=(1, 8, 8), **sp, **kw)
        pr.prune()
        train(cfg, m, seed, pruner=pr)
    elif method in ("SET", "RigL", "DSR", "SNFS"):
        pr = getattr(P, method)(m, update_every=upd, end_step=max(1, int(0.75 * T)), **sp, **kw)
        pr.prune()
        train(cfg, m, seed, pruner=pr)
    elif method == "LOBSTER":
        pr = P.LOBSTER(m, sparsity=s, lmbda=1e-4, pwe=1, twt=0.05, **kw)
        train(cfg, m, seed, pruner=pr, on_epoch=lambda ep: pr.prune((cfg.data.xval, cfg.data.yval), force=True))
    elif method == "EdgePopup":
        pr = P.EdgePopup(m, **sp, **kw)
        pr.prune()
        train(cfg, m, seed, pruner=pr, params=pr.parameters(), weight_decay=0.0)
    elif method == "SRSTE":
        sparsefast.sparsify(m)  # sparse layers first: SR-STE reads the LR of the optimizer holding them
        pr = train(cfg, m, seed, make_pruner=lambda opt: _srste(m, opt, sp, kw))
    else:
        raise ValueError(method)
    return accuracy(m, *te), pr.sparsity()


def _srste(m: nn.Module, opt, sp: dict, kw: dict):
    pr = P.SRSTE(m, optimizer=opt, **sp, **kw)
    pr.prune()
    return pr


UNSTRUCTURED = {
    "mlp": ["Dense", "Magnitude", "GradualMagnitude", "LotteryTicket", "LOBSTER", "Random (uniform)",
            "Random (ERK)", "Random (balanced)", "SNIP", "GraSP", "SynFlow", "SET", "RigL", "DSR", "SNFS",
            "FreezeNet", "EdgePopup", "RobustTicket (OMP)"],
    "cnn": ["Dense", "Magnitude", "GradualMagnitude", "Random (uniform)", "Random (ERK)", "Random (balanced)", "SNIP",
            "SynFlow", "SET", "RigL"],
}
NM = ["Dense", "Magnitude", "SRSTE", "RigL", "SET", "SNIP", "Random"]


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def fmt(vals: list[float], sps: list[float], target: float) -> str:
    a = np.array(vals) * 100
    cell = f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a.mean():.1f}"
    got = float(np.mean(sps))
    if abs(got - target) > 0.005 and target > 0:
        cell += f" (s={got:.2f})"
    return cell


def table(res: dict, arch: str, methods: list[str], sparsities: list[float]) -> list[str]:
    head = "| method | " + " | ".join(f"{int(round(s * 100))}%" for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (len(sparsities) + 1)]
    for mth in methods:
        cells = []
        for s in sparsities:
            key = (arch, mth, 0.0 if mth == "Dense" else s)
            cells.append(fmt(*zip(*res[key]), 0.0 if mth == "Dense" else s) if key in res else "—")
        lines.append(f"| {mth} | " + " | ".join(cells) + " |")
    return lines


def mean(res, key) -> float:
    return float(np.mean([a for a, _ in res[key]])) if key in res else float("nan")


NOISE = 0.6  # accuracy points (~2 test images): a smaller reversal is within the seed-to-seed noise


def _verdict(violations: list[tuple[float, float]]) -> str:
    """``violations``: (sparsity, margin in points) where the claimed order is reversed."""
    if not violations:
        return "holds"
    worst = max(violations, key=lambda v: v[1])
    if worst[1] <= NOISE:
        return f"holds within noise (largest reversal {worst[1]:.1f} pts at {int(worst[0] * 100)}%)"
    bad = ", ".join(f"{int(s * 100)}% by {m:.1f} pts" for s, m in violations if m > NOISE)
    return f"does NOT hold at {bad}"


def checks(res: dict, sparsities: list[float]) -> list[str]:
    out = []
    hi = [s for s in sparsities if s >= 0.9]
    for arch in ("mlp", "cnn"):
        parts, viol = [], []
        for s in hi:
            g, o = mean(res, (arch, "GradualMagnitude", s)), mean(res, (arch, "Magnitude", s))
            if math.isnan(g) or math.isnan(o):
                continue
            parts.append(f"{int(s * 100)}%: gradual {g * 100:.1f} vs one-shot {o * 100:.1f}")
            if g < o:
                viol.append((s, (o - g) * 100))
        if parts:
            out.append(f"- **Gradual beats one-shot at high sparsity** ({arch.upper()}): {_verdict(viol)} — "
                       + "; ".join(parts) + ".")
    for arch in ("mlp", "cnn"):
        parts, verdicts = [], []
        for dist in ("ERK", "balanced"):
            viol, seen = [], False
            for s in sparsities:
                u, d = mean(res, (arch, "Random (uniform)", s)), mean(res, (arch, f"Random ({dist})", s))
                if math.isnan(u) or math.isnan(d):
                    continue
                seen = True
                if d < u:
                    viol.append((s, (u - d) * 100))
            if seen:
                verdicts.append(f"{dist} ≥ uniform {_verdict(viol)}")
        for s in sparsities:
            u, e, b = (mean(res, (arch, f"Random ({d})", s)) for d in ("uniform", "ERK", "balanced"))
            if not (math.isnan(u) or math.isnan(e)):
                parts.append(f"{int(s * 100)}%: uniform {u * 100:.1f}, ERK {e * 100:.1f}"
                             + (f", balanced {b * 100:.1f}" if not math.isnan(b) else ""))
        if parts:
            out.append(f"- **ERK / balanced beat uniform for random pruning** ({arch.upper()}): "
                       + "; ".join(verdicts) + " — " + "; ".join(parts) + ".")
    for arch in ("mlp", "cnn"):
        parts, viol = [], []
        for s in sparsities:
            r, st, rnd = (mean(res, (arch, m, s)) for m in ("RigL", "SET", "Random (ERK)"))
            if any(math.isnan(v) for v in (r, st, rnd)):
                continue
            margin = max(st - r, rnd - st, 0.0) * 100
            if margin > 0:
                viol.append((s, margin))
            parts.append(f"{int(s * 100)}%: RigL {r * 100:.1f}, SET {st * 100:.1f}, static {rnd * 100:.1f}")
        if parts:
            out.append(f"- **RigL ≥ SET ≥ static random (ERK)** ({arch.upper()}): {_verdict(viol)} — "
                       + "; ".join(parts) + ".")
    return out


def density_table(sparsity: float) -> list[str]:
    """Layer densities of the random-pruning distributions (computed, not trained)."""
    lines = [f"| model | layer | weights | " + " | ".join(f"{d}" for d in ("uniform", "erk", "balanced")) + " |",
             "|---|---|---|---|---|---|"]
    for arch in ("mlp", "cnn"):
        m = ARCHS[arch]()
        ds = {d: P.layer_densities(m, sparsity, d) for d in ("uniform", "erk", "balanced")}
        for name, mod in m.named_modules():
            if name in ds["erk"]:
                lines.append(f"| {arch.upper()} | {name} {tuple(mod.weight.shape)} | {mod.weight.numel()} | "
                             + " | ".join(f"{ds[d][name]:.3f}" for d in ("uniform", "erk", "balanced")) + " |")
    return lines


STYLE = {"Magnitude": "-", "GradualMagnitude": "-", "LotteryTicket": "-", "LOBSTER": "-", "RobustTicket (OMP)": "-",
         "SNIP": "--", "GraSP": "--", "SynFlow": "--", "FreezeNet": "--", "Random (uniform)": ":",
         "Random (ERK)": ":", "Random (balanced)": ":", "SET": "-.", "RigL": "-.", "DSR": "-.", "SNFS": "-.",
         "EdgePopup": (0, (1, 1))}


def plot(res: dict, sparsities: list[float], path: Path) -> None:
    """Test error (log scale, so the methods close to dense stay apart) vs sparsity; one colour and line
    style per method in both panels (solid: from a trained/dense model, dashed: at init with scores,
    dotted: random at init, dash-dot: dynamic sparse training)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    cmap = plt.get_cmap("tab20")
    names = [m for m in UNSTRUCTURED["mlp"] if m != "Dense"]
    color = {m: cmap(i % 20) for i, m in enumerate(names)}
    for ax, arch in zip(axes, ("mlp", "cnn")):
        dense = mean(res, (arch, "Dense", 0.0))
        if not math.isnan(dense):
            ax.axhline(max(100 - dense * 100, 0.1), color="k", ls="--", lw=1)
        for mth in (m for m in UNSTRUCTURED[arch] if m != "Dense"):
            pts = [(s * 100, max(100 - mean(res, (arch, mth, s)) * 100, 0.1)) for s in sparsities
                   if (arch, mth, s) in res]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=4, lw=1.4, color=color[mth], ls=STYLE.get(mth, "-"))
        ax.set_yscale("log")
        ax.set_title({"mlp": "MLP 64-300-100-10", "cnn": "CNN (conv8-conv16-pool-fc)"}[arch] + " on digits")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test error (%), log scale")
        ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="k", ls="--", lw=1, label="Dense")]
    handles += [Line2D([], [], color=color[m], ls=STYLE.get(m, "-"), marker="o", ms=4, label=m) for m in names]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget for a CI smoke test (seconds)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 2; quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per MLP run (default 8; CNN 3/4 of it; quick 1)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 32; quick 128)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="rewrite the report from the raw results.json of an earlier run (no training)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                    help="directory for results.md and results.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    warnings.simplefilter("ignore", sparsefast.SparsefastWarning)

    quick = args.quick
    seeds = list(range(args.seeds if args.seeds else (1 if quick else 2)))
    epochs = args.epochs if args.epochs else (1 if quick else 8)
    batch = args.batch if args.batch else (128 if quick else 32)
    sparsities = [0.9] if quick else [0.5, 0.8, 0.9, 0.95]
    data = load_data(quick)
    cache: dict = {}
    cnn_epochs = max(1, round(0.75 * epochs))  # the CNN converges in fewer epochs and costs more per step
    cfgs = {arch: Cfg(epochs=e, batch=batch, lr=0.1, quick=quick, synflow_iters=5 if quick else 100, data=data,
                      cache=cache) for arch, e in (("mlp", epochs), ("cnn", cnn_epochs))}
    cfg = cfgs["mlp"]

    jobs = []
    for arch in ("mlp", "cnn"):
        methods = UNSTRUCTURED[arch] if not quick else [m for m in UNSTRUCTURED[arch] if arch == "mlp"]
        for mth in methods:
            for s in ([0.0] if mth == "Dense" else sparsities):
                for seed in seeds:
                    jobs.append((arch, mth, s, seed, "unstructured"))
    for mth in NM:
        for seed in seeds:
            jobs.append(("mlp", mth, 0.0 if mth == "Dense" else 0.5, seed, "2:4"))

    res: dict = {}
    nm_res: dict = {}
    if args.from_json is not None:  # report only, from the raw per-run results of an earlier run
        raw = json.loads(args.from_json.read_text())
        for r in raw["runs"]:
            (res if r["pattern"] == "unstructured" else nm_res).setdefault(
                (r["arch"], r["method"], r["sparsity"]), []).append((r["acc"], r["achieved"]))
        elapsed, n_runs = raw["elapsed_s"], len(raw["runs"])
    else:
        t0 = time.perf_counter()
        runs = []
        for arch, mth, s, seed, pat in tqdm(jobs, desc="runs", total=len(jobs)):
            acc, got = run(cfgs[arch], mth, arch, s, seed, pattern=pat)
            (res if pat == "unstructured" else nm_res).setdefault((arch, mth, s), []).append((acc, got))
            runs.append(dict(arch=arch, method=mth, sparsity=s, seed=seed, pattern=pat, acc=acc, achieved=got))
        elapsed, n_runs = time.perf_counter() - t0, len(jobs)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"elapsed_s": elapsed, "epochs": epochs, "batch": batch, "seeds": seeds, "runs": runs}, indent=1))

    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# Pruning results on real data (scikit-learn digits)", "",
             "Written by `examples/pruning_digits.py" + (" --quick" if quick else "") + "` — do not edit by hand. "
             f"{n_runs} training runs in {elapsed / 60:.1f} min on {platform.machine()} "
             f"({torch.get_num_threads()} threads, torch {torch.__version__}, backend `auto` = "
             f"{', '.join(sparsefast.backends.available())} available).", "",
             "## Setup", "",
             f"- Data: `sklearn.datasets.load_digits` (1797 8×8 images, 10 classes), stratified split 72/8/20 "
             f"(train/val/test, fixed), standardised. Train {cfg.data.xtr.shape[0]}, test {cfg.data.xte.shape[0]}."
             + (" **Quick mode: 128 training images, 1 epoch — smoke test only, not results.**" if quick else ""),
             f"- Training: SGD momentum 0.9, lr {cfg.lr} cosine-decayed per step, weight decay 5e-4, batch "
             f"{cfg.batch}, {epochs} epochs ({cfg.total()} steps) per MLP run and {cnn_epochs} per CNN run; "
             f"seeds {seeds} (init and batch order).",
             "- Cells: test accuracy (%) mean ± std over seeds; `(s=…)` = achieved sparsity when it differs "
             "from the target. Sparsity counts the weights of all Linear/Conv layers (biases dense).",
             "- Per method: *Magnitude* = one-shot global magnitude on the trained dense model + fine-tune "
             f"{max(1, epochs // 3)} epochs at lr/10 (the dense run is reused). *GradualMagnitude*: cubic "
             "schedule from 0 to the target over the first 60% of steps, global threshold. *LotteryTicket*: "
             "2 IMP rounds of a full run each (rate = 1 − (1−s)^(1/2)), late rewinding to step 1 epoch, then "
             "the final training (3× the budget). *LOBSTER*: λ = 1e-4, threshold pruning after every epoch "
             "on the validation split (5% loss tolerance), capped at the target. *Random*: fixed masks at init "
             "with the named layer-wise distribution. *SNIP / GraSP / FreezeNet*: scored on 10 training images "
             "per class (global). *SynFlow*: data-free, "
             f"{cfg.synflow_iters} rounds. *SET / RigL / DSR / SNFS*: ERK init, a mask update every 10% of the steps "
             "(all stop at 75% of training; RigL/SNFS drop fractions cosine-decay, SET/DSR constant). *EdgePopup*: frozen signed-constant weights, only the "
             "scores train (uniform per-layer density). *RobustTicket (OMP)*: one-shot magnitude on a dense "
             "model trained with PGD (ε = 0.25 in standardised units, 3 steps of 0.1) + clean fine-tune as "
             "Magnitude (same-task accuracy here; the paper's claim is about transfer).", "",
             "## Unstructured sparsity — MLP (64-300-100-10)", ""]
    lines += table(res, "mlp", UNSTRUCTURED["mlp"], sparsities)
    lines += ["", "## Unstructured sparsity — CNN (conv 1→8, conv 8→16, max-pool, linear 256→10)", ""]
    lines += table(res, "cnn", UNSTRUCTURED["cnn"], sparsities) if not quick else ["(skipped in quick mode)"]
    lines += ["", "## 2:4 (N:M) sparsity — MLP, 50%", "", "| method | 2:4 |", "|---|---|"]
    for mth in NM:
        key = ("mlp", mth, 0.0 if mth == "Dense" else 0.5)
        if key in nm_res:
            lines.append(f"| {mth} | {fmt(*zip(*nm_res[key]), 0.0 if mth == 'Dense' else 0.5)} |")
    lines += ["", "## What the papers report, checked here", ""]
    lines += checks(res, sparsities) or ["(not enough configurations in this run)"]
    lines += ["", f"A reversal of at most {NOISE} accuracy points (about two of the 360 test images) is counted as "
              "noise: the ± columns show seed-to-seed spreads of that size.", "",
              "Layer densities the random-pruning distributions give at 90% sparsity (they explain most of the "
              "random-pruning rows: a layer left with a handful of weights caps the accuracy):", ""]
    lines += density_table(0.9)
    lines += ["",
              "![accuracy vs sparsity](results.png)", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    plot(res, sparsities, args.out / "results.png")
    print("\n".join(lines))
    print(f"\nwrote {args.out / 'results.md'}, results.png and results.json ({elapsed:.0f}s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
