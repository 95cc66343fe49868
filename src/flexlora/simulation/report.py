"""``report.png`` from ``metrics.jsonl``: Rouge-L and training loss by round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexlora.errors import UsageError

__all__ = ["read_metrics", "write_report"]


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{i}: not JSON: {exc}") from None
    return rows


def write_report(folder: str | Path) -> Path:
    """Draw Rouge-L (unseen / seen) and train loss against round into ``folder/report.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(folder)
    strategy = next((r.get("strategy") for r in rows if r.get("strategy")), "")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("rouge_l_unseen", "unseen clients (zero-shot)"),
        ("rouge_l_seen", "seen clients"),
    ):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("Rouge-L (generated text)")
    ax1.set_title(f"{strategy}: Rouge-L")
    ax1.grid(alpha=0.3)
    if ax1.lines:
        ax1.legend()
    pts = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if pts:
        ax2.plot(*zip(*pts, strict=True), marker="o", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("mean local training loss")
    ax2.set_title(f"{strategy}: training loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(folder) / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
