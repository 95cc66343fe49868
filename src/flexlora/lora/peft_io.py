"""PEFT adapters <-> flexlora types. The only code that parses ``lora_A`` / ``lora_B`` keys.

An adapter folder is PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys look like ``base_model.model.<module>.lora_A.weight`` (A: (r, n)) and ``...lora_B.weight``
(B: (m, r)). Module names in flexlora are the base model's own paths (``<module>`` above), the
names PEFT's ``rank_pattern`` and ``alpha_pattern`` keys are matched against. Pickled
``adapter_model.bin`` files are refused: nothing a client sends is unpickled.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from flexlora.errors import InvalidUpdateError
from flexlora.lora.finite import all_finite
from flexlora.types import LoRAFactors, match_pattern

#: safetensors' names of the float dtypes factors may be stored in
_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}
#: a strategy's frozen part beside exported adapters (FedEx-LoRA's residual: the adapters
#: hold the averaged factors, the base they are used on is W0 + U·S·Vh)
FROZEN_DELTA = "frozen_delta.safetensors"

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterMeta",
    "AdapterReader",
    "LoadedAdapter",
    "factors_from_state_dict",
    "load_adapter",
    "open_adapter",
    "state_dict_from_factors",
    "write_adapter",
    "write_adapters_atomically",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class AdapterMeta:
    """What of ``adapter_config.json`` the math needs, plus the rest to write back."""

    r: int
    lora_alpha: float
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict)

    def alpha_for(self, module: str) -> float:
        key = match_pattern(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def rank_for(self, module: str) -> int:
        key = match_pattern(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    @classmethod
    def from_json(cls, cfg: Mapping[str, Any], source: str) -> AdapterMeta:
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise InvalidUpdateError(
                source, None, "config", f"{ADAPTER_CONFIG}: peft_type is {peft_type}, not LORA"
            )
        for bad in ("use_dora",):
            if cfg.get(bad):
                raise InvalidUpdateError(
                    source, None, "config", f"{ADAPTER_CONFIG}: {bad}=true is not supported"
                )
        try:
            meta = cls(
                r=int(cfg["r"]),
                lora_alpha=float(cfg.get("lora_alpha", 8)),
                rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
                alpha_pattern={
                    str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()
                },
                use_rslora=bool(cfg.get("use_rslora", False)),
                raw=dict(cfg),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidUpdateError(
                source, None, "config", f"{ADAPTER_CONFIG} is not a valid LoRA config: {exc!r}"
            ) from None
        meta.check_values(source)
        return meta

    def check_values(self, source: str) -> None:
        """Refuse ranks that are not positive and alphas that are not positive finite numbers
        (a LoRA scaling of 0, NaN or Inf), naming the config key."""
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}
        alphas = {
            "lora_alpha": self.lora_alpha,
            **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()},
        }
        for key, r in ranks.items():
            if r <= 0:
                raise InvalidUpdateError(
                    source, None, "config", f"{ADAPTER_CONFIG}: {key} must be positive, got {r}"
                )
        for key, alpha in alphas.items():
            if not (math.isfinite(alpha) and alpha > 0):
                raise InvalidUpdateError(
                    source,
                    None,
                    "config",
                    f"{ADAPTER_CONFIG}: {key} must be a positive finite number, got {alpha}",
                )


@dataclass(frozen=True)
class LoadedAdapter:
    source: str
    meta: AdapterMeta
    factors: dict[str, LoRAFactors]


def _module_name(key_module: str) -> str:
    return key_module[len(PEFT_PREFIX) :] if key_module.startswith(PEFT_PREFIX) else key_module


def group_keys(keys: Iterable[str], source: str) -> dict[str, dict[str, str]]:
    """PEFT keys grouped per module: module -> {"A": key, "B": key}; other keys are errors."""
    parts: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _KEY.match(key)
        if match is None:
            raise InvalidUpdateError(
                source,
                None,
                "unsupported_key",
                f"unexpected tensor {key!r}: only lora_A / lora_B weights are supported "
                "(no DoRA, LoRA biases, embeddings or modules_to_save)",
            )
        module = _module_name(match["module"])
        slot = parts.setdefault(module, {})
        if match["which"] in slot:
            raise InvalidUpdateError(source, module, "duplicate", f"two lora_{match['which']}")
        slot[match["which"]] = key
    if not parts:
        raise InvalidUpdateError(source, None, "empty", "the adapter holds no LoRA weights")
    for module, slot in parts.items():
        for which in "AB":
            if which not in slot:
                raise InvalidUpdateError(source, module, "missing_factor", f"no lora_{which}")
    return parts


def check_pair_shapes(
    source: str, module: str, a: Sequence[int], b: Sequence[int], meta: AdapterMeta
) -> None:
    """lora_A (r, n) and lora_B (m, r) shapes, and r as the config declares."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise InvalidUpdateError(
            source,
            module,
            "shape",
            f"lora_A {tuple(a)} and lora_B {tuple(b)} are not (r, n) and (m, r)",
        )
    declared = meta.rank_for(module)
    if a[0] != declared:
        raise InvalidUpdateError(
            source,
            module,
            "rank",
            f"tensors have rank {a[0]} but {ADAPTER_CONFIG} declares r={declared}",
        )


def checked_factors(
    source: str, module: str, A: Tensor, B: Tensor, meta: AdapterMeta
) -> LoRAFactors:
    """One module's factors after the value checks (float dtype, finite)."""
    for which, t in (("A", A), ("B", B)):
        if not t.dtype.is_floating_point:
            raise InvalidUpdateError(source, module, "dtype", f"lora_{which} is {t.dtype}")
        if not all_finite(t):
            raise InvalidUpdateError(
                source, module, "nonfinite", f"lora_{which} holds NaN or Inf values"
            )
    return LoRAFactors(A=A, B=B, alpha=meta.alpha_for(module), use_rslora=meta.use_rslora)


def factors_from_state_dict(
    state: Mapping[str, Tensor], meta: AdapterMeta, source: str
) -> dict[str, LoRAFactors]:
    """Group a PEFT LoRA state dict into factors per module, checking shapes and ranks."""
    out: dict[str, LoRAFactors] = {}
    for module, keys in group_keys(state, source).items():
        A, B = state[keys["A"]], state[keys["B"]]
        check_pair_shapes(source, module, A.shape, B.shape, meta)
        out[module] = checked_factors(source, module, A, B, meta)
    return out


def _open_folder(folder: str | os.PathLike[str]) -> tuple[str, Path, AdapterMeta]:
    """(source, weights file, meta) of an adapter folder, after the folder and config checks."""
    path = Path(folder)
    source = str(folder)
    if not path.is_dir():
        raise InvalidUpdateError(source, None, "missing", "adapter folder does not exist")
    cfg_path = path / ADAPTER_CONFIG
    weights_path = path / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise InvalidUpdateError(source, None, "missing", f"no {ADAPTER_CONFIG} in the folder")
    if not weights_path.is_file():
        hint = ""
        if (path / "adapter_model.bin").exists():
            hint = (
                " (adapter_model.bin is a pickle and is never loaded; re-save the adapter "
                "with safe_serialization=True)"
            )
        raise InvalidUpdateError(source, None, "missing", f"no {ADAPTER_WEIGHTS}{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidUpdateError(
            source, None, "unreadable", f"{ADAPTER_CONFIG} cannot be read: {exc}"
        ) from None
    if not isinstance(cfg, dict):
        raise InvalidUpdateError(source, None, "config", f"{ADAPTER_CONFIG} is not an object")
    return source, weights_path, AdapterMeta.from_json(cfg, source)


def _unreadable(source: str, exc: Exception) -> InvalidUpdateError:
    return InvalidUpdateError(
        source, None, "unreadable", f"{ADAPTER_WEIGHTS} cannot be read: {exc}"
    )


_READ_ERRORS = (OSError, SafetensorError, ValueError, RuntimeError)


def load_adapter(folder: str | os.PathLike[str]) -> LoadedAdapter:
    """Read a PEFT LoRA adapter folder (safetensors only) into factors per module."""
    source, weights_path, meta = _open_folder(folder)
    try:
        state = load_file(str(weights_path))
    except _READ_ERRORS as exc:
        raise _unreadable(source, exc) from None
    return LoadedAdapter(source, meta, factors_from_state_dict(state, meta, source))


@dataclass(frozen=True)
class AdapterReader:
    """An adapter folder opened for reading one module at a time (safetensors ``safe_open``).

    Holds only the config and the file's header (keys, shapes): :meth:`factors` reads one
    module's two tensors when asked, so a server aggregating module by module holds one
    module of each client at most, never whole adapters.
    """

    source: str
    meta: AdapterMeta
    path: Path
    keys: Mapping[str, Mapping[str, str]]  # module -> {"A": key, "B": key}
    shapes: Mapping[str, tuple[int, int]]  # module -> (m, n) of the adapted weight
    dtype: torch.dtype = torch.float32  # the widest float dtype its factors are stored in

    def factors(self, module: str) -> LoRAFactors:
        """The module's factors, value-checked (float dtype, finite)."""
        keys = self.keys[module]
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                A, B = fh.get_tensor(keys["A"]), fh.get_tensor(keys["B"])
        except _READ_ERRORS as exc:
            raise _unreadable(self.source, exc) from None
        return checked_factors(self.source, module, A, B, self.meta)


def open_adapter(folder: str | os.PathLike[str]) -> AdapterReader:
    """Open a PEFT LoRA adapter folder for :class:`AdapterReader` (reads no tensor data).

    The structural checks of :func:`load_adapter` (keys, factor pairs, shapes, declared
    ranks) run here from the header; the value checks when a module is read.
    """
    source, weights_path, meta = _open_folder(folder)
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            slices = {key: fh.get_slice(key) for key in fh.keys()}  # noqa: SIM118
            shapes_of = {key: tuple(sl.get_shape()) for key, sl in slices.items()}
            stored = {_FLOAT_DTYPES.get(sl.get_dtype()) for sl in slices.values()} - {None}
    except _READ_ERRORS as exc:
        raise _unreadable(source, exc) from None
    keys = group_keys(shapes_of, source)
    shapes: dict[str, tuple[int, int]] = {}
    for module, pair in keys.items():
        a, b = shapes_of[pair["A"]], shapes_of[pair["B"]]
        check_pair_shapes(source, module, a, b, meta)
        shapes[module] = (int(b[0]), int(a[1]))
    dtype = functools.reduce(torch.promote_types, stored) if stored else torch.float32
    return AdapterReader(source, meta, weights_path, keys, shapes, dtype)


def state_dict_from_factors(
    factors: Mapping[str, LoRAFactors], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """PEFT's saved-adapter keys for the given factors."""
    out: dict[str, Tensor] = {}
    for module, f in factors.items():
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.A.to(dtype or f.A.dtype).contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.B.to(dtype or f.B.dtype).contiguous()
    return out


def _patterns(values: Mapping[str, float], default: float) -> dict[str, float]:
    """Shortest rank/alpha pattern: by leaf name where consistent, else by full module name."""
    by_leaf: dict[str, set[float]] = {}
    for module, v in values.items():
        by_leaf.setdefault(module.rsplit(".", 1)[-1], set()).add(v)
    out: dict[str, float] = {}
    for module, v in values.items():
        leaf = module.rsplit(".", 1)[-1]
        if len(by_leaf[leaf]) == 1:
            if v != default:
                out[leaf] = v
        elif v != default:
            out[module] = v
    return out


def adapter_config(
    factors: Mapping[str, LoRAFactors], template: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An ``adapter_config.json`` for ``factors``: the template's fields, our ranks and alphas."""
    cfg: dict[str, Any] = {"peft_type": "LORA", "task_type": "CAUSAL_LM"}
    cfg.update(template or {})
    ranks = {m: f.rank for m, f in factors.items()}
    alphas = {m: f.alpha for m, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg["r"] = int(r)
    cfg["lora_alpha"] = float(alpha) if not float(alpha).is_integer() else int(alpha)
    cfg["rank_pattern"] = {k: int(v) for k, v in _patterns(ranks, r).items()}
    cfg["alpha_pattern"] = _patterns(alphas, alpha)
    cfg["use_rslora"] = any(f.use_rslora for f in factors.values())
    if not cfg.get("target_modules"):
        cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in factors})
    cfg["inference_mode"] = True
    return cfg


def write_adapter(
    folder: str | os.PathLike[str],
    factors: Mapping[str, LoRAFactors],
    template: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    readme: str | None = None,
) -> Path:
    """Write a PEFT adapter folder (config + safetensors, and ``readme`` as its README.md
    model card) that ``PeftModel`` loads."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(factors, template)
    save_file(
        state_dict_from_factors(factors, dtype),
        str(path / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if readme is not None:
        (path / "README.md").write_text(readme, encoding="utf-8")
    return path


def write_adapters_atomically(
    out: str | os.PathLike[str],
    adapters: Mapping[str, Mapping[str, LoRAFactors]],
    template: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    cards: Mapping[str, str] | None = None,
    files: Mapping[str, tuple[dict[str, Tensor], dict[str, str]]] | None = None,
) -> list[Path]:
    """Write ``out/<name>/`` for each adapter (with ``cards[name]`` as its README.md) and
    ``out/<file>`` for each of ``files`` (safetensors tensors and metadata), all or nothing;
    returns the adapter folders.

    Everything is written into a temporary folder beside ``out`` first and moved into place
    only once every adapter is on disk, so an error leaves ``out`` as it was.
    """
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        for name, factors in adapters.items():
            write_adapter(staging / name, factors, template, dtype, (cards or {}).get(name))
        for name, (tensors, meta) in (files or {}).items():
            save_file(tensors, str(staging / name), metadata=meta)
        out_path.mkdir(exist_ok=True)
        written = []
        for name in adapters:
            target = out_path / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            written.append(target)
        for name in files or {}:
            os.replace(staging / name, out_path / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
