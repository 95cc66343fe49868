"""One frozen base model shared by every client; clients differ only in adapter state.

:class:`AdapterHost` wraps the base model once with PEFT and keeps one adapter *slot* per
resource type (rank pattern). A client borrows the slot of its type: its starting factors are
copied in, it trains, its factors are copied out. Memory is one base model plus one adapter
per resource type, whatever the number of clients.

It can also add a global ``ΔW`` to the frozen base weights (FLoRA's clients merge the global
update; evaluation of any strategy's global model does the same) and restore them exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.models.targets import layer_shape
from flexlora.types import GlobalUpdate, LoRAFactors

__all__ = ["AdapterHost"]


def _plain_float(weight: torch.Tensor) -> bool:
    """A weight ΔW can be added to in place: a dense float tensor (not 4-bit / int8 packed)."""
    return (
        weight.dtype.is_floating_point
        and not weight.is_quantized
        and type(weight) in (torch.Tensor, nn.Parameter)
    )


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
        slots: Mapping[str, Mapping[str, int]],
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        if not slots:
            raise UsageError("an adapter host needs at least one slot")
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.dropout = float(dropout)
        self.slot_ranks = {name: dict(ranks) for name, ranks in slots.items()}
        self.peft: PeftModel | None = None
        for name, ranks in self.slot_ranks.items():
            config = LoraConfig(
                r=max(ranks.values()),
                lora_alpha=self.alpha,
                lora_dropout=dropout,
                target_modules=list(target_modules),
                rank_pattern={m: int(r) for m, r in ranks.items()},
                use_rslora=use_rslora,
                bias="none",
                task_type="CAUSAL_LM",
            )
            if self.peft is None:
                with warnings.catch_warnings():
                    # PEFT probes transformers' deprecated `is_gradient_checkpointing`; the
                    # FutureWarning it raises is not the user's to act on
                    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                    self.peft = get_peft_model(model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        assert self.peft is not None
        self.layers: dict[str, LoraLayer] = {
            name: mod
            for name, mod in self.peft.base_model.model.named_modules()
            if isinstance(mod, LoraLayer)
        }
        if not self.layers:
            raise UsageError(
                f"no linear layer of the model matches target_modules={target_modules}"
            )
        for slot, ranks in self.slot_ranks.items():
            missing = set(self.layers) - set(ranks)
            if missing:
                raise UsageError(f"slot {slot}: no rank for modules {sorted(missing)[:3]}")
        for p in self.peft.parameters():
            p.requires_grad_(False)
        self._original: dict[str, torch.Tensor] = {}
        # ΔW kept next to a weight it must not be written into: module -> [(B (m, k), A (k, n))]
        self._side: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.active: str | None = None

    @property
    def model(self) -> PeftModel:
        assert self.peft is not None
        return self.peft

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
        self.model.base_model.set_adapter(slot)
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

    def check(self, slot: str, factors: Mapping[str, LoRAFactors], client: str = "?") -> None:
        """Raise :class:`InvalidUpdateError` unless ``factors`` fit ``slot`` (shapes, scaling)."""
        if slot not in self.slot_ranks:
            raise UsageError(f"unknown adapter slot {slot!r}")
        ranks = self.slot_ranks[slot]
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

    def set_base_delta(self, update: GlobalUpdate | None, *, separate: bool | None = None) -> None:
        """Frozen weights become ``W0 + ΔW`` (``None``: back to ``W0`` exactly).

        ΔW is the update's whole delta (adapter part and frozen part). On a weight that is not
        a plain float tensor (a 4-bit or int8 quantized base), or with ``separate=True``,
        nothing is written into the weight: ΔW stays a float32 low-rank term next to it, in
        its thin factors, added to the layer's output by a forward hook.
        """
        with torch.no_grad():
            for name, layer in self.layers.items():
                base = layer.get_base_layer()
                weight = base.weight
                side = separate if separate is not None else not _plain_float(weight)
                if side or name in self._side:
                    self._set_side_delta(name, base, update if side else None)
                    if side:
                        continue
                if name not in self._original:
                    if update is None:
                        continue
                    self._original[name] = weight.detach().clone()
                original = self._original[name]
                if update is None or name not in update.modules:
                    weight.copy_(original)
                    continue
                delta = update.delta(name, torch.float32).to(weight.device)  # (m, n)
                if getattr(layer, "fan_in_fan_out", False):
                    delta = delta.T
                weight.copy_((original.to(torch.float32) + delta).to(weight.dtype))

    def _set_side_delta(self, name: str, base: nn.Module, update: GlobalUpdate | None) -> None:
        """Keep ``update``'s ΔW of ``name`` as float32 factors added after ``base``'s output."""
        if name not in self._side:
            self._side[name] = []

            def add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                x = inputs[0]
                for B, A in self._side[name]:  # (m, k), (k, n)
                    output = output + ((x.to(torch.float32) @ A.T) @ B.T).to(output.dtype)
                return output

            base.register_forward_hook(add_delta)
        terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        if update is not None and name in update.modules:
            device = base.weight.device
            for part in (update.modules, update.frozen):
                if name in part:
                    d = part[name]
                    B = (d.U.to(torch.float32) * d.S.to(torch.float32)).to(device)  # (m, k)
                    terms.append((B, d.Vh.to(device, torch.float32)))  # (k, n)
        self._side[name] = terms

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the bare (possibly delta-merged) base model."""
        with self.model.disable_adapter():
            yield
