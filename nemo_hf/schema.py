"""Names and column types shared by the builder, the hub-ready folder, the miner and the transforms.

One place defines them so a column can never be spelled two ways.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Features, Image, List, Value


@dataclass(frozen=True)
class RefsConfig:
    """One refer annotation set: ``<root>/<dataset>/refs(<split_by>).p`` + ``instances.json``."""

    name: str
    dataset: str
    split_by: str
    splits: tuple[str, ...]
    partitions: str  # "images" (unc, umd) or "objects" (google: one image can be in train and val)


REFS_CONFIGS: dict[str, RefsConfig] = {
    c.name: c
    for c in (
        RefsConfig("refcoco_unc", "refcoco", "unc", ("train", "val", "testA", "testB"), "images"),
        RefsConfig("refcocoplus_unc", "refcoco+", "unc", ("train", "val", "testA", "testB"), "images"),
        RefsConfig("refcocog_umd", "refcocog", "umd", ("train", "val", "test"), "images"),
        RefsConfig("refcocog_google", "refcocog", "google", ("train", "val"), "objects"),
        RefsConfig("refcoco_google", "refcoco", "google", ("train", "val", "test"), "objects"),
    )
}
DEFAULT_CONFIG = "refcoco_unc"
IMAGES_CONFIG = "images"
TRAIN_SPLIT = "train"


DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# What people type for a dataset: the refer toolkit's names and the configs' own spelling of refcoco+.
DATASET_SPELLINGS = {"refcoco": "refcoco", "refcoco+": "refcoco+", "refcocoplus": "refcoco+", "refcocog": "refcocog"}


def config_name(dataset: str, split_by: str) -> str:
    """``("refcoco+", "unc")`` -> ``"refcocoplus_unc"``."""
    for cfg in REFS_CONFIGS.values():
        if cfg.dataset == dataset and cfg.split_by == split_by:
            return cfg.name
    split_bys = [c.split_by for c in REFS_CONFIGS.values() if c.dataset == dataset]
    if split_bys:
        raise ValueError(f"{dataset} has no split-by {split_by!r}: it has {' or '.join(split_bys)}")
    known = ", ".join(f"{c.dataset}/{c.split_by}" for c in REFS_CONFIGS.values())
    raise ValueError(f"unknown dataset/split-by {dataset}/{split_by}; known: {known}")


def did_you_mean(name: str, known) -> str:
    """``"; did you mean X?"`` for the closest of ``known`` to a mistyped ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name).lower(), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def refs_config(name: str, split_by: str | None = None) -> str:
    """The refs config a user means: a dataset in any usual spelling (``refcoco``, ``refcoco+``,
    ``refcocoplus``, ``refcocog``, any case) with ``split_by`` (default: unc, umd for refcocog), or a
    config name (``refcocoplus_unc``, also written ``refcoco+_unc``), whose own split-by wins."""
    typed = str(name).strip().lower()
    dataset, _, own_split_by = typed.partition("_")
    canonical = DATASET_SPELLINGS.get(dataset)
    if canonical is None:
        known = [*DATASET_SPELLINGS, *REFS_CONFIGS]
        raise ValueError(
            f"unknown dataset {name!r}{did_you_mean(typed, known)} (known: refcoco, refcoco+ or refcocoplus, "
            f"refcocog, or a config name: {', '.join(REFS_CONFIGS)})"
        )
    return config_name(canonical, own_split_by or split_by or DEFAULT_SPLIT_BY[canonical])


SENTENCE = {
    "sent_id": Value("int64"),
    "sent": Value("string"),
    "raw": Value("string"),
    "tokens": List(Value("string")),
}

# One row per referred object. The three negative columns are aligned with ``sentences``
# (one entry per sentence) and empty on val/test rows and on unmined builds.
REFS_FEATURES = Features(
    {
        "ref_id": Value("int64"),
        "ann_id": Value("int64"),
        "image_id": Value("int64"),
        "file_name": Value("string"),
        "category_id": Value("int64"),
        "category": Value("string"),
        "split": Value("string"),
        "sentences": List(SENTENCE),
        "bbox": List(Value("float64"), length=4),
        "mask": {"size": List(Value("int64"), length=2), "counts": Value("string")},
        "negatives": List(List(Value("int64"))),
        "negative_scores": List(List(Value("float32"))),
        "negative_fallback": List(Value("bool")),
    }
)

RLE = {"size": List(Value("int64"), length=2), "counts": Value("string")}

# Every instance instances.json holds for an image, referred or not (as TFDS's ref_coco ``objects``).
OBJECT = {
    "ann_id": Value("int64"),
    "category_id": Value("int64"),
    "category": Value("string"),
    "supercategory": Value("string"),
    "bbox": List(Value("float64"), length=4),
    "area": Value("float64"),
    "iscrowd": Value("bool"),
    "mask": RLE,
}

# One row per COCO image used by any refs config of the folder. ``negative_pool_of`` names the
# refs configs whose training negative pool holds the image (the mosaic's random mode draws from it);
# ``objects`` holds all its instances (schema.OBJECT, ann_id order).
IMAGES_FEATURES = Features(
    {
        "image_id": Value("int64"),
        "file_name": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
        "license": Value("int32"),
        "image": Image(),
        "negative_pool_of": List(Value("string")),
        "objects": List(OBJECT),
    }
)
