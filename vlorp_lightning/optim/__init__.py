"""Optimizers on VLoRP-projected gradients (plain PyTorch, no Lightning import)."""

from vlorp_lightning.optim.base import PROJECTION_KEYS, ProjectedOptimizer
from vlorp_lightning.optim.groups import vlorp_param_groups
from vlorp_lightning.optim.projfactor import ProjFactor
from vlorp_lightning.optim.schemes import VLoRPAdam, VLoRPSGD

__all__ = ["PROJECTION_KEYS", "ProjFactor", "ProjectedOptimizer", "VLoRPAdam", "VLoRPSGD", "vlorp_param_groups"]
