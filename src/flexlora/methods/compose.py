"""Strategy names: a base method composed with an aggregation at heterogeneous ranks.

The FlexLoRA paper (Bai et al., 2024, Table 2) treats FlexLoRA as an aggregation that plugs
into existing LoRA-based federated methods. Here the two halves are chosen independently and
written ``METHOD+AGGREGATION``:

- METHOD (how the adapters are initialised and trained locally): ``fedavg``, ``fedit``,
  ``slora``. FedAvg and FedIT are the *same computation* here: both train LoRA locally from the
  global factors and average with weights ∝ example counts (FedIT, Zhang et al. 2024, is FedAvg
  over LoRA applied to instruction tuning, which is what every method in flexlora does), so
  ``fedavg`` is an alias of ``fedit`` and resolves to the same canonical name. ``slora`` adds
  SLoRA's sparse first stage and SVD initialisation (:mod:`flexlora.methods.slora`).
- AGGREGATION (what the server does with mixed ranks): ``homogeneous`` (FedIT's averaging of A
  and B with every client held to the smallest rank type present: the paper's baselines and
  their "bucket effect"; ``homogeneous-max`` holds everyone to the largest), ``flexlora``,
  ``hetlora``.

Today's names keep working: ``flexlora`` is ``fedit+flexlora``, ``hetlora`` is
``fedit+hetlora``, ``fedit-min`` is ``fedit+homogeneous``, ``fedit-max`` is
``fedit+homogeneous-max``; ``fedit`` (one rank or an error), ``flora`` and ``ffa`` are
standalone strategies with plain LoRA training; ``slora`` alone is ``slora+homogeneous``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexlora.errors import UsageError

__all__ = ["AGGREGATIONS", "METHODS", "StrategyPlan", "parse_strategy"]

#: method name as written -> canonical base method
METHODS: dict[str, str] = {"fedavg": "fedit", "fedit": "fedit", "slora": "slora"}
#: aggregation name as written -> (registered aggregator, rank policy)
AGGREGATIONS: dict[str, tuple[str, str | None]] = {
    "homogeneous": ("fedit", "min"),
    "homogeneous-max": ("fedit", "max"),
    "flexlora": ("flexlora", None),
    "hetlora": ("hetlora", None),
}
#: single-word names of earlier releases -> their composed form
_LEGACY: dict[str, str] = {
    "flexlora": "fedit+flexlora",
    "hetlora": "fedit+hetlora",
    "fedit-min": "fedit+homogeneous",
    "fedit-max": "fedit+homogeneous-max",
    "fedavg-min": "fedit+homogeneous",
    "fedavg-max": "fedit+homogeneous-max",
    "slora": "slora+homogeneous",
}


@dataclass(frozen=True)
class StrategyPlan:
    """A strategy name as users write it, resolved to a method, an aggregator and a rank policy.

    ``canonical`` names the computation: two names with one canonical form run the same code
    on the same inputs (``fedavg+flexlora``, ``fedit+flexlora`` and ``flexlora``).
    """

    name: str
    aggregator: str
    hold_to: str | None = None  # "min" / "max": every client uses that rank type
    method: str = "fedit"  # "fedit" (plain LoRA from the global factors) or "slora"
    canonical: str = ""

    @property
    def sparse_first(self) -> bool:
        """Whether the run starts with SLoRA's sparse stage."""
        return self.method == "slora"


def parse_strategy(name: str) -> StrategyPlan:
    """Resolve ``METHOD+AGGREGATION``, a legacy single name, or a standalone aggregator name.

    Single names that are neither composed nor legacy (``fedit``, ``flora``, ``ffa`` and any
    other registered aggregator) pass through; the registry rejects unknown ones.
    """
    written = name.strip()
    composed = _LEGACY.get(written, written)
    if written == "fedavg":
        composed = "fedit"
    if "+" not in composed:
        return StrategyPlan(written, composed, None, "fedit", composed)
    method, _, aggregation = composed.partition("+")
    if method not in METHODS or aggregation not in AGGREGATIONS:
        raise UsageError(
            f"unknown strategy {name!r}: write METHOD+AGGREGATION with METHOD one of "
            f"{', '.join(METHODS)} and AGGREGATION one of {', '.join(AGGREGATIONS)} "
            "(or a single name: flexlora, hetlora, fedit, fedit-min, fedit-max, flora, ffa, slora)"
        )
    base = METHODS[method]
    aggregator, hold_to = AGGREGATIONS[aggregation]
    return StrategyPlan(written, aggregator, hold_to, base, f"{base}+{aggregation}")
