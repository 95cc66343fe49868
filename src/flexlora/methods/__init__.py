"""Base federated methods (initialisation + local training) and how names compose them."""

from flexlora.methods.compose import (
    AGGREGATIONS,
    METHOD_OPTIMIZERS,
    METHODS,
    StrategyPlan,
    local_optimizer,
    parse_strategy,
)

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "METHOD_OPTIMIZERS",
    "StrategyPlan",
    "local_optimizer",
    "parse_strategy",
]
