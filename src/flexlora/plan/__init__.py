"""``flexlora plan``: the memory a run needs on each client and on the server, before loading.

The model is read from its config on the meta device (:mod:`flexlora.plan.shape`), the bytes
come from :mod:`flexlora.plan.memory`, and :func:`format_plan` prints them as tables.
"""

from __future__ import annotations

import re

from flexlora.config import RunConfig
from flexlora.errors import UsageError
from flexlora.methods.compose import parse_strategy
from flexlora.plan.memory import (
    ClientMemory,
    ServerMemory,
    activation_bytes,
    base_weight_bytes,
    client_memory,
    server_memory,
)
from flexlora.plan.shape import ModelShape, model_config, model_shape
from flexlora.schedule import unused_ffn_ranks
from flexlora.simulation.report import markdown_table

__all__ = [
    "ClientMemory",
    "ModelShape",
    "ServerMemory",
    "activation_bytes",
    "base_weight_bytes",
    "client_memory",
    "format_plan",
    "model_config",
    "model_shape",
    "parse_size",
    "server_memory",
]

UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})
UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str) -> int:
    """``24GiB``, ``24 GB``, ``80G`` (= GB), ``512MiB`` or a number of bytes (at least 1 MiB:
    a bare ``24`` is refused, not read as 24 bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    size = int(float(match.group(1)) * UNITS[unit]) if match and unit in UNITS else 0
    if size <= 0:  # an empty or zero size would mark every rank type as not fitting
        raise UsageError(f"--device-memory: {text!r} is not a size like 24GiB, 24GB or 512MiB")
    if not unit and size < 2**20:  # "24": surely not 24 bytes, and GiB or GB is a guess
        raise UsageError(f"--device-memory: {text!r} has no unit: write 24GiB, 24GB or 512MiB")
    return size


def _fmt(n: float, unit: int) -> str:
    return f"{n / unit:,.2f}"


def format_plan(cfg: RunConfig, device_memory: int | None = None) -> str:
    """The plan as text: the model line, the client table by rank type, the server table
    (FlexLoRA's server; another aggregator is said to be not modelled)."""
    shape = model_shape(cfg.model.name, list(cfg.lora.target_modules))
    clients = client_memory(shape, cfg)
    server = server_memory(shape, cfg)
    mc, tc = cfg.model, cfg.client_train()
    biggest = max(c.total(False, all_slots=True) for c in clients)
    unit, uname = (2**30, "GiB") if biggest >= 2**30 else (2**20, "MiB")
    if mc.quantization == "4bit":
        quant = f"4bit {mc.bnb_4bit_quant_type}" + (
            " double-quant" if mc.bnb_4bit_use_double_quant else ""
        )
    else:
        quant = mc.quantization if mc.quantization != "none" else f"dtype {mc.dtype}"
    attention = f"{shape.heads} heads / {shape.kv_heads} kv" if shape.heads else "no attention"
    lines = [
        f"model {mc.name}: {shape.architecture}, {shape.params / 1e9:.3f} B parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{attention}, vocab {shape.vocab}; {quant}",
        f"{len(shape.targets)} adapted modules; micro-batch {tc.batch_size} x {tc.cutoff_len} "
        f"tokens, {tc.optimizer}, precision {tc.precision}, gradient checkpointing "
        f"{'on' if tc.gradient_checkpointing else 'off'} (total uses it)",
        "",
        f"client memory by rank type ({uname}; the simulator also keeps the other types' slots):",
    ]
    header = [
        "rank type",
        "base weights",
        "adapter",
        "gradients",
        "optimizer",
        "activations",
        "activations (checkpointing)",
        "total",
        "simulator (all slots)",
    ]
    if device_memory is not None:
        header.append(f"fits {_fmt(device_memory, unit)} {uname}")
    body = []
    for c in clients:
        row = [
            c.rank_type,
            _fmt(c.base, unit),
            _fmt(c.adapter, unit),
            _fmt(c.gradients, unit),
            _fmt(c.optimizer, unit),
            _fmt(c.activations, unit),
            _fmt(c.activations_checkpointed, unit),
            _fmt(c.total(), unit),
            _fmt(c.total(all_slots=True), unit),
        ]
        if device_memory is not None:
            if c.total(False) <= device_memory:
                row.append("yes")
            elif c.total(True) <= device_memory:
                row.append("with gradient checkpointing")
            else:
                row.append("no")
        body.append(row)
    lines += markdown_table(header, body, rule="---:")
    unused = unused_ffn_ranks(list(shape.targets), cfg.federation.rank_types, cfg.lora.ffn_modules)
    if unused is not None:  # the run warns the same; the table above then plans attention ranks
        lines += ["", f"note: {unused}"]
    if not shape.activations_modelled:
        lines += [
            "",
            f"note: {shape.architecture} is a state-space model: the activations of its "
            "selective scan are not modelled, so the activation and total columns are lower "
            "bounds (train.parallel_clients = auto takes 1 client)",
        ]
    s_unit, s_name = (2**30, "GiB") if server.peak >= 2**30 else (2**20, "MiB")
    fed = cfg.federation
    lines += [
        "",
        f"server memory ({s_name}; {fed.strategy}, keep_rank = {fed.keep_rank}: up to "
        f"{max(server.keep_rank.values())} singular triplets a module; "
        f"{fed.clients_per_round} clients a round):",
    ]
    lines += markdown_table(
        ["item", s_name],
        [
            ["state (U, S, Vh float32)", _fmt(server.state, s_unit)],
            ["accumulators (factor stacks or dense sum)", _fmt(server.accumulators, s_unit)],
            ["checkpoint file", _fmt(server.checkpoint, s_unit)],
            ["peak (old + new state + accumulators)", _fmt(server.peak, s_unit)],
        ],
        rule="---:",
    )
    aggregator = parse_strategy(fed.strategy).aggregator
    if aggregator != "flexlora":
        lines += [
            "",
            f"(the server table is FlexLoRA's; {fed.strategy} aggregates with {aggregator}, "
            "whose server memory flexlora plan does not model)",
        ]
    return "\n".join(lines)
