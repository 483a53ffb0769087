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


def format_split_table(reports: dict[str, dict], title: str) -> str:
    """Several splits of one config as the papers print them: the convention once, then a row per split."""
    first = next(iter(reports.values()))
    conv = first["convention"]
    precs = [k for k in first["metrics"] if k.startswith("Prec@")]
    lines = [f"{title}", f"convention: IoU at {conv['resolution']}; {conv['precision']}; {conv['empty']}"]
    for split, report in reports.items():
        if report["convention"]["missing_scored_empty"]:
            lines.append(f"missing ({split}): {report['convention']['missing_scored_empty']:,} expressions had no "
                         "prediction and were scored as empty")
    lines.append(f"  {'split':<10}{'n':>8}{'oIoU':>8}{'mIoU':>8}" + "".join(f"{p:>10}" for p in precs))
    for split, report in reports.items():
        m = report["metrics"]
        lines.append(f"  {split:<10}{m['n_expressions']:>8,}{m['oIoU'] * 100:>8.2f}{m['mIoU'] * 100:>8.2f}"
                     + "".join(f"{m[p] * 100:>10.2f}" for p in precs))
    lines.append("(each split's breakdowns: --json, or --split with one split)")
    return "\n".join(lines)


def plot_breakdowns(report: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The overall scores (oIoU, mIoU, Prec@X) in the first panel, then each breakdown's oIoU and mIoU per
    bucket with the count under each; three panels a row, fonts readable at the saved size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or nemo-hf[mining])") from None
    breakdowns = report["breakdowns"]
    metrics = report["metrics"]
    columns = 3
    rows = -(-(len(breakdowns) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    colours = {"oIoU": "#3b75af", "mIoU": "#ef8636"}
    overall = axes[0][0]
    names = ["oIoU", "mIoU", *(k for k in metrics if k.startswith("Prec@"))]
    values = [100 * metrics[k] for k in names]
    bars = overall.bar(range(len(names)), values, color=[colours.get(k, "#7f7f7f") for k in names])
    overall.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=10)
    overall.set_xticks(range(len(names)), [k.replace("@", "\n@") for k in names], fontsize=10)
    overall.set_title(f"overall: {metrics['n_expressions']:,} expressions", fontsize=12)
    for ax, (key, rows_) in zip(axes.flat[1:], breakdowns.items()):
        x = np.arange(len(rows_))
        for offset, metric in ((-0.2, "oIoU"), (0.2, "mIoU")):
            ax.bar(x + offset, [100 * (r[metric] or 0) for r in rows_], width=0.4, label=metric, color=colours[metric])
        ax.set_xticks(x, [f"{r['bucket']}\nn={r['n']:,}" for r in rows_], fontsize=10)
        ax.set_title(f"by {BREAKDOWNS[key][0]}", fontsize=11, wrap=True)
    for ax in axes.flat[: len(breakdowns) + 1]:
        ax.set_ylim(0, 105)
        ax.set_ylabel("%", fontsize=10)
        ax.tick_params(axis="y", labelsize=9)
    for ax in axes.flat[len(breakdowns) + 1 :]:
        ax.axis("off")
    axes.flat[1].legend(fontsize=10)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
