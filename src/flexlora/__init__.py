"""flexlora: federated LoRA fine-tuning with heterogeneous client ranks.

The aggregation math (``flexlora.aggregation``) knows nothing of models or networks; training
(``flexlora.training``) knows nothing of scheduling; the in-process simulator
(``flexlora.simulation``) and the Flower apps (``flexlora.flower``) drive the same objects.
"""

import os

# OpenMP threads that spin while waiting make torch collapse (tens of times slower) as soon as
# another process shares the cores; sleeping waiters cost little when the machine is idle.
# Read when torch loads its OpenMP runtime, so this only helps if flexlora is imported first
# (the ``flexlora`` command always is). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flexlora.errors import FlexLoRAError, InvalidUpdateError, UsageError
from flexlora.types import ClientUpdate, LoRAFactors

__version__ = "0.1.0"

__all__ = [
    "ClientUpdate",
    "FlexLoRAError",
    "InvalidUpdateError",
    "LoRAFactors",
    "UsageError",
    "__version__",
]
