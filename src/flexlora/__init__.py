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
# torch's CPU allocator backs tensors of 2 MiB and more with transparent huge pages: the server
# writes every reply into fresh stacks, and 4 KiB page faults made that write 2-6x slower
# (0.018 s against 0.003 s to fill an 800 x 11008 float32 buffer). Also read once, when torch
# first allocates; an explicit setting (THP_MEM_ALLOC_ENABLE=0) wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
