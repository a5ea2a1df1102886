"""vlorp-lightning: memory-efficient fine-tuning by various-grained low-rank gradient projection.

The optimizer core (:class:`VLoRPProjector`, :class:`ProjFactor`, :class:`VLoRPAdam`,
:class:`VLoRPSGD`) is plain PyTorch; the Lightning integration lives in
:mod:`vlorp_lightning.mixin` and :mod:`vlorp_lightning.callbacks`. The application classes
(:class:`CausalLMModule`, the datamodules) are exported here too, but imported on first
access, so that ``import vlorp_lightning`` stays fast for users of the optimizer alone.
"""

from importlib import import_module
from typing import Any

from vlorp_lightning.callbacks import MemoryMonitor, ProjectionErrorMonitor
from vlorp_lightning.config import VLoRPConfig
from vlorp_lightning.memory import StateEstimate, estimate_state_bytes
from vlorp_lightning.mixin import VLoRPMixin
from vlorp_lightning.optim import ProjectedOptimizer, ProjFactor, VLoRPAdam, VLoRPSGD, vlorp_param_groups
from vlorp_lightning.projection import VLoRPProjector, derive_seed, parse_granularity, valid_granularities
from vlorp_lightning.targets import Target, select_targets

__version__ = "0.1.0"

# Exported names imported on first access, by module.
_LAZY = {
    "CausalLMModule": "vlorp_lightning.models",
    "CommonsenseDataModule": "vlorp_lightning.data",
    "GSM8KDataModule": "vlorp_lightning.data",
    "MMLUDataModule": "vlorp_lightning.data",
    "ProceduralReasoningDataModule": "vlorp_lightning.data",
    "ReasoningDataModule": "vlorp_lightning.data",
    "plan": "vlorp_lightning.planning",
}

__all__ = [
    "CausalLMModule",
    "CommonsenseDataModule",
    "GSM8KDataModule",
    "MMLUDataModule",
    "MemoryMonitor",
    "ProceduralReasoningDataModule",
    "ProjectionErrorMonitor",
    "ReasoningDataModule",
    "plan",
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlorp_lightning' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
