"""A synthetic RefCOCO-family source in the exact layout of the refer toolkit (lichengunc/refer).

Tests, the demo build and the benchmarks need a source that reads like the real one without the real
files: py2-style ``refs(<split_by>).p`` pickles, COCO ``instances.json`` with polygons, COCO-named JPEGs.
Images are smooth photo-like canvases with filled shapes; every polygon is exactly what was drawn, and
every position word in a sentence is where the object's mask really lies. Everything is a function of
(seed, image index), so ``workers > 1`` writes the same bytes as ``workers = 1``.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = {1: ("person", "person"), 3: ("car", "vehicle"), 18: ("dog", "animal"),
              44: ("bottle", "kitchen"), 47: ("cup", "kitchen"), 62: ("chair", "furniture")}
COLOURS = {"red": (205, 30, 35), "blue": (30, 70, 210), "green": (35, 150, 55), "yellow": (235, 205, 35),
           "white": (245, 245, 240), "black": (20, 20, 25), "orange": (245, 130, 20),
           "purple": (125, 40, 160), "pink": (245, 140, 190), "brown": (115, 65, 25)}
COCO_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (427, 640), (640, 424))
SPLIT_SCHEMES = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
MAX_IMAGE_ID = 581929  # the largest COCO train2014 image id
IMAGE_DIR = Path("images/mscoco/images/train2014")
MIN_IMAGES = 8  # the fewest images for which every split of every scheme gets at least one ref
_PERSON = 1
_ROWS, _COLS = ("top", "", "bottom"), ("left", "", "right")


def make_refer_source(root, n_images: int = 12, seed: int = 0, *, datasets=tuple(SPLIT_SCHEMES),
                      image_sizes=COCO_SIZES, py2_strings: bool = True, workers: int = 1,
                      progress: bool = False) -> Path:
    """Write a refer-layout source under ``root`` and return ``root``.

    ``py2_strings`` writes the refs pickles as Python 2 did (byte strings, some non-ASCII UTF-8);
    otherwise with ``pickle.dump(refs, f, protocol=2)``. The same (n_images, seed) gives identical bytes.
    """
    unknown = set(datasets) - set(SPLIT_SCHEMES)
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}; known: {list(SPLIT_SCHEMES)}")
    if max(max(size) for size in image_sizes) > 1024:
        raise ValueError(f"image_sizes {image_sizes}: sides above 1024 pixels are not supported")
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images={n_images}: need at least {MIN_IMAGES} so that every split is non-empty")
    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    image_ids = np.sort(np.random.default_rng([seed, 0]).choice(MAX_IMAGE_ID, n_images, replace=False) + 1)
    jobs = [(seed, i, int(image_id), str(root / IMAGE_DIR), tuple(image_sizes)) for i, image_id in enumerate(image_ids)]
    if workers > 1:
        with get_context().Pool(workers) as pool:
            images = list(_progress(pool.imap(_make_image, jobs, chunksize=16), len(jobs), progress))
    else:
        images = list(_progress(map(_make_image, jobs), len(jobs), progress))
    splits = _assign_splits(images, seed)
    for dataset in datasets:
        refs = _refs(images, dataset)
        out = root / dataset
        out.mkdir(parents=True, exist_ok=True)
        for split_by in SPLIT_SCHEMES[dataset]:
            scheme = splits[dataset, split_by]
            split_refs = [{**ref, "split": scheme[ref["ann_id"]]} for ref in refs]
            path = out / f"refs({split_by}).p"
            if py2_strings:
                write_py2_refs_pickle(split_refs, path)
            else:
                with open(path, "wb") as f:
                    pickle.dump(split_refs, f, protocol=2)
        (out / "instances.json").write_text(json.dumps(_instances(images, {ref["image_id"] for ref in refs})))
    return root


def write_py2_refs_pickle(refs, path, encoding: str = "utf-8") -> None:
    """Pickle ``refs`` (protocol 2) as Python 2's cPickle wrote ``str``: SHORT_BINSTRING/BINSTRING bytes.

    Each ``str`` is encoded with ``encoding``; ``bytes`` go in as they are, so a test can plant
    latin-1 or undecodable bytes. Lets the reader be tested on what real RefCOCO files hold.
    The opcodes are assembled by hand: ``pickle`` itself has no way to write Python 2 strings.
    """
    out = [pickle.PROTO + b"\x02"]
    _py2_opcodes(refs, encoding, out)
    out.append(pickle.STOP)
    Path(path).write_bytes(b"".join(out))


def _py2_opcodes(obj, encoding: str, out: list) -> None:
    if isinstance(obj, (str, bytes)):
        data = obj if isinstance(obj, bytes) else obj.encode(encoding)
        size = len(data)
        out.append(pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size))
        out.append(data)
    elif isinstance(obj, bool):
        out.append(pickle.NEWTRUE if obj else pickle.NEWFALSE)
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out.append(pickle.BININT1 + bytes([obj]))
        elif -(2**31) <= obj < 2**31:
            out.append(pickle.BININT + struct.pack("<i", obj))
        else:
            data = obj.to_bytes(obj.bit_length() // 8 + 1, "little", signed=True)
            out.append(pickle.LONG1 + bytes([len(data)]) + data)
    elif isinstance(obj, float):
        out.append(pickle.BINFLOAT + struct.pack(">d", obj))
    elif obj is None:
        out.append(pickle.NONE)
    elif isinstance(obj, (list, dict)):
        items = [x for kv in obj.items() for x in kv] if isinstance(obj, dict) else obj
        out.append(pickle.EMPTY_DICT if isinstance(obj, dict) else pickle.EMPTY_LIST)
        if items:
            out.append(pickle.MARK)
            for item in items:
                _py2_opcodes(item, encoding, out)
            out.append(pickle.SETITEMS if isinstance(obj, dict) else pickle.APPENDS)
    else:
        raise TypeError(f"cannot write a {type(obj).__name__} into a Python 2 refs pickle")


def _progress(items, total, enabled):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="synthetic images", unit="img")


@lru_cache(maxsize=2)
def _texture(seed: int) -> np.ndarray:
    """Fine grain shared by all images of a seed (cheaper than fresh noise per image)."""
    rng = np.random.default_rng([seed, 2])
    grain = rng.normal(0, 3, (1024, 1024, 1)) + rng.normal(0, 1.5, (1024, 1024, 3))  # mostly luminance
    return grain.round().astype(np.int16)


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ellipse(cx, cy, rx, ry, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel().tolist()


def _shape(category_id, x0, y0, x1, y1):
    """The polygons of one object in its box; some have two parts, overlapping or apart."""
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    if category_id == _PERSON:  # head overlapping the body
        r = min(0.17 * h, w / 2)
        return [_ellipse(cx, y0 + r, r, r), _rect(x0, y0 + 1.7 * r, x1, y1)]
    if category_id == 3:  # car: body and cabin overlap
        return [_rect(x0, y0 + 0.4 * h, x1, y1), [x0 + 0.25 * w, y0, x1 - 0.25 * w, y0, x1 - 0.1 * w, y0 + 0.5 * h,
                                                  x0 + 0.1 * w, y0 + 0.5 * h]]
    if category_id == 18:
        return [_ellipse(cx, (y0 + y1) / 2, w / 2, h / 2)]
    if category_id == 44:  # bottle: neck overlaps the body
        return [_rect(cx - 0.15 * w, y0, cx + 0.15 * w, y0 + 0.4 * h), _rect(x0, y0 + 0.3 * h, x1, y1)]
    if category_id == 47:  # cup: body and a separate handle
        return [[x0, y0, x0 + 0.72 * w, y0, x0 + 0.62 * w, y1, x0 + 0.1 * w, y1],
                _rect(x0 + 0.78 * w, y0 + 0.25 * h, x1, y0 + 0.6 * h)]
    return [[x0, y0, x0 + 0.3 * w, y0, x0 + 0.3 * w, y0 + 0.55 * h, x1, y0 + 0.55 * h, x1, y1,  # chair
             x1 - 0.15 * w, y1, x1 - 0.15 * w, y0 + 0.75 * h, x0 + 0.15 * w, y0 + 0.75 * h, x0 + 0.15 * w, y1, x0, y1]]


def _make_image(job) -> dict:
    """Draw one image, write its JPEG, and return its record: objects, polygons and raw sentences."""
    seed, index, image_id, image_dir, sizes = job
    rng = np.random.default_rng([seed, 1, index])
    width, height = sizes[rng.integers(len(sizes))]
    people = index == 0 or (index != 1 and rng.random() < 0.45)  # one image of each kind at any scale
    objects = _place_objects(rng, width, height, people, first_ann_id=1_000_000 + 8 * index)
    _render(rng, seed, width, height, objects).save(Path(image_dir) / f"COCO_train2014_{image_id:012d}.jpg", quality=90)
    coco_refs = _pick(rng, [o for o in objects if (o["category_id"] == _PERSON) == people], 0.3)
    gref_refs = [] if index % 8 == 7 else _pick(rng, objects, 0.1)  # refcocog leaves out some images
    return {"id": image_id, "width": width, "height": height, "people": people,
            "license": int(rng.integers(1, 9)), "date_captured": "2013-11-%02d %02d:%02d:%02d" % tuple(
                int(v) for v in rng.integers((14, 0, 0, 0), (26, 24, 60, 60))),
            "flickr_url": "http://farm%d.staticflickr.com/%d/%d_%010x_z.jpg" % tuple(
                int(v) for v in rng.integers((1, 1000, 10**9, 0), (10, 9000, 10**10, 16**10))),
            "objects": objects,
            "refs": {"refcoco": [(o["k"], _sentences(rng, o, objects, "refcoco")) for o in coco_refs],
                     "refcoco+": [(o["k"], _sentences(rng, o, objects, "refcoco+")) for o in coco_refs],
                     "refcocog": [(o["k"], _sentences(rng, o, objects, "refcocog")) for o in gref_refs]}}


def _place_objects(rng, width, height, people, first_ann_id) -> list[dict]:
    """3-6 objects in distinct thirds of the image (never overlapping), each with its COCO annotation."""
    n_objects = int(rng.integers(3, 7))
    n_people = int(rng.integers(2, n_objects + 1)) if people else 0
    others = [c for c in CATEGORIES if c != _PERSON]
    categories = [_PERSON] * n_people + [int(c) for c in rng.choice(others, n_objects - n_people)]
    colours = [str(c) for c in rng.permutation(list(COLOURS))[:n_objects]]
    cw, ch = width / 3, height / 3
    objects = []
    for k, (category_id, colour, cell) in enumerate(zip(categories, colours, rng.permutation(9))):
        fw, fh = (rng.uniform(0.35, 0.55), rng.uniform(0.7, 0.88)) if category_id == _PERSON else rng.uniform(0.45, 0.85, 2)
        x0 = (cell % 3) * cw + rng.uniform(0.05, 0.95 - fw) * cw
        y0 = (cell // 3) * ch + rng.uniform(0.05, 0.95 - fh) * ch
        polygons = [[round(float(v), 2) for v in p] for p in _shape(category_id, x0, y0, x0 + fw * cw, y0 + fh * ch)]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        mask = mask_utils.decode(rle)
        cy, cx = (mask.sum(1) @ np.arange(height), mask.sum(0) @ np.arange(width)) / mask_utils.area(rle)
        xy = np.concatenate(polygons).reshape(-1, 2)
        (x_min, y_min), (x_max, y_max) = xy.min(0), xy.max(0)
        objects.append({"k": k, "ann_id": first_ann_id + k, "category_id": category_id, "colour": colour,
                        "segmentation": polygons, "area": float(mask_utils.area(rle)),
                        "bbox": [round(float(v), 2) for v in (x_min, y_min, x_max - x_min, y_max - y_min)],
                        "row": int(3 * cy // height), "col": int(3 * cx // width)})  # thirds of the mask centroid
    return objects


def _render(rng, seed, width, height, objects) -> Image.Image:
    """Smooth background, flat-coloured objects, then light, blotches and grain so it compresses like a photo."""
    canvas = Image.fromarray(rng.uniform(70, 185, (3, 4, 3)).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        for polygon in obj["segmentation"]:
            draw.polygon(polygon, fill=COLOURS[obj["colour"]])
    pixels = np.asarray(canvas, dtype=np.int16)
    pixels += np.linspace(-18, 18, height, dtype=np.int16)[:, None, None]  # light from above
    blotches = Image.fromarray(rng.uniform(113, 143, (height // 8, width // 8)).astype(np.uint8))
    pixels += np.asarray(blotches.resize((width, height), Image.BICUBIC), dtype=np.int16)[..., None] - 128
    oy, ox = rng.integers(0, 1025 - height), rng.integers(0, 1025 - width)
    pixels += _texture(seed)[oy:oy + height, ox:ox + width]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _pick(rng, candidates, p_extra):
    """At least two referred objects per image (as RefCOCO's collection), a few more at random."""
    n = 2 + int(rng.binomial(len(candidates) - 2, p_extra))
    return [candidates[i] for i in sorted(rng.choice(len(candidates), n, replace=False))]


def _sentences(rng, obj, objects, dataset) -> list[str]:
    """1-3 raw expressions; refcoco+ has no location words, refcocog longer ones (as the real sets)."""
    name, colour = CATEGORIES[obj["category_id"]][0], obj["colour"]
    where = " ".join(w for w in (_ROWS[obj["row"]], _COLS[obj["col"]]) if w) or "middle"
    at = {"left": "on the left", "right": "on the right", "middle": "in the middle"}.get(where, f"at the {where}")
    relations = [f"{'below' if obj['row'] > o['row'] else 'above'} the {o['colour']} {CATEGORIES[o['category_id']][0]}"
                 for o in objects if o["col"] == obj["col"] and o["row"] != obj["row"]]
    relations += [f"next to the {o['colour']} {CATEGORIES[o['category_id']][0]}"
                  for o in objects if o["row"] == obj["row"] and abs(o["col"] - obj["col"]) == 1]
    relation = relations[rng.integers(len(relations))] if relations else None
    if dataset == "refcoco":
        options = [f"{colour} {name} {where}", f"the {colour} {name} {at}", f"{where} {name}", f"{colour} {name}"]
        options += [f"{colour} {name} {relation}"] if relation else []
        n_weights = [0.04, 0.08, 0.88]  # 2.84 expressions per ref, as RefCOCO
    elif dataset == "refcoco+":
        sizes = sorted(o["area"] for o in objects)
        size = "big " if obj["area"] == sizes[-1] else "small " if obj["area"] == sizes[0] else ""
        options = [f"{colour} {name}", f"the {colour} one", f"{size}{colour} {name}", f"{name} in {colour}"]
        n_weights = [0.04, 0.08, 0.88]
    else:
        options = [f"a {colour} {name} {at} of the picture", f"there is a {colour} {name} {at}",
                   f"the {name} that is {colour}"]
        options += [f"a {colour} {name} {relation}"] if relation else []
        n_weights = [0.2, 0.7, 0.1]  # 1.9, as RefCOCOg
    n = 1 + int(rng.choice(3, p=n_weights))
    return [_raw(rng, options[i]) for i in rng.choice(len(options), min(n, len(options)), replace=False)]


def _raw(rng, text: str) -> str:
    """How annotators typed it: case, punctuation, now and then a non-ASCII dash or ellipsis."""
    style = rng.integers(30)
    if style == 0 and " on the " in text:
        return text.replace(" on the ", " \u2013 ", 1)
    if style == 1:
        return text.capitalize() + "\u2026"
    return (text, text.capitalize(), text.upper(), text + ".", text.capitalize() + ".", text + " ")[style % 6]


def _sent(raw: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", raw.lower()).split())


def _fraction(frac: float, total: int) -> int:
    return max(1, round(frac * total))


def _assign_splits(images, seed) -> dict:
    """``{(dataset, split_by): {ann_id: split}}`` with the real schemes' semantics.

    unc (refcoco, refcoco+) partitions images: testA images of people, testB of other objects.
    umd partitions images too, its val/test drawn from unc-train images (an image is train in one
    dataset and held out in another, as in reality). google partitions objects: a held-out image
    keeps its other refs in train.
    """
    rng = np.random.default_rng([seed, 3])
    order = [images[i] for i in rng.permutation(len(images))]
    unc = {}
    for split, pool in (("testA", [im for im in order if im["people"]]), ("testB", [im for im in order if not im["people"]])):
        unc.update((im["id"], split) for im in pool[:_fraction(0.0375, len(images))])
    unc.update((im["id"], "val") for im in [im for im in order if im["id"] not in unc][:_fraction(0.075, len(images))])
    gref_images = [im for im in reversed(order) if im["refs"]["refcocog"]]
    n_test, n_val = _fraction(0.10, len(gref_images)), _fraction(0.05, len(gref_images))
    candidates = [im for im in gref_images if im["id"] not in unc][:n_test + n_val]
    umd = {im["id"]: "test" if i < n_test else "val" for i, im in enumerate(candidates)}

    def per_object(by_image):
        return {o["ann_id"]: by_image.get(im["id"], "train") for im in images for o in im["objects"]}

    splits = {("refcoco", "unc"): per_object(unc), ("refcoco+", "unc"): per_object(unc), ("refcocog", "umd"): per_object(umd)}
    for dataset, held_out in (("refcoco", ("val", "test")), ("refcocog", ("val",))):
        google = per_object({})
        n_refs = sum(len(im["refs"][dataset]) for im in images)
        shuffled = iter([images[i] for i in rng.permutation(len(images)) if images[i]["refs"][dataset]])
        for split in held_out:  # one held-out ref per image, ~10% of the refs each
            for image in [next(shuffled) for _ in range(_fraction(0.10, n_refs))]:
                k = image["refs"][dataset][rng.integers(len(image["refs"][dataset]))][0]
                google[image["objects"][k]["ann_id"]] = split
        splits[dataset, "google"] = google
    return splits


def _refs(images, dataset) -> list[dict]:
    """The dataset's refs in the toolkit's shape (keys in the order the real pickles hold them)."""
    refs, sent_id = [], 0
    for image in images:
        for k, raws in image["refs"][dataset]:
            obj = image["objects"][k]
            suffix = obj["ann_id"] if dataset == "refcocog" else k  # names no file, as in the real sets
            sentences = [{"tokens": _sent(raw).split(), "raw": raw, "sent_id": sent_id + i, "sent": _sent(raw)}
                         for i, raw in enumerate(raws)]
            refs.append({"sent_ids": [s["sent_id"] for s in sentences],
                         "file_name": f"COCO_train2014_{image['id']:012d}_{suffix}.jpg",
                         "ann_id": obj["ann_id"], "ref_id": len(refs), "image_id": image["id"], "split": "",
                         "sentences": sentences, "category_id": obj["category_id"]})
            sent_id += len(sentences)
    return refs


def _instances(images, used_ids) -> dict:
    """COCO instances of the images a dataset's refs use, with all their objects (referred or not)."""
    used = [im for im in images if im["id"] in used_ids]
    return {
        "info": {"description": "Synthetic refer source made by nemo_hf.source.synthetic (COCO 2014 layout).",
                 "url": "https://github.com/lichengunc/refer", "version": "1.0", "year": 2014,
                 "contributor": "nemo_hf", "date_created": "2015-01-27 09:11:52.357475"},
        "images": [{"license": im["license"], "file_name": f"COCO_train2014_{im['id']:012d}.jpg",
                    "coco_url": f"http://mscoco.org/images/{im['id']}", "height": im["height"],
                    "width": im["width"], "date_captured": im["date_captured"], "flickr_url": im["flickr_url"],
                    "id": im["id"]} for im in used],
        "annotations": [{"segmentation": o["segmentation"], "area": o["area"], "iscrowd": 0, "image_id": im["id"],
                         "bbox": o["bbox"], "category_id": o["category_id"], "id": o["ann_id"]}
                        for im in used for o in im["objects"]],
        "categories": [{"supercategory": sup, "id": cid, "name": name} for cid, (name, sup) in CATEGORIES.items()],
        "licenses": [{"url": url, "id": i, "name": name} for i, (url, name) in enumerate(_LICENSES, 1)],
    }


_LICENSES = (
    ("http://creativecommons.org/licenses/by-nc-sa/2.0/", "Attribution-NonCommercial-ShareAlike License"),
    ("http://creativecommons.org/licenses/by-nc/2.0/", "Attribution-NonCommercial License"),
    ("http://creativecommons.org/licenses/by-nc-nd/2.0/", "Attribution-NonCommercial-NoDerivs License"),
    ("http://creativecommons.org/licenses/by/2.0/", "Attribution License"),
    ("http://creativecommons.org/licenses/by-sa/2.0/", "Attribution-ShareAlike License"),
    ("http://creativecommons.org/licenses/by-nd/2.0/", "Attribution-NoDerivs License"),
    ("http://flickr.com/commons/usage/", "No known copyright restrictions"),
    ("http://www.usa.gov/copyright.shtml", "United States Government Work"),
)
