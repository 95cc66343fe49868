"""Validation of client updates before anything touches the global state.

The server knows what it asked for: which clients are in the round, each one's ranks per
module, each module's shape, and the LoRA alpha and scaling rule every adapter uses. An
update that does not fit is rejected with its reason and the round goes on with the others.
Nothing here mutates an update or the global state.

Each rejection is an :class:`~flexlora.errors.InvalidUpdateError` whose ``reason`` is one of
:data:`REASONS`; the checks run in that order, so an update with several faults reports the
first. Objects that bypassed the constructors' checks (a deserializer, a hostile client) are
checked again: types, 2-D tensors, positive rank.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flexlora.errors import InvalidUpdateError
from flexlora.lora.finite import all_finite
from flexlora.lora.norms import frobenius_norm
from flexlora.types import ClientUpdate, LoRAFactors

__all__ = ["MAX_ABS", "MAX_EXAMPLES", "REASONS", "UpdateValidator", "payload_bytes"]

ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: A client claiming more examples than this would dominate the example-count weights.
MAX_EXAMPLES = 10**9
#: Factor entries above this are refused whatever the norm bound: products of two such
#: entries summed over a rank would overflow float32 in the server step.
MAX_ABS = 1e8
REASONS = (
    "type",  # not a ClientUpdate / LoRAFactors / tensor, or not a dense CPU-readable tensor
    "client_id",  # the client id is not a non-empty string
    "duplicate",  # several updates carry one client id (a round keeps the first one)
    "unknown_client",  # the client is not in this round (or failed / timed out in it)
    "num_examples",  # not an int in [1, MAX_EXAMPLES]
    "metrics",  # metrics are not a mapping of names to finite numbers
    "missing_module",
    "extra_module",
    "ndim",  # a factor is not 2-D
    "dtype",  # not a float dtype the server reads
    "shape",  # A and B disagree on the rank, or do not adapt the module's (m, n)
    "rank",  # above the client's assigned rank for that module
    "alpha",  # lora_alpha is not the run's
    "scaling",  # rsLoRA flag is not the run's (scaling alpha/r vs alpha/sqrt(r))
    "nonfinite",  # NaN or Inf
    "magnitude",  # an entry above MAX_ABS
    "norm",  # ‖s·B·A‖_F not finite, or above the configured bound
)


def _reject(cid: str | None, module: str | None, reason: str, detail: str) -> InvalidUpdateError:
    assert reason in REASONS, reason
    return InvalidUpdateError(cid, module, reason, detail)


def _is_number(x: object) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def payload_bytes(update: object) -> int:
    """Bytes of an update's factors; 0 for anything that is not a well-formed update."""
    try:
        return sum(
            t.numel() * t.element_size()
            for f in update.factors.values()  # type: ignore[attr-defined]
            for t in (f.A, f.B)
        )
    except (AttributeError, TypeError):
        return 0


@dataclass(frozen=True)
class UpdateValidator:
    """Checks updates against the round's expectations.

    Parameters
    ----------
    shapes:
        Module name -> (m, n) of the adapted weight.
    max_norm:
        Reject an update whose ``‖s·B·A‖_F`` exceeds this in any module (0: no bound).
    alpha, use_rslora:
        The run's lora_alpha and scaling rule (``None``: not checked). A client with another
        alpha would scale its ΔW by a factor of its choosing.
    max_examples:
        Largest credible ``num_examples``.
    max_abs:
        Largest credible absolute value of a factor entry.
    """

    shapes: Mapping[str, tuple[int, int]]
    max_norm: float = 0.0
    alpha: float | None = None
    use_rslora: bool | None = None
    max_examples: int = MAX_EXAMPLES
    max_abs: float = MAX_ABS

    def check(self, update: object, expected_ranks: Mapping[str, int] | None) -> None:
        """Raise :class:`InvalidUpdateError` (with client, module, reason) if ``update`` is bad."""
        if not isinstance(update, ClientUpdate):
            raise _reject(
                None, None, "type", f"expected a ClientUpdate, got {type(update).__name__}"
            )
        cid = update.client_id
        if not isinstance(cid, str) or not cid:
            raise _reject(repr(cid), None, "client_id", "client id must be a non-empty string")
        if expected_ranks is None:
            raise _reject(cid, None, "unknown_client", "client is not expected in this round")
        n = update.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= self.max_examples:
            raise _reject(
                cid,
                None,
                "num_examples",
                f"num_examples must be in [1, {self.max_examples}], got {n!r}",
            )
        metrics = update.metrics
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and _is_number(v) for k, v in metrics.items()
        ):
            raise _reject(cid, None, "metrics", "metrics must map names to finite numbers")
        factors = update.factors
        if not isinstance(factors, Mapping):
            raise _reject(
                cid, None, "type", f"factors must be a mapping, got {type(factors).__name__}"
            )
        missing = [m for m in self.shapes if m not in factors]
        if missing:
            raise _reject(cid, missing[0], "missing_module", f"{len(missing)} module(s) missing")
        extra = [m for m in factors if m not in self.shapes]
        if extra:
            raise _reject(cid, str(extra[0]), "extra_module", "module is not adapted here")
        for name in self.shapes:
            self.check_module(cid, name, factors[name], expected_ranks[name])

    def check_module(self, cid: str, name: str, f: object, expected_rank: int) -> None:
        """The checks of one module's factors, in the order of :data:`REASONS`."""
        if not isinstance(f, LoRAFactors):
            raise _reject(cid, name, "type", f"expected LoRAFactors, got {type(f).__name__}")
        pair = (("A", f.A), ("B", f.B))
        for label, t in pair:
            if not isinstance(t, torch.Tensor):
                raise _reject(
                    cid, name, "type", f"lora_{label} is a {type(t).__name__}, not a tensor"
                )
            if t.layout != torch.strided or t.is_meta or t.is_quantized:
                raise _reject(cid, name, "type", f"lora_{label} is not a dense tensor")
        for label, t in pair:
            if t.ndim != 2:
                raise _reject(cid, name, "ndim", f"lora_{label} has {t.ndim} dimensions, not 2")
        for label, t in pair:
            if t.dtype not in ALLOWED_DTYPES:
                raise _reject(cid, name, "dtype", f"lora_{label} has dtype {t.dtype}")
        m, n = self.shapes[name]
        r = int(f.A.shape[0])
        if r < 1 or f.B.shape[1] != r or f.B.shape[0] != m or f.A.shape[1] != n:
            raise _reject(
                cid,
                name,
                "shape",
                f"B {tuple(f.B.shape)} / A {tuple(f.A.shape)} do not adapt a {m}x{n} weight",
            )
        if r > expected_rank:
            raise _reject(
                cid, name, "rank", f"rank {r} is above the client's assigned rank {expected_rank}"
            )
        alpha = f.alpha
        if not _is_number(alpha) or alpha <= 0:
            raise _reject(
                cid, name, "alpha", f"lora_alpha must be a positive number, got {alpha!r}"
            )
        if self.alpha is not None and not math.isclose(alpha, self.alpha, rel_tol=1e-6):
            raise _reject(
                cid, name, "alpha", f"lora_alpha {alpha:g} is not the run's {self.alpha:g}"
            )
        if not isinstance(f.use_rslora, bool) or (
            self.use_rslora is not None and f.use_rslora != self.use_rslora
        ):
            rule = "alpha/sqrt(r)" if self.use_rslora else "alpha/r"
            raise _reject(
                cid, name, "scaling", f"use_rslora={f.use_rslora!r}; the run scales by {rule}"
            )
        for label, t in pair:
            if not all_finite(t):
                raise _reject(cid, name, "nonfinite", f"lora_{label} holds NaN or Inf values")
        for label, t in pair:
            if t.numel():  # the extremes in one pass, no |t| temporary
                low, high = torch.aminmax(t)
                peak = max(-float(low), float(high))
            else:
                peak = 0.0
            if peak > self.max_abs:
                raise _reject(
                    cid,
                    name,
                    "magnitude",
                    f"lora_{label} has an entry of {peak:.3g} > {self.max_abs:.3g}",
                )
        norm = frobenius_norm(f)
        if not math.isfinite(norm):
            raise _reject(cid, name, "norm", "||s*B*A||_F overflows")
        if self.max_norm > 0 and norm > self.max_norm:
            raise _reject(
                cid,
                name,
                "norm",
                f"||s*B*A||_F = {norm:.4g} exceeds the bound {self.max_norm:.4g}",
            )
