"""Strategy names: a base method composed with an aggregation at heterogeneous ranks.

The FlexLoRA paper (Bai et al., 2024, Table 2) treats FlexLoRA as an aggregation that plugs
into existing LoRA-based federated methods. Here the two halves are chosen independently and
written ``METHOD+AGGREGATION``:

- METHOD (how the adapters are initialised and trained locally): ``fedavg``, ``fedit``,
  ``slora``. FedAvg and FedIT aggregate alike (A and B averaged with weights ∝ example
  counts, or the chosen aggregation) and differ in the local optimizer, as in the FlexLoRA
  reference code (``optim = 'sgd' if baseline == 'fedavg' else 'adamw_torch'``): FedAvg
  clients train with SGD, FedIT clients with AdamW. ``slora`` adds SLoRA's sparse first stage
  and SVD initialisation (:mod:`flexlora.methods.slora`) and trains with AdamW, as there.
- AGGREGATION (what the server does with mixed ranks): ``homogeneous`` (FedIT's averaging of A
  and B with every client held to the smallest rank type present: the paper's baselines and
  their "bucket effect"; ``homogeneous-max`` holds everyone to the largest), ``flexlora``,
  ``hetlora``.

**The method fixes the local optimizer.** ``train.optimizer = "auto"`` (the default) takes
the method's (:data:`METHOD_OPTIMIZERS`); an explicit value that contradicts it is refused
(:func:`local_optimizer`) rather than honoured: a row labelled FedAvg is always SGD and one
labelled FedIT always AdamW, and the error names the strategy that trains as asked. The
method implies no learning rate: the reference code passes one ``--local_learning_rate`` to
every baseline, so FedAvg's SGD runs at ``train.lr`` too. Strategies that name no method
(``flora``, ``ffa``, ``fedex``, ``fedsa``) leave ``train.optimizer`` free (``auto``: AdamW).

Today's names keep working: ``flexlora`` is ``fedit+flexlora``, ``hetlora`` is
``fedit+hetlora``, ``fedit-min`` is ``fedit+homogeneous``, ``fedit-max`` is
``fedit+homogeneous-max`` (``fedavg-min`` / ``fedavg-max`` likewise with ``fedavg``); ``fedit``
and ``fedavg`` alone train at one common rank (an error otherwise), with AdamW and SGD;
``flora`` and ``ffa`` are standalone strategies with plain LoRA training; ``slora`` alone is
``slora+homogeneous``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexlora.errors import UsageError

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "METHOD_OPTIMIZERS",
    "OPTIMIZERS",
    "StrategyPlan",
    "local_optimizer",
    "parse_strategy",
]

#: method name as written -> canonical base method
METHODS: dict[str, str] = {"fedavg": "fedavg", "fedit": "fedit", "slora": "slora"}
#: base method -> the local optimizer it trains with (the FlexLoRA reference code's choice)
METHOD_OPTIMIZERS: dict[str, str] = {"fedavg": "sgd", "fedit": "adamw", "slora": "adamw"}
#: values of ``train.optimizer``
OPTIMIZERS = ("auto", "adamw", "sgd")
#: single names that are a method at one common rank (FedIT's averaging, no rank policy)
_ONE_RANK = {"fedit": "fedit", "fedavg": "fedavg"}
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
    "fedavg-min": "fedavg+homogeneous",
    "fedavg-max": "fedavg+homogeneous-max",
    "slora": "slora+homogeneous",
}


@dataclass(frozen=True)
class StrategyPlan:
    """A strategy name as users write it, resolved to a method, an aggregator and a rank policy.

    ``canonical`` names the computation: two names with one canonical form run the same code
    on the same inputs (``fedit+flexlora`` and ``flexlora``; ``fedavg+flexlora`` is another).
    """

    name: str
    aggregator: str
    hold_to: str | None = None  # "min" / "max": every client uses that rank type
    #: "fedavg" / "fedit" (LoRA from the global factors, SGD / AdamW), "slora", or "lora" (a
    #: standalone strategy's own LoRA training, any optimizer)
    method: str = "fedit"
    canonical: str = ""

    @property
    def optimizer(self) -> str | None:
        """The local optimizer the method implies; ``None``: ``train.optimizer`` decides."""
        return METHOD_OPTIMIZERS.get(self.method)

    @property
    def sparse_first(self) -> bool:
        """Whether the run starts with SLoRA's sparse stage."""
        return self.method == "slora"


def parse_strategy(name: str) -> StrategyPlan:
    """Resolve ``METHOD+AGGREGATION``, a legacy single name, or a standalone aggregator name.

    Single names that are neither composed nor legacy (``flora``, ``ffa`` and any other
    registered aggregator) pass through with method ``lora``; the registry rejects unknown
    ones. ``fedit`` and ``fedavg`` alone are FedIT's one-rank averaging with their optimizer.
    """
    written = name.strip()
    composed = _LEGACY.get(written, written)
    if composed in _ONE_RANK:
        return StrategyPlan(written, "fedit", None, _ONE_RANK[composed], composed)
    if "+" not in composed:
        return StrategyPlan(written, composed, None, "lora", composed)
    method, _, aggregation = composed.partition("+")
    if method not in METHODS or aggregation not in AGGREGATIONS:
        raise UsageError(
            f"unknown strategy {name!r}: write METHOD+AGGREGATION with METHOD one of "
            f"{', '.join(METHODS)} and AGGREGATION one of {', '.join(AGGREGATIONS)} "
            "(or a single name: flexlora, hetlora, fedit, fedavg, fedit-min, fedit-max, flora, "
            "ffa, slora)"
        )
    base = METHODS[method]
    aggregator, hold_to = AGGREGATIONS[aggregation]
    return StrategyPlan(written, aggregator, hold_to, base, f"{base}+{aggregation}")


def local_optimizer(strategy: str, optimizer: str) -> str:
    """The optimizer clients of ``strategy`` train with, given ``train.optimizer``.

    ``auto`` takes the method's (SGD for FedAvg, AdamW for FedIT and SLoRA; AdamW for a
    strategy without a method); an explicit value is kept when the method agrees or has no
    say, and refused (``UsageError``) when it contradicts the method.
    """
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"train.optimizer must be auto, adamw or sgd, got {optimizer!r}")
    plan = parse_strategy(strategy)
    implied = plan.optimizer
    if optimizer == "auto":
        return implied or "adamw"
    if implied is None or optimizer == implied:
        return optimizer
    labels = {"fedavg": "FedAvg", "fedit": "FedIT", "slora": "SLoRA"}
    label = labels[plan.method]
    other = {"fedavg": "fedit", "fedit": "fedavg"}.get(plan.method)
    if other is None:
        fix = f"no strategy name trains {label} with {optimizer}"
    else:
        _, plus, aggregation = plan.canonical.partition("+")
        fix = f"write {other}{plus}{aggregation} ({labels[other]}, {optimizer})"
    raise UsageError(
        f"strategy {strategy!r} is {label}, whose clients train with {implied} (as in the "
        f"FlexLoRA reference code); train.optimizer = {optimizer!r} contradicts it: leave "
        f"train.optimizer at 'auto', or {fix}"
    )
