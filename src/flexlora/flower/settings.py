"""Flower's run config (``[tool.flwr.app.config]``, ``--run-config``) -> a flexlora RunConfig.

There is no second config system: a dotted key names a field of the CLI's dataclasses
(``"federation.rounds" = 2`` is ``--set federation.rounds=2``), ``config-file`` names a
flexlora TOML file read first, and the few settings only a Flower driver has live under
``flower.*`` (:class:`FlowerOptions`). Flower values are scalars, so a list or table is
written as a TOML string: ``"lora.target_modules" = "['q_proj', 'v_proj']"``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flexlora.config import RunConfig, load_config
from flexlora.config_io import apply_overrides, from_dict
from flexlora.errors import UsageError

__all__ = [
    "CONFIG_FILE_KEY",
    "FlowerOptions",
    "app_config_toml",
    "load_run_config",
    "to_run_config",
]

CONFIG_FILE_KEY = "config-file"
FLOWER_PREFIX = "flower."


@dataclass
class FlowerOptions:
    """Settings of the Flower drivers that the in-process simulator does not have."""

    num_nodes: int = field(
        default=0,
        metadata={"help": "SuperNodes the ServerApp waits for (0: one per seen client)"},
    )
    wait_nodes: float = field(
        default=300.0, metadata={"help": "seconds to wait for them before giving up"}
    )
    round_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "seconds to wait for a round's replies when federation.client_timeout is 0"
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from output.dir/checkpoint if it exists"}
    )
    pull_interval: float = field(
        default=0.0,
        metadata={
            "help": "seconds between two pulls of a round's replies (0: the Grid's own "
            "pull_interval where it has one, as in Flower's simulation, else 3 s, as Flower's "
            "deployed Grid.send_and_receive)"
        },
    )
    messages_per_call: int = field(
        default=4,
        metadata={
            "help": "round messages pushed, and replies pulled, per Grid call: the server "
            "holds at most this many clients' messages (or replies) at a time"
        },
    )

    def __post_init__(self) -> None:
        if self.num_nodes < 0:
            raise UsageError("flower.num-nodes must be >= 0")
        for name in ("wait_nodes", "round_timeout"):
            if getattr(self, name) <= 0:
                raise UsageError(f"flower.{name.replace('_', '-')} must be positive")
        if self.pull_interval < 0:
            raise UsageError("flower.pull-interval must be >= 0")
        if self.messages_per_call < 1:
            raise UsageError("flower.messages-per-call must be >= 1")


def _is_structured(value: object) -> bool:
    return isinstance(value, str) and value.lstrip()[:1] in ("[", "{")


def load_run_config(
    run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> tuple[RunConfig, FlowerOptions]:
    """Build the run's configuration from Flower's flat ``run_config`` over ``defaults``.

    Order: RunConfig defaults, then ``config-file``, then every dotted key. Unknown keys and
    wrong types are the same errors the CLI gives.
    """
    flat = {**dict(defaults or {}), **dict(run_config)}
    path = flat.pop(CONFIG_FILE_KEY, "") or None
    options: dict[str, Any] = {}
    values: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in flat.items():
        if key.startswith(FLOWER_PREFIX):
            options[key[len(FLOWER_PREFIX) :]] = value
        elif "." not in key:
            raise UsageError(
                f"run config key {key!r} is neither {CONFIG_FILE_KEY!r}, a flower.* option "
                "nor a dotted flexlora key such as 'federation.rounds'"
            )
        elif _is_structured(value):
            overrides.append(f"{key}={value}")  # parsed as TOML, like --set
        else:
            node = values
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    for item in overrides:  # a TOML list or table must parse, not fall back to a string
        parsed = apply_overrides({}, [item])
        if _is_structured(_leaf(parsed)):
            raise UsageError(f"run config {item.partition('=')[0]}: not a valid TOML value")
    cfg = load_config(path, overrides, values)
    return cfg, from_dict(FlowerOptions, options, prefix=FLOWER_PREFIX)


def _leaf(tree: Mapping[str, Any]) -> Any:
    value: Any = tree
    while isinstance(value, Mapping) and len(value) == 1:
        value = next(iter(value.values()))
    return value


def _inline_toml(value: Any) -> str:
    """A list or table as one line of TOML (JSON strings and arrays are valid TOML)."""
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_inline_toml(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline_toml(v) for v in value) + "]"
    return json.dumps(value)


def to_run_config(cfg: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The inverse of :func:`load_run_config`: every field of ``cfg`` as a flat Flower value.

    ``load_run_config(to_run_config(cfg))`` rebuilds ``cfg``; the output can be pasted into
    ``[tool.flwr.app.config]`` or passed as a ServerApp's / ClientApp's defaults.
    """
    out: dict[str, bool | int | float | str] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(to_run_config(value, key + "."))
        elif isinstance(value, (Mapping, list, tuple)):
            out[key] = _inline_toml(value)
        elif value is not None:
            out[key] = value
    return out


def app_config_toml(cfg: Any, options: FlowerOptions | None = None) -> str:
    """Lines for ``[tool.flwr.app.config]`` declaring every key (Flower's ``--run-config``
    overrides only declared keys), one section comment per config table."""

    def line(key: str, value: bool | int | float | str) -> str:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str) and _is_structured(value):
            text = "'" + value + "'"  # a literal string: the TOML inside keeps its quotes
        else:
            text = json.dumps(value)
        return f'"{key}" = {text}'

    flower = {FLOWER_PREFIX[:-1]: options or FlowerOptions()}
    lines = [line(CONFIG_FILE_KEY, "")]
    section = ""
    for key, value in {**_dashed(flower), **to_run_config(cfg)}.items():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"# {section}")
        lines.append(line(key, value))
    return "\n".join(lines) + "\n"


def _dashed(tables: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """``flower.num_nodes`` -> ``flower.num-nodes``: Flower's own spelling of its keys."""
    out: dict[str, bool | int | float | str] = {}
    for name, obj in tables.items():
        for key, value in to_run_config(obj, name + ".").items():
            out[key.replace("_", "-")] = value
    return out
