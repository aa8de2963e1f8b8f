"""Pruning and sparse-training methods acting on sparse layers (any backend).

Every method shares one protocol (:class:`~sparsefast.pruning.base.Pruner`)::

    pruner = sparsefast.pruning.RigL(model, sparsity=0.9, distribution="erk", end_step=7500)
    pruner.prune(batch=None, loss_fn=None)
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); pruner.step(); optimizer.zero_grad()
    pruner.masks(); pruner.sparsity(); pruner.state_dict(); pruner.load_state_dict(d)

================  ========================  =============================================  ============================
class             family                    N:M                                            block:B
================  ========================  =============================================  ============================
Magnitude         one-shot                  yes (top-n |W| per m-group)                    yes (largest summed |W|)
Random            at init                   yes (n random per group)                       yes (random blocks)
GradualMagnitude  gradual (cubic)           refused (intermediate levels are not N:M)      yes (levels in blocks)
LotteryTicket     IMP + rewinding           refused (rate of remaining weights per round)  yes (rate of kept blocks)
LOBSTER           regularise + threshold    refused (global magnitude threshold)           refused (per-weight rule)
SNIP / GraSP      at init, data             yes (top-n score per group)                    yes (summed score)
SynFlow           at init, data-free        yes (one round)                                yes (summed score per round)
SET / RigL        dynamic sparse training   yes (drop/grow inside m-groups)                yes (drop/grow whole blocks)
DSR / SNFS        DST with reallocation     refused (weights move between layers)          refused (per-weight rules)
FreezeNet         freeze the non-trainable  yes (trainable set is N:M)                     yes (trainable blocks)
EdgePopup         learned mask, frozen W    yes (top-n |score| per group)                  yes (summed |score|)
SRSTE             N:M from scratch          yes (default 2:4; unstructured also accepted)  refused (N:M method)
RobustTicket      adversarial OMP / A-IMP   OMP yes, A-IMP refused                         yes (both)
Wanda             one-shot, calibration     yes (top-n |W|·‖X_j‖ per group)                yes (summed score, per layer)
SparseGPT         one-shot, calibration     yes (OBS choice per group, kept W updated)     refused (column-wise OBS)
================  ========================  =============================================  ============================

Block scoring: a b x b block of the reduction view scores the sum of its weights' scores; sparsities,
layer densities and drop counts count blocks (see :mod:`sparsefast.pruning.base`).

``layer_densities(model, sparsity, distribution)`` gives the layer-wise densities of a distribution.

Wanda and SparseGPT prune a *trained* model from calibration data (``prune(batch=...)``: a tensor, a dict
of tensors called as ``model(**batch)``, or a list / iterable of them), layer by layer in forward order,
leaving the output head dense by default (:mod:`sparsefast.pruning.calibrated`).
"""
from .base import Pruner
from .calibrated import SparseGPT, Wanda
from .distributions import DISTRIBUTIONS, flow_repair, layer_densities
from .dst import DSR, SET, SNFS, RigL
from .freeze import EdgePopup, FreezeNet
from .lobster import LOBSTER
from .lottery import LotteryTicket, RobustTicket
from .magnitude import GradualMagnitude, Magnitude, Random
from .pai import SNIP, GraSP, SynFlow
from .srste import SRSTE

__all__ = ["Pruner", "Magnitude", "Random", "GradualMagnitude", "LotteryTicket", "LOBSTER", "SNIP", "GraSP",
           "SynFlow", "SET", "RigL", "DSR", "SNFS", "FreezeNet", "EdgePopup", "SRSTE", "RobustTicket",
           "Wanda", "SparseGPT", "layer_densities", "flow_repair", "DISTRIBUTIONS"]
