"""One frozen base model shared by every client; clients differ only in adapter state.

:class:`AdapterHost` wraps the base model once with PEFT and keeps one adapter *slot* per
resource type (rank pattern). A client borrows the slot of its type: its starting factors are
copied in, it trains, its factors are copied out. Memory is one base model plus one adapter
per resource type, whatever the number of clients.

Nothing ever writes into the frozen base weights (they may be bf16, 4-bit or 8-bit):

- the server's global model is evaluated as one more float32 LoRA adapter
  (:data:`EVAL_ADAPTER`, created or resized to the ranks it is given), active alone
  (:meth:`AdapterHost.global_model`);
- a part of ΔW the clients hold outside their adapters (FLoRA's global update, FedEx-LoRA's
  residual; :meth:`AdapterHost.set_base_delta`) is a frozen float32 low-rank term added to
  the base layer's output by a forward hook, so ``W0 + ΔW`` is exact on any base dtype and
  every trainer that calls the base layer (PEFT's, the batched one) sees it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.lora.products import low_rank_output
from flexlora.models.targets import layer_shape
from flexlora.types import GlobalUpdate, LoRAFactors, lora_scaling

__all__ = ["EVAL_ADAPTER", "SUBRANK_SLOT", "AdapterHost"]

EVAL_ADAPTER = "global-eval"
#: The training slot of a client whose ranks are below its type's (HetLoRA's self-pruning):
#: one adapter, resized to each such client's ranks (:meth:`AdapterHost.fit_slot`).
SUBRANK_SLOT = "client-ranks"


@contextmanager
def _same_targets_as_the_first(peft: PeftModel) -> Iterator[None]:
    """Inside the block, PEFT adds an adapter to the layers its first one adapts.

    On transformers 5 MoE models PEFT rewrites ``target_modules`` that name a projection the
    experts also have (Qwen2-MoE's ``shared_expert.down_proj``) into fused expert *parameters*
    unless every module they match is an ``nn.Linear``; from the second adapter on those
    modules are LoRA wrappers, so it rewrote them and the new adapter missed the layers the
    first one has (PEFT 0.22). Where the first adapter's config kept its targets as modules
    (no ``target_parameters``), that rewrite is skipped for the same targets; elsewhere PEFT
    is left as it is.
    """
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # an older PEFT: no rewrite to skip
        conversion = None
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    first = next(iter(peft.peft_config.values()), None)
    if original is None or first is None or getattr(first, "target_parameters", None):
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


class AdapterHost:
    """PEFT adapter slots on a shared frozen base model.

    Parameters
    ----------
    model:
        The base causal LM (frozen; it is wrapped in place by PEFT).
    target_modules:
        Leaf names of the linear layers to adapt (PEFT's ``target_modules``).
    slots:
        Slot name -> per-module rank for every adapted module.
    alpha, dropout, use_rslora:
        PEFT LoRA settings shared by all slots.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: list[str],
        slots: Mapping[str, Mapping[str, int]] | None = None,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        self.base = model
        self.target_modules = list(target_modules)
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.dropout = float(dropout)
        self.peft: PeftModel | None = None
        self.layers: dict[str, LoraLayer] = {}
        self.slot_ranks: dict[str, dict[str, int]] = {}  # training slots
        self._ranks: dict[str, dict[str, int]] = {}  # every adapter: the slots and the eval one
        # ΔW kept next to the frozen weights: module -> [(B (m, k), A (k, n))], float32
        self._side: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._side_on = True
        self.active: str | None = None
        for name, ranks in (slots or {}).items():
            self.add_slot(name, ranks)

    def add_slot(self, slot: str, ranks: Mapping[str, int]) -> None:
        """A training slot at per-module ``ranks`` (nothing to do if it exists already)."""
        if slot in (EVAL_ADAPTER, SUBRANK_SLOT):
            raise UsageError(f"adapter slot name {slot!r} is reserved")
        if slot in self.slot_ranks:
            if self.slot_ranks[slot] != dict(ranks):
                raise UsageError(f"adapter slot {slot} exists with other ranks")
            return
        self._add(slot, ranks, self.dropout)
        self.slot_ranks[slot] = dict(ranks)

    def _add(self, name: str, ranks: Mapping[str, int], dropout: float) -> None:
        """Add the PEFT adapter ``name`` (float32 factors, frozen) at per-module ``ranks``."""
        ranks = {m: int(r) for m, r in ranks.items()}
        if not ranks or min(ranks.values()) <= 0:
            raise UsageError(f"adapter {name}: ranks must be positive, got {ranks}")
        config = LoraConfig(
            r=max(ranks.values()),
            lora_alpha=self.alpha,
            lora_dropout=dropout,
            target_modules=self.target_modules,
            rank_pattern=ranks,
            use_rslora=self.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        if self.peft is None:
            with warnings.catch_warnings():
                # PEFT probes transformers' deprecated `is_gradient_checkpointing`; the
                # FutureWarning it raises is not the user's to act on
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                try:
                    self.peft = get_peft_model(self.base, config, adapter_name=name)
                except ValueError as exc:  # PEFT refuses a target (Mamba's out_proj, ...)
                    raise UsageError(
                        f"PEFT cannot adapt lora.target_modules={self.target_modules} on "
                        f"{type(self.base).__name__}: {exc}"
                    ) from exc
            self.layers = {
                path: mod
                for path, mod in self.peft.base_model.model.named_modules()
                if isinstance(mod, LoraLayer)
            }
            if not self.layers:
                raise UsageError(
                    f"no linear layer of the model matches target_modules={self.target_modules}"
                )
        else:
            try:
                with _same_targets_as_the_first(self.peft):
                    self.peft.add_adapter(name, config)
            except ValueError as exc:
                if name in self.peft.peft_config:  # whatever PEFT added before refusing
                    self.peft.delete_adapter(name)
                raise UsageError(
                    f"PEFT cannot add adapter {name} for lora.target_modules="
                    f"{self.target_modules} on {type(self.base).__name__}: {exc}"
                ) from exc
            absent = [path for path, layer in self.layers.items() if name not in layer.lora_A]
            if absent:
                self.peft.delete_adapter(name)
                raise UsageError(
                    f"PEFT did not add adapter {name} to {len(absent)} of the layers the first "
                    f"adapter adapts (e.g. {absent[0]}, a {type(self.layers[absent[0]]).__name__})"
                )
        missing = set(self.layers) - set(ranks)
        if missing:
            self.peft.delete_adapter(name)
            raise UsageError(f"adapter {name}: no rank for modules {sorted(missing)[:3]}")
        for layer in self.layers.values():
            # float32 factors over any base dtype or quantization
            layer.lora_A[name].to(torch.float32)
            layer.lora_B[name].to(torch.float32)
        for p in self.peft.parameters():
            p.requires_grad_(False)
        self._ranks[name] = ranks

    def _ensure(self, name: str, ranks: Mapping[str, int], dropout: float = 0.0) -> None:
        """Adapter ``name`` at exactly ``ranks``: created, or deleted and re-added to resize."""
        if self._ranks.get(name) == dict(ranks):
            return
        if name in self._ranks:
            assert self.peft is not None
            self.peft.delete_adapter(name)
            del self._ranks[name]
        self._add(name, ranks, dropout=dropout)

    def fit_slot(self, slot: str, ranks: Mapping[str, int]) -> str:
        """The slot a client of ``slot``'s type trains in at per-module ``ranks``.

        ``slot`` itself at its own ranks; at ranks below them (a client that pruned its rank,
        HetLoRA), :data:`SUBRANK_SLOT`, one more adapter resized to ``ranks`` (with the slots'
        dropout), so the client trains a genuine rank-r adapter with scaling alpha/r. Memory:
        at most one more adapter of the type's size.
        """
        own = self.slot_ranks.get(slot)
        if own is None:
            raise UsageError(f"unknown adapter slot {slot!r}")
        ranks = {m: int(r) for m, r in ranks.items()}
        if ranks == own:
            return slot
        if ranks.keys() != own.keys() or any(not 0 < ranks[m] <= own[m] for m in own):
            raise UsageError(f"ranks {ranks} do not fit adapter slot {slot!r} ({own})")
        self._ensure(SUBRANK_SLOT, ranks, dropout=self.dropout)
        self.slot_ranks[SUBRANK_SLOT] = ranks
        return SUBRANK_SLOT

    @property
    def model(self) -> nn.Module:
        """The PEFT-wrapped model (the bare base while no adapter exists)."""
        return self.peft if self.peft is not None else self.base

    @property
    def modules(self) -> list[str]:
        return list(self.layers)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(m, n) = (out_features, in_features) of every adapted module."""
        out = {}
        for name, layer in self.layers.items():
            out[name] = layer_shape(layer.get_base_layer())
        return out

    def activate(self, slot: str, train_A: bool = True) -> list[nn.Parameter]:
        """Make ``slot`` the active adapter; return its trainable parameters."""
        if slot not in self.slot_ranks:
            raise UsageError(f"unknown adapter slot {slot!r}")
        assert self.peft is not None
        self.peft.base_model.set_adapter(slot)
        params: list[nn.Parameter] = []
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in self.layers.values():
            a = layer.lora_A[slot].weight
            b = layer.lora_B[slot].weight
            a.requires_grad_(train_A)
            b.requires_grad_(True)
            params.extend([a, b] if train_A else [b])
        self.active = slot
        return params

    def weights(self, slot: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(A (r, n), B (m, r))`` of every adapted module in ``slot``: the live parameters."""
        return [
            (layer.lora_A[slot].weight, layer.lora_B[slot].weight) for layer in self.layers.values()
        ]

    def check(self, slot: str, factors: Mapping[str, LoRAFactors], client: str = "?") -> None:
        """Raise :class:`InvalidUpdateError` unless ``factors`` fit ``slot`` (shapes, scaling)."""
        if slot not in self._ranks:
            raise UsageError(f"unknown adapter slot {slot!r}")
        ranks = self._ranks[slot]
        missing = set(self.layers) - set(factors)
        if missing:
            raise InvalidUpdateError(client, sorted(missing)[0], "missing_module", "no factors")
        for name, layer in self.layers.items():
            f = factors[name]
            a = layer.lora_A[slot].weight  # (r, n)
            b = layer.lora_B[slot].weight  # (m, r)
            if (
                f.rank != ranks[name]
                or tuple(f.A.shape) != tuple(a.shape)
                or tuple(f.B.shape) != tuple(b.shape)
            ):
                raise InvalidUpdateError(
                    client,
                    name,
                    "shape",
                    f"factors A{tuple(f.A.shape)} B{tuple(f.B.shape)} do not fit the "
                    f"slot's A{tuple(a.shape)} B{tuple(b.shape)}",
                )
            if abs(f.scaling - self.scaling(slot, name)) > 1e-9 * max(1.0, f.scaling):
                raise InvalidUpdateError(
                    client,
                    name,
                    "alpha",
                    f"factors have scaling {f.scaling}, the slot {layer.scaling[slot]}",
                )

    def check_fit(self, slot: str, factors: Mapping[str, LoRAFactors], client: str = "?") -> None:
        """:meth:`check` for factors at per-module ranks at most ``slot``'s (what
        :meth:`fit_slot` trains): the weight shapes and the scaling alpha/r of their own rank."""
        own = self.slot_ranks.get(slot)
        if own is None:
            raise UsageError(f"unknown adapter slot {slot!r}")
        missing = set(self.layers) - set(factors)
        if missing:
            raise InvalidUpdateError(client, sorted(missing)[0], "missing_module", "no factors")
        if all(factors[name].rank == own[name] for name in self.layers):
            self.check(slot, factors, client)
            return
        for name, layer in self.layers.items():
            f = factors[name]
            shape = (layer.lora_B[slot].weight.shape[0], layer.lora_A[slot].weight.shape[1])
            if f.shape != tuple(shape) or f.rank > own[name]:
                raise InvalidUpdateError(
                    client,
                    name,
                    "shape",
                    f"factors A{tuple(f.A.shape)} B{tuple(f.B.shape)} do not fit slot {slot} "
                    f"(a {shape[0]}x{shape[1]} weight, rank at most {own[name]})",
                )
            want = lora_scaling(self.alpha, f.rank, self.use_rslora)
            if abs(f.scaling - want) > 1e-9 * max(1.0, f.scaling):
                raise InvalidUpdateError(
                    client, name, "alpha", f"factors have scaling {f.scaling}, the slot {want}"
                )

    def scaling(self, slot: str, module: str) -> float:
        """PEFT's LoRA scaling of ``module`` in ``slot`` (alpha / r, or alpha / sqrt r)."""
        return float(self.layers[module].scaling[slot])

    def load(self, slot: str, factors: Mapping[str, LoRAFactors], client: str = "?") -> None:
        """Copy a client's starting factors into ``slot``."""
        self.check(slot, factors, client)
        with torch.no_grad():
            for name, layer in self.layers.items():
                f = factors[name]
                a = layer.lora_A[slot].weight  # (r, n)
                b = layer.lora_B[slot].weight  # (m, r)
                a.copy_(f.A.to(a.dtype))
                b.copy_(f.B.to(b.dtype))

    def read(self, slot: str) -> dict[str, LoRAFactors]:
        """The factors currently in ``slot`` (float32 copies on the CPU, where the server works)."""
        out = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                out[name] = LoRAFactors(
                    A=layer.lora_A[slot].weight.detach().to("cpu", torch.float32).clone(),  # (r, n)
                    B=layer.lora_B[slot].weight.detach().to("cpu", torch.float32).clone(),  # (m, r)
                    alpha=self.alpha,
                    use_rslora=self.use_rslora,
                )
        return out

    def set_base_delta(self, update: GlobalUpdate | None) -> None:
        """The base computes ``W0 + ΔW`` from now on (``None``: ``W0`` again).

        ΔW is the update's whole delta (adapter part and frozen part), kept in its thin
        factors as a float32 term added to each base layer's output by a forward hook: the
        weights themselves are never written, whatever their dtype or quantization, and
        ``W0 + ΔW`` is as exact as float32 (merging into bf16 weights would round a 1e-4
        entry of ΔW by up to a third).
        """
        with torch.no_grad():
            for name, layer in self.layers.items():
                self._set_side_delta(name, layer.get_base_layer(), update)

    def _set_side_delta(self, name: str, base: nn.Module, update: GlobalUpdate | None) -> None:
        """Keep ``update``'s ΔW of ``name`` as float32 factors added after ``base``'s output."""
        if name not in self._side:
            self._side[name] = []

            def add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                if not self._side_on:
                    return output
                for B, A in self._side[name]:  # (m, k), (k, n)
                    output = low_rank_output(inputs[0], output, B, A)
                return output

            base.register_forward_hook(add_delta)
        terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        if update is not None and name in update.modules:
            device = base.weight.device
            for part in (update.modules, update.frozen):
                if name in part:
                    terms.append(part[name].side_factors(device))  # (m, k), (k, n)
        self._side[name] = terms

    @contextmanager
    def global_model(self, factors: Mapping[str, LoRAFactors] | None) -> Iterator[nn.Module]:
        """The model computing ``W0 + s·B·A`` for the global ``factors`` (``None``: ``W0``).

        ``factors`` go into the float32 evaluation adapter, active alone; the term of
        :meth:`set_base_delta` is off meanwhile. The base weights are never touched.
        """
        self._side_on = False
        try:
            if factors is None:
                with self.adapters_disabled():
                    yield self.model
                return
            self._ensure(EVAL_ADAPTER, {m: f.rank for m, f in factors.items()})
            self.load(EVAL_ADAPTER, factors, client="server")
            assert self.peft is not None
            self.peft.base_model.set_adapter(EVAL_ADAPTER)
            for p in self.peft.parameters():
                p.requires_grad_(False)
            self.active = None
            yield self.model
        finally:
            self._side_on = True

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model without adapters (with the :meth:`set_base_delta` term)."""
        with self.peft.disable_adapter() if self.peft is not None else nullcontext():
            yield
