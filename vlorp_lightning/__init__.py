"""vlorp-lightning: memory-efficient fine-tuning by various-grained low-rank gradient projection.

The optimizer core (:class:`VLoRPProjector`, :class:`ProjFactor`, :class:`VLoRPAdam`,
:class:`VLoRPSGD`) is plain PyTorch; the Lightning integration lives in
:mod:`vlorp_lightning.mixin` and :mod:`vlorp_lightning.callbacks`.
"""

from vlorp_lightning.config import VLoRPConfig
from vlorp_lightning.memory import StateEstimate, estimate_state_bytes
from vlorp_lightning.mixin import VLoRPMixin
from vlorp_lightning.optim import ProjectedOptimizer, ProjFactor, VLoRPAdam, VLoRPSGD, vlorp_param_groups
from vlorp_lightning.projection import VLoRPProjector, derive_seed, parse_granularity, valid_granularities
from vlorp_lightning.targets import Target, select_targets

__version__ = "0.1.0"

__all__ = [
    "ProjFactor",
    "StateEstimate",
    "VLoRPConfig",
    "VLoRPMixin",
    "estimate_state_bytes",
    "ProjectedOptimizer",
    "Target",
    "VLoRPAdam",
    "VLoRPProjector",
    "VLoRPSGD",
    "derive_seed",
    "parse_granularity",
    "select_targets",
    "valid_granularities",
    "vlorp_param_groups",
]
