"""What the mined negatives look like, to choose tau and K: the similarity tau bounds, the chosen
negatives' scores, pool size per sentence, fallbacks.

Reads the negative columns of a refs dataset (``schema.REFS_FEATURES``); rows without mined
negatives (val/test, unmined builds) count as refs but contribute no sentence. On a built folder,
``folder_stats`` adds the distribution tau bounds, from the mining embeddings the folder keeps
(``nemo_hf.folder.embeddings``), and previews another tau without rebuilding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ..folder import embeddings
from ..folder.reading import read_shards, shard_paths
from ..schema import IMAGES_CONFIG

NEGATIVE_COLUMNS = ("sentences", "negatives", "negative_scores", "negative_fallback")
QUANTILES = {"min": 0, "p5": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95, "max": 100}


def _numpy(array, dtype) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(dtype)


def _negative_columns(refs_dataset) -> dict:
    """Per mined sentence: pool size, fallback flag, first score; per negative: score, from a fallback."""
    table = refs_dataset.select_columns(list(NEGATIVE_COLUMNS))
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


def stats_report(stats: dict, unmined: str | None = None) -> str:
    """The stats as a short text report; ``unmined`` says why there are no negatives when it is known."""
    if unmined:
        return f"refs: {stats['refs']}; sentences: {stats['sentences']}\n{unmined}"
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


TAU_COLOUR = "#ff0000"  # the build's tau; drawn without antialiasing, so its pixels are exactly this
PREVIEW_COLOUR = "#ff00ff"  # a previewed tau


@dataclass
class Similarity:
    """The similarity tau bounds, for a seeded sample of training sentences against the pool.

    ``values``: every (sampled sentence, pool image) pair but the sentence's own image: the i2i cosine to
    the sentence's own image (mode i2i) or the t2i cosine (mode t2i). ``tau``: the build's resolved cosine;
    ``preview``: another tau resolved the way the build would have (None when none was asked for).
    """

    mode: str
    values: np.ndarray
    sentences: int
    tau: float
    tau_spec: str
    preview: float | None = None
    preview_spec: str | None = None
    preview_report: str = ""

    def dropped(self, tau: float) -> float:
        """Share of the pairs above ``tau``: what the filter drops (the rule drops cosines > tau)."""
        return float((self.values > tau).mean()) if self.values.size else 0.0


def write_stats(refs_dataset, out_png: str | Path, similarity: Similarity | None = None, unmined: str | None = None) -> str:
    """Compute the stats, draw the plots to ``out_png``, return the text report.

    Panels: the similarity tau bounds with tau as a vertical line and a zoom on the pairs near it (when
    ``similarity`` is given), the chosen negatives' t2i cosines, the negatives kept per sentence. The PNG's ``nemo_hf`` text chunk gives the
    tau panel's pixel box and x range, so a reader (or a test) can map the line back to a cosine.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = _negative_columns(refs_dataset)
    stats = _stats(cols)
    panels = 4 if similarity is not None else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), dpi=100)
    tau_axes = axes[0] if similarity is not None else None
    left, right = axes[-2], axes[-1]
    if similarity is not None:
        _draw_similarity(tau_axes, similarity)
        _draw_tau_zoom(axes[1], similarity)
    scores, from_fallback = cols["scores"], cols["score_fallback"]
    if scores.size:
        bins = np.linspace(scores.min(), scores.max() + 1e-6, 60)
        series = [(scores[~from_fallback], "chosen", "tab:blue"), (scores[from_fallback], "fallback", "tab:red")]
        series = [s for s in series if s[0].size]  # no empty "fallback" entry in the legend
        left.hist([s[0] for s in series], bins=bins, stacked=True, label=[s[1] for s in series],
                  color=[s[2] for s in series])
        left.legend()
        sizes = list(stats["pool_size_counts"])
        right.bar(sizes, list(stats["pool_size_counts"].values()), color="tab:green", width=0.8)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(sizes) == 1:  # one size: a sane axis around it rather than matplotlib's +-0.4 fractions
            right.set_xlim(sizes[0] - 3, sizes[0] + 3)
            right.set_xticks(range(max(0, sizes[0] - 3), sizes[0] + 4))
    else:
        left.text(0.5, 0.5, unmined or "no mined negatives", ha="center", va="center", transform=left.transAxes, wrap=True)
    left.set(title="t2i cosine of chosen negatives", xlabel="cosine", ylabel="negatives")
    right.set(title="negatives kept per sentence", xlabel="negatives kept", ylabel="sentences")
    if unmined:
        figure.suptitle(unmined)
    else:
        figure.suptitle(
            f"{stats['sentences_mined']} mined sentences, {stats['fallback']} fallbacks "
            f"({100 * stats['fallback_rate']:.2f}%)"
        )
    figure.tight_layout()
    figure.canvas.draw()
    geometry = {"pool_xlim": [round(v, 6) for v in right.get_xlim()]}
    if tau_axes is not None:
        x0, y0, x1, y1 = tau_axes.get_window_extent().extents  # display pixels, origin bottom-left
        height = figure.bbox.height
        geometry.update({"tau_axes_px": [x0, height - y1, x1, height - y0], "xlim": list(tau_axes.get_xlim())})
    figure.savefig(out_png, dpi=100, metadata={"nemo_hf": json.dumps(geometry)})
    plt.close(figure)
    report = stats_report(stats, unmined)
    if similarity is not None:
        report += "\n" + similarity_report(similarity)
    return report


def _draw_similarity(ax, sim: Similarity) -> None:
    what = "i2i cosine: pool image vs the sentence's image" if sim.mode == "i2i" else "t2i cosine: sentence vs pool image"
    ax.set(title=f"{what}\n({sim.sentences} sampled training sentences)", xlabel="cosine", ylabel="pairs")
    if not sim.values.size:
        ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
        return
    taus = [sim.tau] + ([sim.preview] if sim.preview is not None else [])
    low, high = min(sim.values.min(), *taus), max(sim.values.max(), *taus)
    pad = 0.06 * (high - low or 1.0)  # tau never on the frame
    ax.hist(sim.values, bins=np.linspace(low, high + 1e-6, 80), color="tab:gray")
    ax.set_xlim(low - pad, high + pad)
    lines = [(sim.tau, sim.tau_spec, TAU_COLOUR, "build")]
    if sim.preview is not None:
        lines.append((sim.preview, sim.preview_spec, PREVIEW_COLOUR, "preview"))
    for value, spec, colour, name in lines:
        label = f"{name} tau {spec} = {value:.4f}: drops {100 * sim.dropped(value):.2f}%"
        ax.axvline(value, color=colour, linewidth=2, antialiased=False, label=label)
    ax.legend(fontsize=8, loc="upper left")


def _draw_tau_zoom(ax, sim: Similarity) -> None:
    """The pairs near tau: the most similar 10% and every tau, so the line is read against the bins it cuts."""
    taus = [sim.tau] + ([sim.preview] if sim.preview is not None else [])
    ax.set(title="zoom: the most similar 10% of pairs", xlabel="cosine", ylabel="pairs")
    if not sim.values.size:
        return
    low = min(float(np.percentile(sim.values, 90)), *taus)
    high = max(float(sim.values.max()), *taus)
    pad = 0.06 * (high - low or 1e-3)
    ax.hist(sim.values[sim.values >= low], bins=np.linspace(low, high + 1e-6, 40), color="tab:gray")
    ax.set_xlim(low - pad, high + pad)
    for value, colour in zip(taus, (TAU_COLOUR, PREVIEW_COLOUR)):
        ax.axvline(value, color=colour, linewidth=2)


def similarity_report(sim: Similarity) -> str:
    what = "i2i cosine of pool images to the sentence's image" if sim.mode == "i2i" else "t2i cosine of pool images"
    lines = [
        f"{what} ({sim.sentences} sampled sentences, {sim.values.size} pairs): "
        + _format(_summary(sim.values.astype(np.float64)), "{:.4f}"),
        f"build tau {sim.tau_spec} = {sim.tau:.4f} drops {100 * sim.dropped(sim.tau):.2f}% of these pairs",
    ]
    if sim.preview is not None:
        lines.append(
            f"preview tau {sim.preview_spec} = {sim.preview:.4f} drops {100 * sim.dropped(sim.preview):.2f}% of these pairs"
        )
        lines.append(sim.preview_report)
    return "\n".join(line for line in lines if line)


def folder_stats(
    folder: str | Path,
    config: str,
    out_png: str | Path,
    split: str = "train",
    tau: float | str | None = None,
    sample: int = 500,
    seed: int = 0,
    json_out: str | Path | None = None,
) -> str:
    """``write_stats`` on a built folder's ``config``/``split``, with the similarity tau bounds drawn from the
    embeddings the folder keeps; ``tau`` previews another bound (a cosine or ``"p<q>"``) without rebuilding.
    Returns the text report; ``json_out`` also writes the numbers as JSON there."""
    from datasets import Dataset

    from ..folder.manifest import BuildReport
    from ..transforms.sampling import check_seed

    seed = check_seed(seed)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample must be a positive integer (sentences drawn for the tau bounds), got {sample!r}")
    folder = Path(folder)
    report = BuildReport.read(folder)
    if config not in report.configs or config == IMAGES_CONFIG:
        known = ", ".join(c for c in report.configs if c != IMAGES_CONFIG)
        raise ValueError(f"{folder}: no refs config {config!r} in this folder (it has {known})")
    if split not in report.configs[config]["splits"]:
        raise ValueError(f"{folder}: {config} has no split {split!r} (it has {', '.join(report.configs[config]['splits'])})")
    refs = Dataset(read_shards(shard_paths(folder, report, config, split), "refs", list(NEGATIVE_COLUMNS)))
    mining = report.configs[config].get("mining")
    if not mining:
        if tau is not None:
            raise ValueError(f"{folder}: {config} was built with --no-mining: there is no tau to preview")
        text = write_stats(refs, out_png, unmined=f"{config} was built with --no-mining: it has no negatives")
        _write_json(json_out, {"folder": str(folder), "config": config, "split": split, "mined": False,
                               **_stats(_negative_columns(refs))})
        return text
    similarity = None
    kept = embeddings.read(folder, config)
    if kept is None:
        if tau is not None:
            raise ValueError(f"{folder}: keeps no mining embeddings (built by an older nemo_hf): rebuild to preview a tau")
    else:
        pool = negative_pool(folder, report, config)
        similarity = _similarity(kept, pool, mining, tau, sample, seed)
    text = write_stats(refs, out_png, similarity)
    from ..mining.refs import shortfall_note

    cols = _negative_columns(refs)
    sizes = cols["sizes"] if split == "train" else np.zeros(0, np.int64)
    note = shortfall_note(sizes, int(mining["top_k"]), int(mining["pool_size"]), float(mining["tau_cosine"])) if sizes.size else None
    numbers = {"folder": str(folder), "config": config, "split": split, "mined": True, "top_k": int(mining["top_k"]),
               "pool_images": int(mining["pool_size"]), **_stats(cols), "shortfall": note}
    if similarity is not None:
        numbers["similarity"] = {
            "mode": similarity.mode, "sampled_sentences": similarity.sentences,
            "pairs": _summary(similarity.values.astype(np.float64)),
            "build_tau": {"spec": similarity.tau_spec, "cosine": similarity.tau, "drops": similarity.dropped(similarity.tau)},
        }
        if similarity.preview is not None:
            numbers["similarity"]["preview_tau"] = {"spec": similarity.preview_spec, "cosine": float(similarity.preview),
                                                    "drops": similarity.dropped(similarity.preview)}
    _write_json(json_out, numbers)
    return f"{text}\n{note}" if note else text


def _write_json(path: str | Path | None, numbers: dict) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(numbers, indent=2, default=float) + "\n")


def negative_pool(folder: Path, report, config: str) -> np.ndarray:
    """Image ids of ``config``'s negative pool (the images config's ``negative_pool_of``)."""
    table = read_shards(shard_paths(folder, report, IMAGES_CONFIG), IMAGES_CONFIG, ["image_id", "negative_pool_of"])
    if "negative_pool_of" not in table.column_names:
        return np.zeros(0, np.int64)
    member = [config in (pools or ()) for pools in table["negative_pool_of"].to_pylist()]
    return np.unique(table["image_id"].to_numpy()[np.asarray(member, dtype=bool)])


def _similarity(kept, pool_ids, mining: dict, tau, sample: int, seed: int) -> Similarity:
    from ..mining.negatives import MiningParams, resolve_tau, select_negatives

    image_ids = np.asarray(kept.image_ids)
    row = {int(i): r for r, i in enumerate(image_ids)}
    pool_rows = np.array([row[int(i)] for i in pool_ids if int(i) in row], dtype=np.int64)
    own_rows = np.array([row[int(i)] for i in kept.sent_image_ids], dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(own_rows), size=min(sample, len(own_rows)), replace=False))
    mode = mining["mode"]
    anchors = kept.images[own_rows[chosen]] if mode == "i2i" else kept.sentences[chosen]
    sims = anchors @ kept.images[pool_rows].T
    values = sims[own_rows[chosen][:, None] != pool_rows[None, :]].astype(np.float32)
    sim = Similarity(mode, values, len(chosen), float(mining["tau_cosine"]), str(mining["tau"]))
    if tau is None:
        return sim
    params = MiningParams(
        tau=tau, top_k=int(mining["top_k"]), mode=mode, seed=int(mining["seed"]), sample_pairs=int(mining["sample_pairs"])
    )
    sim.preview = resolve_tau(params, kept.sentences, own_rows, kept.images, pool_rows)
    sim.preview_spec = str(tau)
    # The sampled sentences mined again at both taus (from the same float16 copies, so like is compared with like).
    picks = {}
    miner_log = logging.getLogger("nemo_hf.mining.negatives")
    level = miner_log.level
    miner_log.setLevel(logging.WARNING)  # its per-search INFO line is build progress, noise in a report
    try:
        for name, cosine in (("build", sim.tau), ("preview", sim.preview)):
            p = MiningParams(tau=float(cosine), top_k=params.top_k, mode=mode)
            picks[name] = select_negatives(kept.sentences[chosen], own_rows[chosen], kept.images, pool_rows, p, threads=1)
    finally:
        miner_log.setLevel(level)
    kept_share = np.mean(
        [
            len(set(picks["build"].negatives(i)[0]) & set(picks["preview"].negatives(i)[0]))
            / max(1, len(picks["build"].negatives(i)[0]))
            for i in range(len(chosen))
        ]
    )
    sim.preview_report = (
        f"on the {len(chosen)} sampled sentences, tau {tau}: {picks['preview'].n_fallback} fallbacks "
        f"(build tau: {picks['build'].n_fallback}); {100 * (1 - kept_share):.1f}% of their negatives would change"
    )
    return sim
