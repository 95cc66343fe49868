"""Base federated methods (initialisation + local training) and how names compose them."""

from flexlora.methods.compose import AGGREGATIONS, METHODS, StrategyPlan, parse_strategy

__all__ = ["AGGREGATIONS", "METHODS", "StrategyPlan", "parse_strategy"]
