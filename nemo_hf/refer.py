"""Reading the original refer toolkit's files: ``refs(<split_by>).p`` and ``instances.json``.

The refs file is a Python 2 pickle from a third party: it is read by an unpickler that admits only
plain containers and scalars, so a crafted file cannot run code. Every problem is reported as a
:class:`ReferFormatError` naming the file and the ref, annotation or image concerned.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .schema import RefsConfig

COCO_IMAGE_SUBDIR = Path("images/mscoco/images/train2014")


class ReferFormatError(ValueError):
    """A refer source file is missing, unreadable or inconsistent."""


def refs_path(root: str | Path, cfg: RefsConfig) -> Path:
    return Path(root) / cfg.dataset / f"refs({cfg.split_by}).p"


def instances_path(root: str | Path, cfg: RefsConfig) -> Path:
    return Path(root) / cfg.dataset / "instances.json"


def default_image_dir(root: str | Path) -> Path:
    return Path(root) / COCO_IMAGE_SUBDIR


def is_present(root: str | Path, cfg: RefsConfig) -> bool:
    return refs_path(root, cfg).is_file() and instances_path(root, cfg).is_file()


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global lookup: only dicts, lists, tuples, sets, strings and numbers get through."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _as_text(value):
    """Python 2 ``str`` arrives as bytes: UTF-8 where it decodes, Latin-1 otherwise (never fails)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_as_text(k): _as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_text(v) for v in value]
    return value


def load_refs(path: str | Path) -> list[dict]:
    """The refs list of a ``refs(<split_by>).p`` file, strings as ``str``, nothing executed."""
    path = Path(path)
    if not path.is_file():
        raise ReferFormatError(f"{path}: refs file not found")
    try:
        data = _PlainDataUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ReferFormatError(
            f"{path}: refused to load: {err}; a refs file holds only plain lists, dicts, strings and numbers"
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise ReferFormatError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from None
    refs = _as_text(data)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferFormatError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    required = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
    for i, ref in enumerate(refs):
        missing = [k for k in required if k not in ref]
        if missing:
            raise ReferFormatError(f"{path}: ref #{i} (ref_id {ref.get('ref_id')}) lacks {', '.join(missing)}")
    return refs


@dataclass
class Instances:
    """The parts of ``instances.json`` the builder needs, indexed by id."""

    path: Path
    images: dict[int, dict]
    annotations: dict[int, dict]
    categories: dict[int, str]
    supercategories: dict[int, str] = field(default_factory=dict)

    @cached_property
    def annotations_by_image(self) -> dict[int, list[dict]]:
        """image_id -> its annotations (referred or not), in ``id`` order."""
        by_image: dict[int, list[dict]] = {}
        for ann_id in sorted(self.annotations):
            ann = self.annotations[ann_id]
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        return by_image


def load_instances(path: str | Path) -> Instances:
    path = Path(path)
    if not path.is_file():
        raise ReferFormatError(f"{path}: instances file not found")
    try:
        data = json.loads(path.read_bytes())
        return Instances(
            path=path,
            images={int(im["id"]): im for im in data["images"]},
            annotations={int(a["id"]): a for a in data["annotations"]},
            categories={int(c["id"]): c["name"] for c in data["categories"]},
            supercategories={int(c["id"]): str(c.get("supercategory", "")) for c in data["categories"]},
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ReferFormatError(f"{path}: not a COCO instances file ({type(err).__name__}: {err})") from None


def segmentation_to_rle(segmentation, height: int, width: int, where: str) -> dict:
    """The binarized union of an annotation's polygons (or its RLE) as compressed COCO RLE.

    The refer toolkit sums the decoded polygon masks, so overlapping parts exceed 1; the union
    (``merge``) is that sum binarized, computed without decoding to pixels.
    """
    if isinstance(segmentation, dict):  # iscrowd-style RLE; RefCOCO itself has none
        rles = [mask_utils.frPyObjects(segmentation, height, width)]
    else:
        if not segmentation:
            raise ReferFormatError(f"{where}: empty segmentation")
        for part in segmentation:
            if len(part) < 6 or len(part) % 2:
                raise ReferFormatError(
                    f"{where}: polygon with {len(part) / 2:g} points; a polygon needs at least 3 (x, y) pairs"
                )
        # (frPyObjects would read a 4-number list as a box: the check above keeps that out.)
        rles = mask_utils.frPyObjects([[float(v) for v in part] for part in segmentation], height, width)
    rle = mask_utils.merge(rles, intersect=False)
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def image_objects(sources: list[Instances], image_id: int) -> list[dict]:
    """Every instance of an image (schema.OBJECT), referred or not, in ``ann_id`` order.

    ``sources``: the instances files that hold the image (RefCOCO, RefCOCO+ and RefCOCOg each ship one);
    an annotation id found in several is taken from the first. Masks come from `segmentation_to_rle`,
    as the refs' do; a crowd annotation's RLE is kept as it is.
    """
    annotations: dict[int, tuple[Instances, dict]] = {}
    for instances in sources:
        for ann in instances.annotations_by_image.get(int(image_id), ()):
            annotations.setdefault(int(ann["id"]), (instances, ann))
    objects = []
    for ann_id in sorted(annotations):
        instances, ann = annotations[ann_id]
        image = instances.images[int(image_id)]
        where = f"{instances.path}: annotation {ann_id} (image {image_id})"
        try:
            category_id = int(ann["category_id"])
            objects.append(
                {
                    "ann_id": ann_id,
                    "category_id": category_id,
                    "category": instances.categories.get(category_id, ""),
                    "supercategory": instances.supercategories.get(category_id, ""),
                    "bbox": [float(v) for v in ann["bbox"]],
                    "area": float(ann.get("area", 0.0)),
                    "iscrowd": bool(ann.get("iscrowd", 0)),
                    "mask": segmentation_to_rle(ann["segmentation"], int(image["height"]), int(image["width"]), where),
                }
            )
        except ReferFormatError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ReferFormatError(f"{where}: {type(err).__name__}: {err}") from None
    return objects


def encode_rle(mask: np.ndarray) -> dict:
    """A (h, w) mask (non-zero = object) as a row's ``mask`` column: compressed COCO RLE with ``counts`` a str."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) != 0, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """uint8 (h, w) mask of 0/1 from a row's ``mask`` column (``counts`` as str or bytes)."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [int(v) for v in rle["size"]], "counts": counts})


def decode_mask(row_or_rle) -> np.ndarray:
    """uint8 (h, w) 0/1 mask of a refs row (its ``mask`` column) or of a COCO RLE ``{"size", "counts"}``:
    the refer toolkit's ``getMask`` for this dataset."""
    rle = row_or_rle.get("mask", row_or_rle) if isinstance(row_or_rle, Mapping) else None
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise TypeError(
            f"decode_mask wants a refs row (with a 'mask' column) or an RLE dict with 'size' and 'counts', "
            f"got {type(row_or_rle).__name__}"
        )
    return decode_rle(rle)


def _sentences(ref: dict, where: str) -> list[dict]:
    sentences = ref["sentences"]
    if not sentences:
        raise ReferFormatError(f"{where}: no sentences")
    out = []
    for s in sentences:
        sent = s.get("sent") or s.get("raw") or ""
        if not sent.strip():
            raise ReferFormatError(f"{where}: sentence {s.get('sent_id')} is empty")
        out.append(
            {
                "sent_id": int(s["sent_id"]),
                "sent": sent,
                "raw": s.get("raw", sent),
                "tokens": [str(t) for t in s.get("tokens") or sent.split()],
            }
        )
    return out


def unmined_negatives(n_sentences: int) -> dict:
    """The negative columns of an eval or unmined row: one empty pool per sentence, kept aligned."""
    return {
        "negatives": [[] for _ in range(n_sentences)],
        "negative_scores": [[] for _ in range(n_sentences)],
        "negative_fallback": [False] * n_sentences,
    }


def ref_rows(refs: list[dict], instances: Instances, refs_file: Path) -> Iterator[dict]:
    """One row per ref (schema.REFS_FEATURES, negative columns empty), in ``ref_id`` order."""
    for ref in sorted(refs, key=lambda r: int(r["ref_id"])):
        where = f"{refs_file}: ref {ref['ref_id']}"
        ann = instances.annotations.get(int(ref["ann_id"]))
        if ann is None:
            raise ReferFormatError(f"{where}: annotation {ref['ann_id']} is not in {instances.path}")
        image = instances.images.get(int(ref["image_id"]))
        if image is None:
            raise ReferFormatError(f"{where}: image {ref['image_id']} is not in {instances.path}")
        if int(ann["image_id"]) != int(ref["image_id"]):
            raise ReferFormatError(
                f"{where}: annotation {ann['id']} belongs to image {ann['image_id']}, the ref says {ref['image_id']}"
            )
        category_id = int(ref["category_id"])
        yield {
            "ref_id": int(ref["ref_id"]),
            "ann_id": int(ref["ann_id"]),
            "image_id": int(ref["image_id"]),
            "file_name": image["file_name"],
            "category_id": category_id,
            "category": instances.categories.get(category_id, ""),
            "split": str(ref["split"]),
            "sentences": _sentences(ref, where),
            "bbox": [float(v) for v in ann["bbox"]],
            "mask": segmentation_to_rle(
                ann["segmentation"], int(image["height"]), int(image["width"]), f"{where} (annotation {ann['id']})"
            ),
            **unmined_negatives(len(ref["sentences"])),
        }
