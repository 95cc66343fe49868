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


class DataError(FlexLoRAError):
    """A data file is malformed or missing.

    ``path`` is the file (or folder), ``line`` the 1-based line when one is known (JSONL record,
    split-file entry, JSON parse position) and ``detail`` what was wrong. The message reads like a
    compiler's: ``path:line: detail``.
    """

    def __init__(self, path: object, detail: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.detail = detail
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {detail}")
