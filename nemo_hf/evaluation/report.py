"""An evaluation report for people: the printed table and the breakdowns' bar charts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .scoring import BREAKDOWNS


def format_report(report: dict, title: str) -> str:
    """The printed report: the convention first, then the metrics (percent), then each breakdown."""
    conv, metrics = report["convention"], report["metrics"]
    lines = [
        f"{title}: {metrics['n_expressions']:,} expressions",
        f"convention: IoU at {conv['resolution']}; {conv['precision']}; {conv['empty']}",
    ]
    if conv["missing_scored_empty"]:
        lines.append(f"missing: {conv['missing_scored_empty']:,} expressions had no prediction and were scored as empty")
    precs = "  ".join(f"{k} {v * 100:.2f}" for k, v in metrics.items() if k.startswith("Prec@"))
    lines.append(f"oIoU {metrics['oIoU'] * 100:.2f}  mIoU {metrics['mIoU'] * 100:.2f}  {precs}")
    for key, rows in report["breakdowns"].items():
        lines.append(f"\nby {BREAKDOWNS[key][0]}:")
        lines.append(f"  {'bucket':<14}{'n':>8}{'oIoU':>9}{'mIoU':>9}")
        for row in rows:
            scores = "".join(f"{row[m] * 100:>9.2f}" if row[m] is not None else f"{'-':>9}" for m in ("oIoU", "mIoU"))
            lines.append(f"  {row['bucket']:<14}{row['n']:>8,}{scores}")
    return "\n".join(lines)


def plot_breakdowns(report: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The breakdowns as bar charts (oIoU and mIoU per bucket, the count under each), one panel per breakdown."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or nemo-hf[mining])") from None
    breakdowns = report["breakdowns"]
    fig, axes = plt.subplots(1, len(breakdowns), figsize=(4.2 * len(breakdowns), 3.8), squeeze=False)
    for ax, (key, rows) in zip(axes[0], breakdowns.items()):
        x = np.arange(len(rows))
        for offset, metric in ((-0.2, "oIoU"), (0.2, "mIoU")):
            ax.bar(x + offset, [100 * (r[metric] or 0) for r in rows], width=0.4, label=metric)
        ax.set_xticks(x, [f"{r['bucket']}\nn={r['n']:,}" for r in rows], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(BREAKDOWNS[key][0], fontsize=9)
    axes[0][0].set_ylabel("%")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
