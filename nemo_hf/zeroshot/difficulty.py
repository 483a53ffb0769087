"""``nemo-hf difficulty``: what a NeMo setting does to a sample, measured with the TAS scorer.

N training sentences are drawn with a seed; each is rendered single, as a random mosaic and as a retrieval
mosaic (the folder's mined negatives) with every object of every tile (``return_objects``). Every object is
a proposal (``instances``), scored by TAS's S (S_v, and N with ``negatives``). Per mode: zero-shot top-1
accuracy (is the target the argmax?), the mean margin (target's S minus the best distractor's, in logit
units), and the mean number of same-category distractors. Harder means lower accuracy and margin; a
retrieval mosaic where a distractor in another tile beats the target by far hints at a false negative
(that tile's image may show what the sentence describes): the worst are listed with their tile ids.
"""

from __future__ import annotations

import numpy as np

from ..transforms.mosaic import NeMoMosaic
from ..transforms.sampling import MODES, check_seed
from .predict import TasPredictor
from .proposals import InstanceProposals

FALSE_NEGATIVES_SHOWN = 10


def sample_sentences(refs, n: int, seed: int) -> list[dict]:
    """``n`` (ref row + ``sentence``, ``sent_id``) rows drawn without replacement with ``seed``; all when fewer."""
    seed = check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    pairs = [(i, j) for i, sentences in enumerate(refs["sentences"]) for j in range(len(sentences))]
    if not pairs:
        raise ValueError("the split has no sentences to sample")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False).tolist())
    rows = []
    for k in chosen:
        i, j = pairs[k]
        row = refs[i]
        sentence = row["sentences"][j]
        rows.append({**row, "sentence": sentence["sent"], "sent_id": int(sentence["sent_id"])})
    return rows


def score_sample(predictor: TasPredictor, out: dict, text_emb: np.ndarray) -> dict | None:
    """Target vs distractors in one rendered sample (objects with RLE masks); None when the target vanished."""
    objects = [o for o in out["objects"] if o["area"] > 0]
    target = [i for i, o in enumerate(objects) if o["is_target"]]
    if not target:
        return None
    target = target[0]
    features = predictor.image_features(np.asarray(out["image"]), objects, f"sample of sentence {out['sent_id']}")
    scores = predictor.scores(features, out["sentence"], text_emb, normalise=False)
    others = [i for i in range(len(objects)) if i != target]
    category = objects[target]["category_id"]
    record = {
        "sent_id": out["sent_id"],
        "ref_id": out["ref_id"],
        "sentence": out["sentence"],
        "mode": out["mode"],
        "tile_image_ids": out["tile_image_ids"],
        "target_tile": objects[target]["tile"],
        "objects": len(objects),
        # crowd regions are proposals but not counted as instances (as in nemo-hf eval's breakdown)
        "same_category_distractors": sum(
            objects[i]["category_id"] == category and not objects[i]["iscrowd"] for i in others
        ),
        "correct": bool(int(np.argmax(scores)) == target),
        "margin": None,
        "best_distractor": None,
    }
    if others:
        best = max(others, key=lambda i: scores[i])
        record["margin"] = float(scores[target] - scores[best])
        record["best_distractor"] = {
            "ann_id": objects[best]["ann_id"],
            "category": objects[best]["category"],
            "tile": objects[best]["tile"],
            "image_id": out["tile_image_ids"][objects[best]["tile"]],
        }
    return record


def measure_difficulty(refs, images, predictor: TasPredictor, samples: int = 200, seed: int = 0,
                       config: str | None = None, output_size: int = 480, progress: bool = True,
                       pool=None) -> dict:  # fmt: skip
    """Per mode: the summary and the per-sample records (see the module docstring); reproducible with ``seed``.
    ``images`` and ``pool`` as ``NeMoMosaic``'s."""
    from .. import progress as progress_lines

    if not isinstance(predictor.proposer, InstanceProposals):
        raise ValueError("the difficulty meter scores every object of every tile: use InstanceProposals")
    rows = sample_sentences(refs, samples, seed)
    text_emb = predictor.encoder.encode_texts([row["sentence"] for row in rows])
    report = {"samples": len(rows), "seed": seed, "modes": {}, **predictor.describe()}
    bar = progress_lines.bar(len(rows) * len(MODES), "difficulty", "sample", disable=not progress)
    for mode in MODES:
        mosaic = NeMoMosaic(images, output_size=output_size, p={mode: 1.0}, seed=seed, config=config, pool=pool,
                            return_arrays=True, return_objects=True, object_masks="rle")  # fmt: skip
        records, vanished = [], 0
        for row, emb in zip(rows, text_emb):
            record = score_sample(predictor, mosaic.render(row), emb)
            bar.update(1)
            if record is None:
                vanished += 1
            else:
                records.append(record)
        report["modes"][mode] = {**summarise(records, mode), "target_vanished": vanished, "records": records}
    bar.close()
    retrieval = [r for r in report["modes"]["retrieval"]["records"] if r["mode"] == "retrieval"]
    report["suspected_false_negatives"] = suspected_false_negatives(retrieval)
    return report


def summarise(records: list[dict], mode: str) -> dict:
    margins = [r["margin"] for r in records if r["margin"] is not None]
    return {
        "scored": len(records),
        "rendered_as_asked": sum(r["mode"] == mode for r in records),  # random/retrieval fall back when they must
        "top1_accuracy": float(np.mean([r["correct"] for r in records])) if records else None,
        "mean_margin": float(np.mean(margins)) if margins else None,
        "mean_same_category_distractors": float(np.mean([r["same_category_distractors"] for r in records])) if records else None,
        "mean_objects": float(np.mean([r["objects"] for r in records])) if records else None,
    }


def suspected_false_negatives(records: list[dict], n: int = FALSE_NEGATIVES_SHOWN) -> list[dict]:
    """Retrieval samples whose best distractor, in another tile, outscores the target the most."""
    beaten = [r for r in records if r["margin"] is not None and r["margin"] < 0
              and r["best_distractor"]["tile"] != r["target_tile"]]  # fmt: skip
    beaten.sort(key=lambda r: r["margin"])
    return [
        {"sent_id": r["sent_id"], "ref_id": r["ref_id"], "sentence": r["sentence"], "margin": r["margin"],
         "tile_image_ids": r["tile_image_ids"], "target_tile": r["target_tile"], **{
             f"distractor_{k}": v for k, v in r["best_distractor"].items()}}
        for r in beaten[:n]
    ]  # fmt: skip


def format_difficulty(report: dict, demo: bool = False) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = []
    if demo:
        lines.append("DEMO MODEL (demo-random): these numbers are MEANINGLESS; use a real CLIP checkpoint.")
    lines += [
        f"difficulty of {report['samples']} training sentences (seed {report['seed']}), TAS scorer "
        f"(instances proposals; negative phrases: {report['negative_phrases']}; margins in logit units, "
        f"scale {report['logit_scale']:g})",
        f"{'mode':<11}{'scored':>7}{'as asked':>9}{'top-1':>8}{'margin':>9}{'same-cat':>10}{'objects':>9}",
    ]
    for mode, m in report["modes"].items():
        lines.append(
            f"{mode:<11}{m['scored']:>7}{m['rendered_as_asked']:>9}{num(m['top1_accuracy'], '.3f'):>8}"
            f"{num(m['mean_margin'], '.2f'):>9}{num(m['mean_same_category_distractors'], '.2f'):>10}"
            f"{num(m['mean_objects'], '.1f'):>9}"
        )
    lines.append("harder: lower top-1 and margin; a good tau/K puts retrieval below random, random below single")
    fns = report["suspected_false_negatives"]
    if fns:
        lines.append(f"suspected false negatives (retrieval; a distractor in another tile beats the target), worst {len(fns)}:")
        for r in fns:
            lines.append(
                f"  sent {r['sent_id']} (ref {r['ref_id']}) margin {r['margin']:.2f}: {r['sentence']!r}; target in tile "
                f"{r['target_tile']}, {r['distractor_category']} (ann {r['distractor_ann_id']}) in tile "
                f"{r['distractor_tile']} = image {r['distractor_image_id']}; tiles {r['tile_image_ids']}"
            )
    return "\n".join(lines)


MODE_COLOURS = {"single": "#55aa88", "random": "#5588cc", "retrieval": "#cc5555"}


def plot_difficulty(report: dict, path, demo: bool = False) -> None:
    """Three bars per metric (single, random, retrieval) and the margin distribution per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    metrics = [("top1_accuracy", "zero-shot top-1 accuracy"), ("mean_margin", "mean margin (target - best distractor)"),
               ("mean_same_category_distractors", "same-category distractors")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colours = {mode: MODE_COLOURS.get(mode, "#888888") for mode in modes}  # one colour per mode in every panel
    for ax, (key, title) in zip(axes, metrics):
        values = [report["modes"][m][key] or 0.0 for m in modes]
        ax.bar(modes, values, color=[colours[m] for m in modes])
        ax.set_title(title, fontsize=9)
    for mode in modes:
        margins = [r["margin"] for r in report["modes"][mode]["records"] if r["margin"] is not None]
        axes[3].hist(margins, bins=20, alpha=0.5, label=mode, color=colours[mode])
    axes[3].axvline(0, color="k", lw=0.8)
    axes[3].set_title("margin distribution", fontsize=9)
    axes[3].legend(fontsize=8)
    title = f"NeMo difficulty, {report['samples']} sentences, seed {report['seed']}"
    fig.suptitle(title + ("  (DEMO MODEL: MEANINGLESS)" if demo else ""), color="red" if demo else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
