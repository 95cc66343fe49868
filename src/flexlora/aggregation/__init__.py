"""Aggregation strategies: pure math over client LoRA factors, chosen by name."""

from flexlora.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    check_updates,
    get_aggregator,
    normalize_weights,
    register,
)
from flexlora.aggregation.fedex import FedExLoRA
from flexlora.aggregation.fedit import FedIT
from flexlora.aggregation.fedsa import FedSALoRA
from flexlora.aggregation.ffa import FFALoRA
from flexlora.aggregation.flexlora import FlexLoRA
from flexlora.aggregation.flora import FLoRA
from flexlora.aggregation.hetlora import HetLoRA

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "FFALoRA",
    "FLoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FlexLoRA",
    "HetLoRA",
    "check_updates",
    "get_aggregator",
    "normalize_weights",
    "register",
]
