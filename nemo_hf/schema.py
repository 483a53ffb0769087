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


def config_name(dataset: str, split_by: str) -> str:
    """``("refcoco+", "unc")`` -> ``"refcocoplus_unc"``."""
    for cfg in REFS_CONFIGS.values():
        if cfg.dataset == dataset and cfg.split_by == split_by:
            return cfg.name
    known = ", ".join(f"{c.dataset}/{c.split_by}" for c in REFS_CONFIGS.values())
    raise ValueError(f"unknown dataset/split-by {dataset}/{split_by}; known: {known}")


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
