"""flexlora: federated LoRA fine-tuning with heterogeneous client ranks.

The aggregation math (``flexlora.aggregation``) knows nothing of models or networks; training
(``flexlora.training``) knows nothing of scheduling; the in-process simulator
(``flexlora.simulation``) and the Flower apps (``flexlora.flower``) drive the same objects.
"""

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
