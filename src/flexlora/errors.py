"""Typed errors. Every input error names the client, the module and what was wrong."""

from __future__ import annotations


class FlexLoRAError(Exception):
    """Base class of every error flexlora raises on purpose."""


class UsageError(FlexLoRAError):
    """The caller asked for something that cannot be done (bad option, bad config key)."""


class InvalidUpdateError(FlexLoRAError):
    """A client's update (or adapter folder) is malformed.

    ``client`` is the client id or folder, ``module`` the adapted module (``None`` when the
    fault is not tied to one), ``reason`` a short machine-readable code (``shape``, ``nonfinite``,
    ``missing_module``, ...) and ``detail`` the human explanation.
    """

    def __init__(self, client: str | None, module: str | None, reason: str, detail: str) -> None:
        self.client = client
        self.module = module
        self.reason = reason
        self.detail = detail
        where = []
        if client is not None:
            where.append(f"client {client!s}")
        if module is not None:
            where.append(f"module {module!s}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {detail} [{reason}]" if prefix else f"{detail} [{reason}]")


class RankError(FlexLoRAError):
    """A rank was asked for that the global state cannot give."""
