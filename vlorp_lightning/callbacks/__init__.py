"""Lightning callbacks that measure VLoRP: projection error of gradients and optimizer memory."""

from vlorp_lightning.callbacks.memory import MemoryMonitor
from vlorp_lightning.callbacks.projection_error import ProjectionErrorMonitor

__all__ = ["MemoryMonitor", "ProjectionErrorMonitor"]
