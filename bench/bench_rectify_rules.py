"""TAS's spatial rectifier (``--rectifier tas``, the default) against nemo_hf's whole-word rule (``words``).

No trained CLIP is available here, so the proposals' scores come from a seeded noisy oracle: every proposal
draws N(0, 1) and the target gets ``--signal`` more (about half the plain argmaxes are then right); both rules
see the same scores, without a parse gate (nemo_hf's default without spaCy). Three measurements:

1. language: how many real expressions the two rules read differently (which sides they name), over the
   50 real RefCOCO testA sentences and the 1,984 refer-toolkit sample expressions in /work/shared/realdata;
2. real geometry: those 50 sentences with their detector's proposal boxes (centroid = box centre, target =
   the proposal with the best box IoU with the ground truth); accuracy and mean box IoU per rule;
3. synthetic masks: a seeded synthetic RefCOCO folder, every instance mask a proposal; picks that differ,
   oIoU and mIoU per rule (and with no rectifier).

    python bench/bench_rectify_rules.py [--images 120] [--draws 200] [--signal 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

from nemo_hf.masks import decode_rle
from nemo_hf.zeroshot.crops import centroid
from nemo_hf.zeroshot.scoring import (
    BOTTOM_WORDS,
    LEFT_WORDS,
    RIGHT_WORDS,
    SHORT_LEFT_WORDS,
    SHORT_RIGHT_WORDS,
    TOP_WORDS,
    spatial_rectify,
    spatial_side,
)

REALDATA = Path("/work/shared/realdata/annotations")
RULES = ("none", "words", "tas")


def tas_reading(sentence: str) -> tuple[str | None, str | None]:
    """The (vertical, horizontal) sides TAS's rectifier acts on: substrings, vertical first, left before right."""
    s = sentence.lower()
    named = lambda words: any(w in s for w in words)  # noqa: E731
    vertical = "top" if named(TOP_WORDS) else "bottom" if named(BOTTOM_WORDS) else None
    if vertical == "bottom":
        left, right = named(SHORT_LEFT_WORDS), named(SHORT_RIGHT_WORDS)
    else:
        left, right = named(LEFT_WORDS), named(RIGHT_WORDS)
    return vertical, "left" if left else "right" if right else None


def language(sentences: list[str], label: str) -> None:
    differ = [s for s in sentences if tas_reading(s) != spatial_side(s.lower().split())]
    share = 100 * len(differ) / len(sentences)
    print(f"  {label}: {len(sentences)} expressions, {len(differ)} read differently ({share:.1f}%)"
          + (f", e.g. {differ[:4]}" if differ else ""))  # fmt: skip


def pick(rule: str, scores: np.ndarray, centroids: np.ndarray, sentence: str) -> int:
    if rule == "none":
        return int(np.argmax(scores))
    return spatial_rectify(scores, centroids, sentence, rule=rule)


def min_max(raw: np.ndarray) -> np.ndarray:
    span = raw.max() - raw.min()
    return (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)


def box_iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def real_boxes(rng, draws: int, signal: float) -> None:
    rows = json.loads((REALDATA / "clip-refcoco_testA_refcoco_unc_dets.json").read_text())
    hits, ious, differ, total = {r: 0 for r in RULES}, {r: 0.0 for r in RULES}, 0, 0
    for row in rows:
        boxes = row["pred_boxes"]
        centroids = np.array([[y + h / 2, x + w / 2] for x, y, w, h in boxes])
        iou = np.array([box_iou(b, row["gt_box"]) for b in boxes])
        target = int(np.argmax(iou))
        for _ in range(draws):
            raw = rng.standard_normal(len(boxes))
            raw[target] += signal
            scores = min_max(raw)
            picks = {r: pick(r, scores, centroids, row["sent"]) for r in RULES}
            differ += picks["tas"] != picks["words"]
            total += 1
            for r, k in picks.items():
                hits[r] += k == target
                ious[r] += iou[k]
    print(f"  {len(rows)} sentences x {draws} score draws = {total}; picks that differ (tas vs words): {differ} "
          f"({100 * differ / total:.2f}%)")  # fmt: skip
    for r in RULES:
        print(f"    {r:>5}: accuracy {100 * hits[r] / total:.2f}%, mean box IoU {100 * ious[r] / total:.2f}")


def synthetic(rng, n_images: int, draws: int, signal: float, seed: int) -> None:
    from datasets import load_dataset

    from nemo_hf.folder import build_folder
    from nemo_hf.source.synthetic import make_refer_source
    from nemo_hf.transforms.images import ImageTable

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = make_refer_source(Path(tmp) / "src", n_images=n_images, seed=seed, datasets=("refcoco",))
        folder = build_folder(source, Path(tmp) / "folder", ["refcoco_unc"], mining=None)
        table = ImageTable(load_dataset(str(folder), "images", split="train"))
        expressions = []
        for split in ("train", "val", "testA", "testB"):
            for ref in load_dataset(str(folder), "refcoco_unc", split=split):
                expressions += [(ref["image_id"], ref["ann_id"], s["sent"]) for s in ref["sentences"]]
        images = {}
        for image_id in {e[0] for e in expressions}:
            objects = [o for o in table.objects_of(image_id)]
            masks = [decode_rle(o["mask"]).astype(bool) for o in objects]
            keep = [k for k, m in enumerate(masks) if m.any()]
            images[image_id] = ([objects[k]["ann_id"] for k in keep], np.stack([masks[k] for k in keep]),
                                np.array([centroid(masks[k]) for k in keep]))  # fmt: skip
    inter, union, ious = {r: 0 for r in RULES}, {r: 0 for r in RULES}, {r: [] for r in RULES}
    differ = total = spatial = differ_int = 0
    for image_id, ann_id, sentence in expressions:
        ann_ids, masks, centroids = images[image_id]
        target = ann_ids.index(ann_id)
        truth = masks[target]
        spatial += tas_reading(sentence) != (None, None) or spatial_side(sentence.split()) != (None, None)
        for _ in range(draws):
            raw = rng.standard_normal(len(ann_ids))
            raw[target] += signal
            scores = min_max(raw)
            picks = {r: pick(r, scores, centroids, sentence) for r in RULES}
            differ += picks["tas"] != picks["words"]
            differ_int += picks["tas"] != pick("words", scores, np.trunc(centroids), sentence)
            total += 1
            for r, k in picks.items():
                i, u = int((masks[k] & truth).sum()), int((masks[k] | truth).sum())
                inter[r] += i
                union[r] += u
                ious[r].append(i / u)
    print(f"  {len(expressions)} expressions ({spatial} with a spatial word) over {len(images)} images x {draws} draws "
          f"= {total}; picks that differ (tas vs words): {differ} ({100 * differ / total:.2f}%), "
          f"{differ_int} with TAS's integer centroids in the words rule too")  # fmt: skip
    for r in RULES:
        print(f"    {r:>5}: oIoU {100 * inter[r] / union[r]:.2f}, mIoU {100 * np.mean(ious[r]):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="synthetic source images")
    parser.add_argument("--draws", type=int, default=200, help="score draws per expression")
    parser.add_argument("--signal", type=float, default=1.0, help="the target's score advantage (in noise sd)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    print("1. language (which sides each rule reads)")
    dets = json.loads((REALDATA / "clip-refcoco_testA_refcoco_unc_dets.json").read_text())
    language([row["sent"] for row in dets], "real RefCOCO testA sentences")
    sample = json.loads((REALDATA / "refer_sample_expressions_testA.json").read_text())["predictions"]
    language([row["sent"] for row in sample], "refer sample expressions (testA ref ids)")
    print("2. real sentences and detector boxes, noisy-oracle scores")
    real_boxes(rng, args.draws, args.signal)
    print("3. synthetic RefCOCO masks, noisy-oracle scores")
    synthetic(rng, args.images, max(1, args.draws // 10), args.signal, args.seed)


if __name__ == "__main__":
    main()
