"""Reading the original refer toolkit's files: ``refs(<split_by>).p`` and ``instances.json``.

The refs file is a Python 2 pickle from a third party: it is read by an unpickler that admits only
plain containers and scalars, so a crafted file cannot run code. Every problem is reported as a
:class:`ReferFormatError` naming the file and the ref, annotation or image concerned (segmentations
and image sizes are checked by `nemo_hf.masks`, whose errors are reported the same way).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..masks import MaskFormatError, check_image_size, is_int, segmentation_to_rle
from ..schema import RefsConfig

COCO_IMAGE_SUBDIR = Path("images/mscoco/images/train2014")


class ReferFormatError(ValueError):
    """A refer source file is missing, unreadable or inconsistent."""


@contextlib.contextmanager
def _as_refer_error() -> Iterator[None]:
    """A mask check's error is the source file's: the same message, as a `ReferFormatError`."""
    try:
        yield
    except MaskFormatError as err:
        raise ReferFormatError(str(err)) from None


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


MAX_NESTING = 16  # a refs file nests 5 levels deep (list > ref > sentences > sentence > tokens)


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _text(value: bytes) -> str:
    """Python 2 ``str`` arrives as bytes: UTF-8 where it decodes, Latin-1 otherwise (never fails)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _plain_tree(data, path: Path, budget: int):
    """``data`` with byte strings as text and tuples and sets as lists, refused once the walk has visited
    ``budget`` objects or gone deeper than ``MAX_NESTING`` levels.

    A pickle can refer to one list again and again through its memo: a few hundred bytes that expand
    to 10^9 objects when walked. An honest file holds a tree, which costs at least a byte of pickle per
    object, so a budget proportional to the file's size refuses such a file after as much work as an
    honest file of its size would take, and a list that contains itself hits the depth limit.
    """
    left = budget

    def walk(obj, depth: int):
        nonlocal left
        if depth >= MAX_NESTING:
            raise ReferFormatError(f"{path}: refused: nested deeper than {MAX_NESTING} levels; a refs file is a list of ref dicts")
        left -= len(obj)
        if left < 0:
            raise ReferFormatError(
                f"{path}: refused: its shared references expand to more than {budget:,} objects "
                "(a refs file is a plain tree of lists and dicts)"
            )
        if isinstance(obj, dict):
            converted = {}
            for k, v in obj.items():
                if type(k) is bytes:
                    k = _text(k)
                elif type(k) is not str and type(k) is not int:
                    raise ReferFormatError(f"{path}: a dict key is a {type(k).__name__} ({k!r}); refs files use string keys")
                if type(v) is bytes:
                    v = _text(v)
                elif isinstance(v, _CONTAINERS):
                    v = walk(v, depth + 1)
                converted[k] = v
            return converted
        converted = []
        for v in obj:
            if type(v) is bytes:
                v = _text(v)
            elif isinstance(v, _CONTAINERS):
                v = walk(v, depth + 1)
            converted.append(v)
        return converted

    if isinstance(data, _CONTAINERS):
        return walk(data, 0)
    return _text(data) if type(data) is bytes else data


def load_refs(path: str | Path) -> list[dict]:
    """The refs list of a ``refs(<split_by>).p`` file, strings as ``str``, nothing executed."""
    path = Path(path)
    if not path.is_file():
        raise ReferFormatError(f"{path}: refs file not found")
    raw = path.read_bytes()
    try:
        data = _PlainDataUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ReferFormatError(
            f"{path}: refused to load: {err}; a refs file holds only plain lists, dicts, strings and numbers"
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise ReferFormatError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from None
    # a tree costs at least one pickle opcode byte per object; the slack admits a little honest sharing
    refs = _plain_tree(data, path, budget=2 * len(raw) + 10_000)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferFormatError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    if not refs:
        raise ReferFormatError(f"{path}: holds no refs")
    required = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
    first_index: dict[int, int] = {}
    for i, ref in enumerate(refs):
        where = f"{path}: ref #{i} (ref_id {ref.get('ref_id')!r})"
        missing = [k for k in required if k not in ref]
        if missing:
            raise ReferFormatError(f"{where} lacks {', '.join(missing)}")
        for key in ("ref_id", "ann_id", "image_id", "category_id"):
            _int_field(ref, key, where)
        if not isinstance(ref["split"], str):
            raise ReferFormatError(f"{where}: split {ref['split']!r} is not a string")
        if ref["ref_id"] in first_index:
            raise ReferFormatError(f"{where}: ref_id {ref['ref_id']} appears twice (first as ref #{first_index[ref['ref_id']]})")
        first_index[ref["ref_id"]] = i
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
    """``instances.json`` with every id, size and name checked, so nothing odd reaches C code later."""
    path = Path(path)
    if not path.is_file():
        raise ReferFormatError(f"{path}: instances file not found")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise ReferFormatError(f"{path}: not a COCO instances file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ReferFormatError(f"{path}: not a COCO instances file (expected lists images, annotations, categories)")
    images, annotations, categories, supercategories = {}, {}, {}, {}
    for im in data["images"]:
        where = f"{path}: image {im.get('id')!r}" if isinstance(im, dict) else f"{path}: image entry {im!r}"
        image_id = _entry_id(im, images, where)
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise ReferFormatError(f"{where}: file_name {im.get('file_name')!r} is not a file name")
        _text_field(im["file_name"], where, "file_name")
        with _as_refer_error():
            check_image_size(im.get("height"), im.get("width"), where)
        if not is_int(im.get("license", 0)) or not 0 <= im.get("license", 0) <= MAX_LICENSE:
            raise ReferFormatError(f"{where}: license {im['license']!r} is not an integer in 0..2^31-1")
        images[image_id] = im
    for ann in data["annotations"]:
        where = f"{path}: annotation {ann.get('id')!r}" if isinstance(ann, dict) else f"{path}: annotation entry {ann!r}"
        ann_id = _entry_id(ann, annotations, where)
        _int_field(ann, "image_id", where)
        annotations[ann_id] = ann
    for cat in data["categories"]:
        where = f"{path}: category {cat.get('id')!r}" if isinstance(cat, dict) else f"{path}: category entry {cat!r}"
        cat_id = _entry_id(cat, categories, where)
        if not isinstance(cat.get("name"), str):
            raise ReferFormatError(f"{where}: name {cat.get('name')!r} is not a string")
        categories[cat_id] = _text_field(cat["name"], where, "name")
        supercategories[cat_id] = _text_field(str(cat.get("supercategory", "")), where, "supercategory")
    return Instances(path=path, images=images, annotations=annotations, categories=categories, supercategories=supercategories)


MAX_ID = 2**63 - 1  # ids are stored as int64
MAX_LICENSE = 2**31 - 1  # the images config stores it as int32


def _int_field(entry: dict, key: str, where: str) -> int:
    """``entry[key]`` as an id: an int in 0..2^63-1; a float, a string, a missing or an out-of-range value is
    an error (never truncated, never a failure deep in the Parquet writer)."""
    if key not in entry:
        raise ReferFormatError(f"{where}: lacks {key}")
    if not is_int(entry[key]):
        raise ReferFormatError(f"{where}: {key} {entry[key]!r} is not an integer")
    value = int(entry[key])
    if not 0 <= value <= MAX_ID:
        raise ReferFormatError(f"{where}: {key} {value} is outside 0..2^63-1, the range of the ids a folder stores")
    return value


def _text_field(value: str, where: str, what: str) -> str:
    """``value`` when it is text UTF-8 can store: a lone surrogate (which a Python 3 pickle or a JSON ``\\ud800``
    escape can carry) is not, and would fail deep in the Parquet writer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ReferFormatError(
            f"{where}: {what} {value!r} holds a lone surrogate ({value[err.start]!r} at character {err.start}), "
            "which is not text: correct it in the source file"
        ) from None
    return value


def _entry_id(entry, seen: dict, where: str) -> int:
    if not isinstance(entry, dict):
        raise ReferFormatError(f"{where}: not an object")
    entry_id = _int_field(entry, "id", where)
    if entry_id in seen:
        raise ReferFormatError(f"{where}: id {entry_id} appears twice")
    return entry_id


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_bbox(bbox, where: str) -> list[float]:
    """[x, y, w, h]: four finite numbers, sizes not negative."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ReferFormatError(f"{where}: bbox {bbox!r} is not 4 numbers [x, y, w, h]")
    try:
        box = [float(v) for v in bbox]
    except OverflowError:  # an integer beyond any float
        box = [np.inf] * 4
    if not all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
        raise ReferFormatError(f"{where}: bbox {bbox!r} is not 4 finite numbers with w, h >= 0")
    return box


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
            category_id = _int_field(ann, "category_id", where)
            obj = {
                "ann_id": ann_id,
                "category_id": category_id,
                "category": instances.categories.get(category_id, ""),
                "supercategory": instances.supercategories.get(category_id, ""),
                "bbox": check_bbox(ann.get("bbox"), where),
                "area": float(ann.get("area", 0.0)),
                "iscrowd": bool(ann.get("iscrowd", 0)),
            }
            with _as_refer_error():
                # an instance no ref names may rasterise to nothing (a sliver of a polygon): kept, not an error
                obj["mask"] = segmentation_to_rle(ann["segmentation"], image["height"], image["width"], where, allow_empty=True)
            objects.append(obj)
        except ReferFormatError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ReferFormatError(f"{where}: {type(err).__name__}: {err}") from None
    return objects


def _sentences(ref: dict, where: str) -> list[dict]:
    """The ref's sentences as schema rows: a non-empty list of dicts with an integer ``sent_id``, text in
    ``sent`` (or ``raw``), and ``tokens`` a list of strings when given."""
    sentences = ref["sentences"]
    if not isinstance(sentences, list):
        raise ReferFormatError(f"{where}: sentences is a {type(sentences).__name__}; expected a list of sentence dicts")
    if not sentences:
        raise ReferFormatError(f"{where}: no sentences")
    out = []
    for i, s in enumerate(sentences):
        if not isinstance(s, dict):
            raise ReferFormatError(f"{where}: sentence #{i} is a {type(s).__name__}; expected a dict")
        sent_id = _int_field(s, "sent_id", f"{where}: sentence #{i}")
        for key in ("sent", "raw"):
            if s.get(key) is not None and not isinstance(s[key], str):
                raise ReferFormatError(f"{where}: sentence {sent_id}: {key} is a {type(s[key]).__name__}, not text")
            if s.get(key) is not None:
                _text_field(s[key], f"{where}: sentence {sent_id}", key)
        sent = s.get("sent") or s.get("raw") or ""
        if not sent.strip():
            raise ReferFormatError(f"{where}: sentence {sent_id} is empty")
        tokens = s.get("tokens") or sent.split()
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ReferFormatError(f"{where}: sentence {sent_id}: tokens is not a list of strings")
        for token in tokens:
            _text_field(token, f"{where}: sentence {sent_id}", "token")
        out.append({"sent_id": sent_id, "sent": sent, "raw": s.get("raw") or sent, "tokens": tokens})
    return out


def unmined_negatives(n_sentences: int) -> dict:
    """The negative columns of an eval or unmined row: one empty pool per sentence, kept aligned."""
    return {
        "negatives": [[] for _ in range(n_sentences)],
        "negative_scores": [[] for _ in range(n_sentences)],
        "negative_fallback": [False] * n_sentences,
    }


def ref_rows(
    refs: list[dict],
    instances: Instances,
    refs_file: Path,
    image_problem: Callable[[dict], str | None] | None = None,
    skipped: dict[str, list[str]] | None = None,
) -> Iterator[dict]:
    """One row per ref (schema.REFS_FEATURES, negative columns empty), in ``ref_id`` order.

    ``image_problem(image)`` is asked before anything is rasterised at the image's declared size: a ref
    whose image has a problem is not converted, but noted in ``skipped[split]``. A ``sent_id`` used twice in
    the file is an error, as evaluation would find it (the refer toolkit indexes sentences by it).
    """
    ref_of_sentence: dict[int, int] = {}
    for ref in sorted(refs, key=lambda r: r["ref_id"]):
        where = f"{refs_file}: ref {ref['ref_id']}"
        ann = instances.annotations.get(ref["ann_id"])
        if ann is None:
            raise ReferFormatError(f"{where}: annotation {ref['ann_id']} is not in {instances.path}")
        image = instances.images.get(ref["image_id"])
        if image is None:
            raise ReferFormatError(f"{where}: image {ref['image_id']} is not in {instances.path}")
        if ann["image_id"] != ref["image_id"]:
            raise ReferFormatError(
                f"{where}: annotation {ann['id']} belongs to image {ann['image_id']}, the ref says {ref['image_id']}"
            )
        category = instances.categories.get(ref["category_id"])
        if category is None:
            raise ReferFormatError(f"{where}: category {ref['category_id']} is not in {instances.path}")
        sentences = _sentences(ref, where)
        for sentence in sentences:
            sent_id = sentence["sent_id"]
            if sent_id in ref_of_sentence:
                raise ReferFormatError(
                    f"{where}: sent_id {sent_id} appears twice (first in ref {ref_of_sentence[sent_id]}); each "
                    "sentence needs its own sent_id (evaluation and the embedding cache key on it): correct the refs file"
                )
            ref_of_sentence[sent_id] = ref["ref_id"]
        ann_where = f"{where} (annotation {ann['id']})"
        bbox = check_bbox(ann.get("bbox"), ann_where)
        problem = image_problem(image) if image_problem is not None else None
        if problem:
            skipped = {} if skipped is None else skipped
            skipped.setdefault(ref["split"], []).append(f"ref {ref['ref_id']}: image {ref['image_id']} {problem}")
            continue
        with _as_refer_error():
            mask = segmentation_to_rle(ann.get("segmentation"), image["height"], image["width"], ann_where)
        yield {
            "ref_id": ref["ref_id"],
            "ann_id": ref["ann_id"],
            "image_id": ref["image_id"],
            "file_name": image["file_name"],
            "category_id": ref["category_id"],
            "category": category,
            "split": ref["split"],
            "sentences": sentences,
            "bbox": bbox,
            "mask": mask,
            **unmined_negatives(len(sentences)),
        }
