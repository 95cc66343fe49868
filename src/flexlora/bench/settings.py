"""A bench's configs: the layered base (defaults, preset, file, ``--set``), each run's config,
and how two configs are compared (a finished run's against this command's; base-model
evaluations that several seeds can share)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flexlora.bench.layout import RunKey
from flexlora.bench.presets import BenchPreset
from flexlora.config import RunConfig, load_config
from flexlora.config_io import load_toml, to_dict
from flexlora.errors import UsageError

__all__ = [
    "IGNORED_CHANGES",
    "base_config",
    "baseline_fingerprint",
    "config_changes",
    "config_json",
    "run_configs",
]

#: config keys that may differ between a finished run and a repeated command
IGNORED_CHANGES = ("output.dir", "output.progress", "model.threads", "model.device")


def _deep_merge(into: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def base_config(
    config: str | Path | None = None,
    preset: BenchPreset | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Defaults, then the preset's values, then the CONFIG file, then ``--set`` overrides."""
    values = copy.deepcopy(preset.values) if preset is not None else {}
    if config is not None:
        _deep_merge(values, load_toml(config))
    cfg = load_config(None, overrides, values)
    for key in preset.requires if preset is not None else ():
        section, _, name = key.partition(".")
        if not getattr(getattr(cfg, section), name):
            raise UsageError(f"preset {preset.name} needs {key}: pass --set {key}=...")
    return cfg


def run_configs(
    base: RunConfig,
    keys: Sequence[RunKey],
    out: Path,
    jobs: int = 1,
    vary_data: bool = False,
) -> dict[RunKey, RunConfig]:
    """Each run's config: the base with its strategy, distribution, seeds and folder."""
    configs = {}
    for key in keys:
        cfg = copy.deepcopy(base)
        cfg.federation.strategy = key.strategy
        cfg.client_train()  # an optimizer the strategy's method contradicts: refused here
        cfg.federation.distribution = key.distribution
        cfg.federation.seed = key.seed
        if vary_data:
            cfg.data.seed = key.seed
        cfg.eval.at_start = False  # round 0 is evaluated once per seed (the baseline)
        cfg.output.dir = str(key.folder(out))
        cfg.output.progress = False
        if jobs > 1:
            cfg.model.threads = 1
        configs[key] = cfg
    return configs


def config_json(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON values (what ``DONE.json`` records).

    ``train.optimizer`` is the one the clients used (``auto`` resolved by the strategy's
    method), so a run finished before FedAvg trained with SGD is told apart from one now.
    """
    d = json.loads(json.dumps(to_dict(cfg)))
    d["train"]["optimizer"] = cfg.client_train().optimizer
    return d


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and not prefix:
            yield from _flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every key that differs (apart from IGNORED_CHANGES)."""
    before, after = dict(_flatten(saved)), dict(_flatten(current))
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if k not in IGNORED_CHANGES and before.get(k) != after.get(k)
    ]


def baseline_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What the base model's evaluation depends on: model, data and eval settings.

    Generation is greedy, so the federation's seed matters only where it samples the
    evaluation clients (``eval.max_clients``).
    """
    d = config_json(cfg)
    return {
        "model": {k: v for k, v in d["model"].items() if k not in ("threads", "device")},
        "data": d["data"],
        "eval": {k: v for k, v in d["eval"].items() if k not in ("every", "at_start", "patience")},
        "cutoff_len": d["train"]["cutoff_len"],
        "seed": d["federation"]["seed"] if cfg.eval.max_clients else None,
    }
