"""Federated instruction datasets: readers (Natural Instructions v1/v2, Dolly, JSONL, hub),
seeded partitioners (task, Dirichlet, meta) and the Alpaca prompt template.

The training engine calls :func:`load_federated_dataset` once, then per client
``data.train(cid)`` / ``data.eval(cid)`` / ``data.test(cid)`` and
``render_prompt(example, data.template)``.
"""

from flexlora.data.config import DataConfig
from flexlora.data.loader import load_federated_dataset
from flexlora.data.templates import PromptTemplate, get_template, render_prompt
from flexlora.data.types import ClientSplit, Example, FederatedDataset

__all__ = [
    "ClientSplit",
    "DataConfig",
    "Example",
    "FederatedDataset",
    "PromptTemplate",
    "get_template",
    "load_federated_dataset",
    "render_prompt",
]
