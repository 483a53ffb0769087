"""What the mined negatives look like: score distribution, pool size per sentence, fallbacks.

Reads the negative columns of a refs dataset (``schema.REFS_FEATURES``); rows without mined
negatives (val/test, unmined builds) count as refs but contribute no sentence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

QUANTILES = {"min": 0, "p5": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95, "max": 100}


def _numpy(array, dtype) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(dtype)


def _negative_columns(refs_dataset) -> dict:
    """Per mined sentence: pool size, fallback flag, first score; per negative: score, from a fallback."""
    table = refs_dataset.select_columns(["sentences", "negatives", "negative_scores", "negative_fallback"])
    table = table.with_format("arrow")[:]
    per_sentence = pc.list_flatten(table["negative_scores"])
    sizes = _numpy(pc.list_value_length(per_sentence), np.int64)
    fallback = _numpy(pc.list_flatten(table["negative_fallback"]), bool)
    negatives = _numpy(pc.list_value_length(pc.list_flatten(table["negatives"])), np.int64)
    if len(fallback) != len(sizes) or not np.array_equal(negatives, sizes):
        raise ValueError("negatives, negative_scores and negative_fallback are not aligned per sentence")
    scores = _numpy(pc.list_flatten(per_sentence), np.float64)
    starts = np.cumsum(sizes) - sizes
    return {
        "refs": len(table),
        "refs_mined": int((_numpy(pc.list_value_length(table["negative_fallback"]), np.int64) > 0).sum()),
        "sentences": int(pc.sum(pc.list_value_length(table["sentences"])).as_py() or 0),
        "sizes": sizes,
        "fallback": fallback,
        "scores": scores,
        "score_fallback": np.repeat(fallback, sizes),
        "best": scores[starts[sizes > 0]],
    }


def negative_stats(refs_dataset) -> dict:
    """Counts and distributions of a ``datasets.Dataset`` with the REFS_FEATURES columns."""
    return _stats(_negative_columns(refs_dataset))


def _stats(cols: dict) -> dict:
    mined = len(cols["fallback"])
    sizes, counts = np.unique(cols["sizes"], return_counts=True)
    return {
        "refs": cols["refs"],
        "refs_mined": cols["refs_mined"],
        "sentences": cols["sentences"],
        "sentences_mined": mined,
        "fallback": int(cols["fallback"].sum()),
        "fallback_rate": float(cols["fallback"].mean()) if mined else 0.0,
        "pool_size": _summary(cols["sizes"]),
        "pool_size_counts": {int(size): int(n) for size, n in zip(sizes, counts)},
        "scores": _summary(cols["scores"][~cols["score_fallback"]]),
        "scores_fallback": _summary(cols["scores"][cols["score_fallback"]]),
        "best_score": _summary(cols["best"]),
    }


def _summary(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    out = {"count": int(values.size), "mean": float(values.mean())}
    out.update({name: float(np.percentile(values, q)) for name, q in QUANTILES.items()})
    return out


def stats_report(stats: dict) -> str:
    """The stats as a short text report."""
    lines = [
        f"refs: {stats['refs']} ({stats['refs_mined']} with mined negatives); "
        f"sentences: {stats['sentences']} ({stats['sentences_mined']} mined)"
    ]
    if not stats["sentences_mined"]:
        lines.append("no mined negatives in this dataset (val/test split or an unmined build)")
        return "\n".join(lines)
    lines.append(
        f"fallback sentences (nothing survived the filter): {stats['fallback']} "
        f"({100 * stats['fallback_rate']:.2f}%)"
    )
    lines.append("pool size per sentence: " + _format(stats["pool_size"], "{:.0f}"))
    largest = max(stats["pool_size_counts"])
    smaller = sorted((size, n) for size, n in stats["pool_size_counts"].items() if size < largest)
    if smaller:
        counts = ", ".join(f"{n} with {size}" for size, n in smaller)
        lines.append(f"  sentences with fewer than {largest}: {counts}")
    lines.append("t2i cosine of chosen negatives: " + _format(stats["scores"], "{:.4f}"))
    if stats["scores_fallback"]["count"]:
        lines.append("t2i cosine of fallback negatives: " + _format(stats["scores_fallback"], "{:.4f}"))
    lines.append("best negative per sentence: " + _format(stats["best_score"], "{:.4f}"))
    return "\n".join(lines)


def _format(summary: dict, number: str) -> str:
    if not summary["count"]:
        return "none"
    parts = [f"{name} {number.format(summary[name])}" for name in ("min", "p5", "median", "p95", "max")]
    return f"n={summary['count']}, mean {number.format(summary['mean'])}, " + ", ".join(parts)


def write_stats(refs_dataset, out_png: str | Path) -> str:
    """Compute the stats, draw score and pool-size histograms to ``out_png``, return the text report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = _negative_columns(refs_dataset)
    stats = _stats(cols)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    scores, from_fallback = cols["scores"], cols["score_fallback"]
    if scores.size:
        bins = np.linspace(scores.min(), scores.max() + 1e-6, 60)
        left.hist(
            [scores[~from_fallback], scores[from_fallback]],
            bins=bins,
            stacked=True,
            label=["chosen", "fallback"],
            color=["tab:blue", "tab:red"],
        )
        left.legend()
        right.bar(list(stats["pool_size_counts"]), list(stats["pool_size_counts"].values()), color="tab:green")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        left.text(0.5, 0.5, "no mined negatives", ha="center", va="center", transform=left.transAxes)
    left.set(title="t2i cosine of chosen negatives", xlabel="cosine", ylabel="negatives")
    right.set(title="pool size per sentence", xlabel="negatives kept", ylabel="sentences")
    figure.suptitle(
        f"{stats['sentences_mined']} mined sentences, {stats['fallback']} fallbacks "
        f"({100 * stats['fallback_rate']:.2f}%)"
    )
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return stats_report(stats)
