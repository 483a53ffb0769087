"""Scoring a predictions file on a split, with scores broken down by how hard each expression is.

The NeMo paper's observation is that models fail on hard referring cases: several objects of the same
kind, long expressions. So besides oIoU / mIoU / Prec@X (`nemo_hf.evaluation.metrics`) every expression falls in
one bucket of each breakdown (`BREAKDOWNS`), and each bucket gets its count and its oIoU / mIoU.

Masks are compared in RLE space with pycocotools (area and intersection of two RLEs), never decoded:
memory stays O(expressions), whatever the split's size, and a split of 10k expressions scores in the
time its RLEs take to decode. Convention: each image's original resolution; Prec@X counts ``IoU >= X``
(LAVT, CARIS) or ``> X`` with ``strict`` (CRIS, TAS); an expression whose prediction and ground truth
are both empty scores ``empty_iou`` (0 by default).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from ..masks import rle_problem
from ..schema import IMAGES_CONFIG
from ..transforms.sampling import SPATIAL_WORDS
from .metrics import RISMetrics
from .predictions import read_predictions

EVAL_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's limits, on the ground-truth mask's pixels at original size
# breakdown -> (title, bucket names); the buckets of a breakdown partition the split
BREAKDOWNS = {
    "same_category": ("instances of the target's category in the image", ("1", "2", "3-4", "5+")),
    "length": ("expression length in words", ("1-2", "3-5", "6-9", "10+")),
    "spatial_words": ("expression has spatial words", ("yes", "no")),
    "supercategory": ("target's COCO supercategory", ()),  # the names the split holds
    "area": ("target area (COCO: small < 32^2 px, large >= 96^2)", ("small", "medium", "large")),
}
MAX_NAMED = 10  # ids named per kind of problem in an error message


class EvaluationError(ValueError):
    """The predictions do not match the split: missing, unknown or duplicate sent_ids, wrong-size masks."""


@dataclass
class Expressions:
    """Every expression of a split (sorted by ``sent_id``): its ground truth and its bucket in each breakdown."""

    sent_ids: np.ndarray  # int64, sorted
    gt: list  # COCO RLE with bytes counts, as pycocotools takes it
    gt_area: np.ndarray  # int64
    buckets: dict[str, np.ndarray]  # breakdown -> bucket index per expression
    names: dict[str, tuple[str, ...]]  # breakdown -> bucket names

    def __len__(self) -> int:
        return len(self.sent_ids)

    @classmethod
    def from_tables(cls, refs: pa.Table, images: pa.Table, where: str = "the split") -> "Expressions":
        """From a refs split (ref_id, ann_id, image_id, category_id, sentences, mask) and the images config
        (image_id, objects)."""
        if "objects" not in images.column_names:
            raise ValueError(
                f"{where}: the images config has no 'objects' column (a folder built by an older nemo_hf), so the "
                "difficulty breakdowns cannot be computed: rebuild it with `nemo-hf build`"
            )
        same_category, supercategory = _object_facts(images, refs)
        sent_ids, gt, gt_area, n_same, words, spatial, supers = [], [], [], [], [], [], []
        columns = refs.select(["ann_id", "image_id", "category_id", "sentences", "mask"]).to_pylist()
        for ref in columns:
            problem = rle_problem(ref["mask"])
            if problem:  # pycocotools would read past a damaged one
                raise ValueError(f"{where}: ann {ref['ann_id']}: the ground-truth mask is unreadable ({problem})")
            rle = {"size": [int(v) for v in ref["mask"]["size"]], "counts": ref["mask"]["counts"].encode("ascii")}
            area = int(mask_utils.area(rle))
            same = max(1, same_category.get((ref["image_id"], ref["category_id"]), 0))
            for sentence in ref["sentences"]:
                tokens = list(sentence.get("tokens") or []) or str(sentence.get("sent", "")).split()
                sent_ids.append(int(sentence["sent_id"]))
                gt.append(rle)
                gt_area.append(area)
                n_same.append(same)
                words.append(len(tokens))
                spatial.append(any(t.lower() in SPATIAL_WORDS for t in tokens))
                supers.append(supercategory.get(ref["ann_id"]) or "unknown")
        order = np.argsort(np.asarray(sent_ids, dtype=np.int64), kind="stable")
        sorted_ids = np.asarray(sent_ids, dtype=np.int64)[order]
        duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if duplicated.size:
            raise ValueError(f"{where}: sent_id {int(duplicated[0])} appears twice in the ground truth")
        super_names = tuple(sorted(set(supers)))
        raw = {
            "same_category": np.digitize(n_same, [2, 3, 5]),
            "length": np.digitize(words, [3, 6, 10]),
            "spatial_words": np.where(spatial, 0, 1),
            "supercategory": np.asarray([super_names.index(s) for s in supers], dtype=np.int64),
            "area": np.digitize(gt_area, [SMALL_AREA, LARGE_AREA]),
        }
        names = {key: BREAKDOWNS[key][1] or super_names for key in BREAKDOWNS}
        return cls(
            sent_ids=sorted_ids,
            gt=[gt[i] for i in order],
            gt_area=np.asarray(gt_area, dtype=np.int64)[order],
            buckets={key: np.asarray(values, dtype=np.int64)[order] for key, values in raw.items()},
            names=names,
        )

    @classmethod
    def from_datasets(cls, refs, images) -> "Expressions":
        """From a refs split ``Dataset`` and the images config's ``Dataset`` (only two of its columns are read)."""
        refs_table = refs.select_columns(["ann_id", "image_id", "category_id", "sentences", "mask"]).with_format("arrow")[:]
        columns = [c for c in ("image_id", "objects") if c in images.column_names]
        return cls.from_tables(refs_table, images.select_columns(columns).with_format("arrow")[:])

    def positions(self, sent_ids) -> np.ndarray:
        """Row of each sent_id; KeyError naming the first unknown one."""
        sent_ids = np.asarray(sent_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sent_ids, sent_ids), len(self.sent_ids) - 1)
        unknown = self.sent_ids[pos] != sent_ids
        if unknown.any():
            raise KeyError(f"sent_id {int(sent_ids[unknown][0])} is not an expression of this split")
        return pos


def _object_facts(images: pa.Table, refs: pa.Table) -> tuple[dict, dict]:
    """(image_id, category_id) -> non-crowd instances of that category; ann_id -> supercategory.
    Computed column-wise over the flattened objects of the split's images only."""
    wanted = pa.array(np.unique(refs.column("image_id").to_numpy()))
    images = images.filter(pc.is_in(images.column("image_id"), value_set=wanted)).combine_chunks()
    objects = images.column("objects").combine_chunks()
    flat = objects.flatten()
    if len(flat) == 0:
        return {}, {}
    image_ids = images.column("image_id").to_numpy()[pc.list_parent_indices(objects).to_numpy()]
    category = flat.field("category_id").to_numpy(zero_copy_only=False)
    crowd = flat.field("iscrowd").to_numpy(zero_copy_only=False).astype(bool)
    keys, counts = np.unique(np.stack([image_ids[~crowd], category[~crowd]]), axis=1, return_counts=True)
    same = {(int(i), int(c)): int(n) for (i, c), n in zip(keys.T, counts)}
    ann_ids = flat.field("ann_id").to_numpy(zero_copy_only=False)
    is_target = np.isin(ann_ids, refs.column("ann_id").to_numpy())
    supers = flat.field("supercategory").filter(pa.array(is_target)).to_pylist()
    return same, dict(zip(ann_ids[is_target].tolist(), supers))


class _Problems:
    """What is wrong with a predictions file, a few ids named per kind, all counted."""

    def __init__(self):
        self.kinds: dict[str, list] = {}
        self.counts: dict[str, int] = {}

    def add(self, kind: str, detail) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        named = self.kinds.setdefault(kind, [])
        if len(named) < MAX_NAMED:
            named.append(detail)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def message(self, path) -> str:
        lines = [f"{path}: the predictions do not match the split"]
        for kind, named in self.kinds.items():
            more = self.counts[kind] - len(named)
            lines.append(f"  {self.counts[kind]} {kind}: " + "; ".join(str(d) for d in named) + (f"; ... {more} more" if more else ""))
        return "\n".join(lines)


def score_predictions(
    expressions: Expressions, predictions: Iterable[tuple[int, Mapping, str]], allow_missing: bool = False,
    source: str = "predictions",
) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Per-expression (intersections, unions) from (sent_id, RLE, where) rows, and how many were missing.

    Every sent_id of the split must come exactly once with a mask of its image's size; otherwise an
    `EvaluationError` names the problems. ``allow_missing`` scores a missing one as an empty prediction.
    """
    n = len(expressions)
    inter = np.zeros(n, dtype=np.int64)
    union = expressions.gt_area.copy()
    seen = np.zeros(n, dtype=bool)
    problems = _Problems()
    for sent_id, mask, where in predictions:
        pos = int(np.searchsorted(expressions.sent_ids, sent_id))
        if pos >= n or expressions.sent_ids[pos] != sent_id:
            problems.add("unknown sent_id(s), not in the split", f"{sent_id} ({where})")
            continue
        if seen[pos]:
            problems.add("duplicate sent_id(s)", f"{sent_id} ({where})")
            continue
        seen[pos] = True
        gt = expressions.gt[pos]
        size = [int(v) for v in mask["size"]]
        if size != gt["size"]:
            problems.add(
                "mask(s) not at the image's size",
                f"sent_id {sent_id} is {size[0]}x{size[1]} (h x w), its image {gt['size'][0]}x{gt['size'][1]}",
            )
            continue
        problem = rle_problem(mask)
        if problem:
            problems.add("unreadable mask(s)", f"sent_id {sent_id} ({where}): {problem}")
            continue
        pred = {"size": size, "counts": mask["counts"].encode("ascii")}
        i = int(mask_utils.area(mask_utils.merge([pred, gt], intersect=True)))
        inter[pos] = i
        union[pos] = int(mask_utils.area(pred)) + int(expressions.gt_area[pos]) - i
    missing = int(n - seen.sum())
    if missing and not allow_missing:
        for sent_id in expressions.sent_ids[~seen][:MAX_NAMED]:
            problems.add("missing sent_id(s) (--allow-missing scores them as empty predictions)", int(sent_id))
        problems.counts["missing sent_id(s) (--allow-missing scores them as empty predictions)"] = missing
    if problems:
        raise EvaluationError(problems.message(source))
    return inter, union, missing


def breakdown_scores(
    expressions: Expressions, positions: np.ndarray, inter: np.ndarray, union: np.ndarray, **metric_options
) -> dict[str, list[dict]]:
    """Per breakdown, per bucket: ``{"bucket", "n", "oIoU", "mIoU"}`` (None where a bucket is empty).

    ``positions`` are the expressions' rows (`Expressions.positions`); the counts of each breakdown add up to
    ``len(positions)``.
    """
    out = {}
    for key, names in expressions.names.items():
        bucket_of = expressions.buckets[key][positions]
        rows = []
        for b, name in enumerate(names):
            chosen = bucket_of == b
            entry = {"bucket": name, "n": int(chosen.sum()), "oIoU": None, "mIoU": None}
            if entry["n"]:
                metrics = RISMetrics(**metric_options)
                metrics.add_counts(inter[chosen], union[chosen])
                result = metrics.compute()
                entry["oIoU"], entry["mIoU"] = result["oIoU"], result["mIoU"]
            rows.append(entry)
        out[key] = rows
    return out


def convention(strict: bool, empty_iou: float, thresholds: Sequence[float] = EVAL_THRESHOLDS) -> dict:
    return {
        "resolution": "each image's original size",
        "precision": f"Prec@X counts IoU {'>' if strict else '>='} X" + (" (CRIS, TAS)" if strict else " (LAVT, CARIS)"),
        "empty": f"an expression whose prediction and ground truth are both empty scores IoU {empty_iou:g}",
        "thresholds": [float(t) for t in thresholds],
    }


def evaluate_predictions(
    expressions: Expressions, predictions_path: str | os.PathLike, *, strict: bool = False,
    empty_iou: float = 0.0, allow_missing: bool = False, thresholds: Sequence[float] = EVAL_THRESHOLDS,
) -> dict:  # fmt: skip
    """The report `nemo-hf eval` prints and writes as JSON: convention, metrics, breakdowns."""
    if empty_iou not in (0, 1):
        raise ValueError(f"empty_iou must be 0 or 1, got {empty_iou}")
    inter, union, missing = score_predictions(
        expressions, read_predictions(predictions_path), allow_missing=allow_missing, source=str(predictions_path)
    )
    options = {"thresholds": thresholds, "strict": strict, "empty_iou": float(empty_iou)}
    metrics = RISMetrics(**options)
    metrics.add_counts(inter, union)
    positions = np.arange(len(expressions))
    return {
        "predictions": str(predictions_path),
        "convention": {**convention(strict, empty_iou, thresholds), "missing_scored_empty": missing},
        "metrics": metrics.compute(),
        "breakdowns": breakdown_scores(expressions, positions, inter, union, **options),
    }


def split_tables(folder: str | os.PathLike, config: str, split: str) -> tuple[pa.Table, pa.Table]:
    """The refs split and the images config of a folder written by `nemo-hf build`, only the columns scoring reads
    (the images' JPEG bytes are never read), from the shards the manifest names inside the folder, their
    types and ids cross-checked (`nemo_hf.folder.reading.check_refs`) before anything is scored."""
    from ..folder.manifest import BuildReport
    from ..folder.reading import check_refs, read_shards, shard_paths

    folder = Path(folder)
    report = BuildReport.read(folder)
    if config == IMAGES_CONFIG:
        built = ", ".join(c for c in report.configs if c != IMAGES_CONFIG)
        raise ValueError(f"{folder}: config {config!r} was not built here (built: {built})")
    columns = ["ref_id", "ann_id", "image_id", "category_id", "category", "split", "sentences", "mask"]
    refs = read_shards(shard_paths(folder, report, config, split), "refs", columns)
    images = read_shards(shard_paths(folder, report, IMAGES_CONFIG), IMAGES_CONFIG, ["image_id", "width", "height", "objects"])
    check_refs(refs, images, f"{folder} ({config}/{split})", split)
    return refs, images
