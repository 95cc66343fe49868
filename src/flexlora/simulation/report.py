"""``report.png`` from ``metrics.jsonl`` (Rouge-L and loss by round), and Markdown tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.errors import UsageError

__all__ = ["format_table", "markdown_table", "read_metrics", "write_report"]

TABLE_COLUMNS = (
    ("round", "round", "{}"),
    ("clients", "clients", "{}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("rouge_l_unseen", "Rouge-L unseen", "{:.4f}"),
    ("rouge_l_seen", "Rouge-L seen", "{:.4f}"),
    ("seconds_train", "train s", "{:.1f}"),
    ("seconds_aggregate", "aggregate s", "{:.3f}"),
    ("seconds_eval", "eval s", "{:.1f}"),
    ("bytes_up", "up MiB", "{:.2f}"),
    ("bytes_down", "down MiB", "{:.2f}"),
)


def markdown_table(
    header: Sequence[str], body: Sequence[Sequence[str]], rule: str = " --- "
) -> list[str]:
    """The lines of a Markdown table; ``rule`` is each column's separator cell (``---:``
    aligns right)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the per-round metrics (the columns any row has)."""
    cols = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            value = r.get(key)
            if key == "clients" and isinstance(value, list):
                value = len(r.get("aggregated", value)) if value else None
            if key.startswith("bytes_") and value is not None:
                value = value / 2**20
            cells.append("" if value is None else fmt.format(value))
        body.append(cells)
    return "\n".join(markdown_table([title for _, title, _ in cols], body, rule="---:"))


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
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(folder)
    strategy = next((r.get("strategy") for r in rows if r.get("strategy")), "")
    energy = any(r.get("energy_kept") for r in rows)
    fig, axes = plt.subplots(1, 3 if energy else 2, figsize=(15 if energy else 10, 4))
    ax1, ax2 = axes[0], axes[1]
    if energy:
        plot_rank_energy(axes[2], rows, strategy)
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
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(folder) / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_rank_energy(ax: Any, rows: list[dict[str, Any]], strategy: str) -> None:
    """Per rank type: share of ‖ΔW‖² it receives (solid) and of its clients' own updates that
    survive redistribution (dashed); the effective rank of ΔW in the title."""
    types = sorted({t for r in rows for t in (r.get("energy_kept") or {})}, key=_type_order)
    for i, t in enumerate(types):
        color = f"C{i}"
        pts = [
            (r["round"], r["energy_kept"][t])
            for r in rows
            if (r.get("energy_kept") or {}).get(t) is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=f"rank {t}: ΔW kept")
        pts = [
            (r["round"], r["update_survival"][t])
            for r in rows
            if t in (r.get("update_survival") or {})
        ]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                marker="x",
                ls="--",
                color=color,
                label=f"rank {t}: own update",
            )
    eff = [r["effective_rank"] for r in rows if r.get("effective_rank") is not None]
    suffix = f" (effective rank of ΔW {eff[-1]:.1f})" if eff else ""
    ax.set_xlabel("round")
    ax.set_ylabel("fraction of ‖·‖²_F (ΔW) / of ‖·‖_F (own)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{strategy}: rank energy{suffix}", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def _type_order(t: str) -> tuple[int, str]:
    """Rank types by their first number ("8" < "30" < "30-200" < "200")."""
    head = t.split("-")[0]
    return (int(head) if head.isdigit() else 0, t)
