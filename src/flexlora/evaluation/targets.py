"""What ``flexlora eval TARGET`` scores: one adapter folder, or a run folder's adapters, and the
base model they go on (``--base``, else the adapters' ``base_model_name_or_path``).

A run folder's ``config.toml`` gives the loading settings (dtype, quantization, device), so
the base is scored as it was trained. An adapter whose modules are missing from the base, or
whose shapes differ, is refused before anything is scored, naming the module. FedEx-LoRA's
adapters are meant for ``W0 + U·S·Vh``: its residual beside them
(``adapters/frozen_delta.safetensors``) is added to the base for them, as the run did.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.config import ModelConfig
from flexlora.errors import UsageError

__all__ = ["EvalTarget", "add_frozen_delta", "check_fits", "load_base", "resolve_target"]

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class EvalTarget:
    """The base model and the adapters to score on it (label -> folder), in order."""

    base: str
    adapters: dict[str, Path] = field(default_factory=dict)
    run_dir: Path | None = None
    model_cfg: ModelConfig | None = None


def _base_of(folder: Path) -> str:
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder / ADAPTER_CONFIG} cannot be read: {exc}") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    return str(base or "")


def _run_model_cfg(run_dir: Path) -> ModelConfig | None:
    if not (run_dir / "config.toml").is_file():
        return None
    from flexlora.config import load_config

    return load_config(run_dir / "config.toml").model


def _rank_key(name: str) -> tuple[int, ...]:
    digits = [int(x) for x in name.removeprefix("rank-").split("-") if x.isdigit()]
    return (*digits, 0) if digits else (10**9,)


def resolve_target(target: str | Path, base: str | None = None) -> EvalTarget:
    """An adapter folder (has adapter_config.json) or a run folder (has adapters/*/)."""
    path = Path(target).expanduser().resolve()
    if (path / ADAPTER_CONFIG).is_file():
        adapters = {path.name: path}
        run_dir = path.parent.parent if path.parent.name == "adapters" else None
    elif (path / "adapters").is_dir():
        found = [p for p in (path / "adapters").iterdir() if (p / ADAPTER_CONFIG).is_file()]
        if not found:
            raise UsageError(f"{path / 'adapters'} holds no adapter folder (adapter_config.json)")
        adapters = {p.name: p for p in sorted(found, key=lambda p: _rank_key(p.name))}
        run_dir = path
    else:
        raise UsageError(
            f"{target} is neither an adapter folder (adapter_config.json) nor a run folder "
            "(adapters/rank-R/)"
        )
    if base is None:
        bases = {name: _base_of(folder) for name, folder in adapters.items()}
        distinct = sorted(set(bases.values()))
        if len(distinct) != 1 or not distinct[0]:
            raise UsageError(
                f"the adapters in {target} name different or no base models ({bases}); "
                "pass --base MODEL"
            )
        base = distinct[0]
    model_cfg = _run_model_cfg(run_dir) if run_dir is not None else None
    return EvalTarget(base=base, adapters=adapters, run_dir=run_dir, model_cfg=model_cfg)


def load_base(target: EvalTarget, device: str | None = None) -> tuple[Any, Any]:
    """The base model and tokenizer, loaded with the run's model settings when known."""
    from flexlora.models import load_model

    cfg = target.model_cfg or ModelConfig()
    cfg = dataclasses.replace(cfg, name=target.base)
    if device is not None:
        # --device puts the whole model there: the run's device_map (auto, or another
        # device) would contradict it, an error about a key this command never set
        cfg = dataclasses.replace(cfg, device=device, device_map="")
    return load_model(cfg)


def check_fits(model: Any, folder: Path, base: str) -> None:
    """Refuse an adapter whose modules or shapes are not those of ``model``."""
    from flexlora.lora.peft_io import load_adapter
    from flexlora.models.targets import is_adaptable, layer_shape

    adapter = load_adapter(folder)
    modules = dict(model.named_modules())
    for name, f in sorted(adapter.factors.items()):
        layer = modules.get(name)
        want = (int(f.B.shape[0]), int(f.A.shape[1]))  # (m, n) of B (m, r) @ A (r, n)
        if layer is None or not is_adaptable(layer):
            what = "has no such module" if layer is None else "has no linear layer there"
            raise UsageError(
                f"adapter {folder} does not match base {base}: the base {what} {name!r} "
                "(pass --base with the model the adapter was trained on)"
            )
        if layer_shape(layer) != want:
            raise UsageError(
                f"adapter {folder} does not match base {base}: module {name} is "
                f"{layer_shape(layer)} (out, in) in the base but {want} in the adapter"
            )


def add_frozen_delta(model: Any, target: EvalTarget) -> Path | None:
    """Add the residual exported beside the adapters (FedEx-LoRA) to ``model``'s base layers.

    Each layer gets a forward hook adding ``x·Vh^T·diag(S)·U^T`` in float32, as the run's
    evaluation did: nothing is written into the weights, on any dtype or quantization.
    Returns the file read, or ``None`` when there is none.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from flexlora.lora.peft_io import FROZEN_DELTA
    from flexlora.lora.products import low_rank_output
    from flexlora.models.targets import layer_shape
    from flexlora.types import GlobalUpdate

    files = sorted({f.parent / FROZEN_DELTA for f in target.adapters.values()})
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    if len(files) > 1:
        raise UsageError(f"the adapters have different residuals beside them: {files}")
    try:
        with safe_open(str(files[0]), "pt") as fh:
            meta = fh.metadata() or {}
        update = GlobalUpdate.from_tensors(load_file(str(files[0])), meta)
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{files[0]} cannot be read: {exc}") from None
    modules = dict(model.named_modules())
    for name, d in update.modules.items():
        layer = modules.get(name)
        want = (int(d.U.shape[0]), int(d.Vh.shape[1]))  # (m, n)
        if layer is None or layer_shape(layer) != want:
            raise UsageError(
                f"{files[0]} does not match base {target.base}: module {name} is "
                f"{'missing' if layer is None else layer_shape(layer)} in the base, {want} there"
            )
        B, A = d.side_factors(next(layer.parameters()).device)  # (m, k), (k, n)

        def add(_m: Any, inputs: tuple, out: Any, A: Any = A, B: Any = B) -> Any:
            return low_rank_output(inputs[0], out, B, A)

        layer.register_forward_hook(add)
    return files[0]
