import json
import pickle
import pickletools
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from nemo_hf.schema import REFS_CONFIGS
from nemo_hf.source.synthetic import CATEGORIES, COLOURS, IMAGE_DIR, make_refer_source, write_py2_refs_pickle

FILES = {"refcoco": {"instances.json", "refs(unc).p", "refs(google).p"},
         "refcoco+": {"instances.json", "refs(unc).p"},
         "refcocog": {"instances.json", "refs(umd).p", "refs(google).p"}}
PLACE_WORDS = {"left", "right", "top", "bottom", "middle"}


def load_py2_refs(path: Path) -> list[dict]:
    """Python 2 strings come back as bytes with ``encoding="bytes"``; decode them as UTF-8."""

    def text(value):
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, dict):
            return {text(k): text(v) for k, v in value.items()}
        if isinstance(value, list):
            return [text(v) for v in value]
        return value

    with open(path, "rb") as f:
        return text(pickle.load(f, encoding="bytes"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def splits_by_image(root: Path, dataset: str, split_by: str) -> dict[int, set[str]]:
    out = defaultdict(set)
    for ref in load_py2_refs(root / dataset / f"refs({split_by}).p"):
        out[ref["image_id"]].add(ref["split"])
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_refer_source(tmp_path_factory.mktemp("synthetic") / "src", n_images=12, seed=0)


@pytest.fixture(scope="module")
def objects(source) -> dict[int, dict]:
    """Every annotation of the source with its toolkit mask, the colour its pixels show and its centroid."""
    anns = {}
    for dataset in FILES:
        instances = json.loads((source / dataset / "instances.json").read_text())
        images = {im["id"]: im for im in instances["images"]}
        for ann in instances["annotations"]:
            if ann["id"] in anns:
                continue
            image = images[ann["image_id"]]
            h, w = image["height"], image["width"]
            summed = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], h, w)).sum(axis=2)
            mask = summed > 0  # the toolkit sums the parts: overlapping parts give 2
            pixels = np.asarray(Image.open(source / IMAGE_DIR / image["file_name"]).convert("RGB"), dtype=float)
            mean = pixels[mask].mean(axis=0)
            colour = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
            ys, xs = np.nonzero(mask)
            anns[ann["id"]] = {**ann, "max_overlap": int(summed.max()), "mask_area": int(mask.sum()),
                               "mean": mean, "colour": colour, "centroid": (xs.mean() / w, ys.mean() / h)}
    return anns


def test_layout_is_the_refer_toolkits(source):
    jpegs = sorted(p.name for p in (source / IMAGE_DIR).iterdir())
    assert len(jpegs) == 12 and all(re.fullmatch(r"COCO_train2014_\d{12}\.jpg", n) for n in jpegs)
    assert {p.name for p in source.iterdir()} == {"images", *FILES}
    for dataset, files in FILES.items():
        assert {p.name for p in (source / dataset).iterdir()} == files
    ids = {int(n[15:27]) for n in jpegs}
    assert all(1 <= i <= 581929 for i in ids) and max(ids) > 1000
    instances = json.loads((source / "refcoco/instances.json").read_text())
    assert set(instances) == {"info", "images", "annotations", "categories", "licenses"}
    for im in instances["images"]:
        assert set(im) == {"id", "file_name", "width", "height", "license", "coco_url", "flickr_url", "date_captured"}
        assert 1 <= im["license"] <= 8
        with Image.open(source / IMAGE_DIR / im["file_name"]) as jpeg:
            assert jpeg.format == "JPEG" and jpeg.size == (im["width"], im["height"])
    cats = {c["id"]: c["name"] for c in instances["categories"]}
    assert cats[1] == "person" and cats[47] == "cup" and cats[62] == "chair" and cats[3] == "car"


def test_photo_like_jpeg_sizes(source):
    for path in (source / IMAGE_DIR).iterdir():
        with Image.open(path) as im:
            kb_per_vga = path.stat().st_size / 1000 * (640 * 480) / (im.width * im.height)
        assert 40 < kb_per_vga < 160, (path.name, kb_per_vga)


def test_refs_have_the_toolkit_fields_and_types(source, tmp_path):
    plain = make_refer_source(tmp_path / "plain", n_images=12, seed=0, py2_strings=False, datasets=("refcocog",))
    for dataset, files in FILES.items():
        instances = json.loads((source / dataset / "instances.json").read_text())
        anns = {a["id"]: a for a in instances["annotations"]}
        for name in files - {"instances.json"}:
            refs = load_py2_refs(source / dataset / name)
            for ref in refs:
                assert set(ref) == {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences"}
                assert all(type(ref[k]) is int for k in ("ref_id", "ann_id", "image_id", "category_id"))
                assert re.fullmatch(rf"COCO_train2014_{ref['image_id']:012d}_\d+\.jpg", ref["file_name"])
                assert anns[ref["ann_id"]]["image_id"] == ref["image_id"]
                assert anns[ref["ann_id"]]["category_id"] == ref["category_id"]
                assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]] and 1 <= len(ref["sent_ids"]) <= 3
                for s in ref["sentences"]:
                    assert set(s) == {"tokens", "raw", "sent_id", "sent"}
                    assert s["tokens"] == s["sent"].split() and s["sent"] == s["sent"].lower()
                    assert s["sent"] == " ".join(re.sub(r"[^a-z0-9 ]", " ", s["raw"].lower()).split())
            assert len({r["ref_id"] for r in refs}) == len(refs)
            assert len({i for r in refs for i in r["sent_ids"]}) == sum(len(r["sent_ids"]) for r in refs)
    with open(plain / "refcocog/refs(umd).p", "rb") as f:  # the plain protocol-2 variant holds the same refs
        assert pickle.load(f) == load_py2_refs(source / "refcocog/refs(umd).p")


def test_refs_files_are_python2_byte_strings_some_non_ascii(source):
    ops = Counter()
    non_ascii = []
    for dataset, files in FILES.items():
        for name in files - {"instances.json"}:
            data = (source / dataset / name).read_bytes()
            assert data[:2] == b"\x80\x02"
            for op, arg, _ in pickletools.genops(data):
                ops[op.name] += 1
                if op.name == "SHORT_BINSTRING" and any(ord(c) > 127 for c in arg):
                    non_ascii.append(arg)
    assert ops["SHORT_BINSTRING"] > 1000 and ops["BINUNICODE"] == ops["SHORT_BINUNICODE"] == 0
    assert non_ascii  # UTF-8 bytes of a dash or an ellipsis, as annotators typed them
    assert any("\u2026" in s["raw"] or "\u2013" in s["raw"]
               for r in load_py2_refs(source / "refcoco/refs(unc).p") for s in r["sentences"])


def test_py2_writer_round_trips_and_writes_binstring(tmp_path):
    refs = [{"raw": "x" * 300, "latin1": b"caf\xe9", "utf8": "café", "ids": [0, 255, 256, -3, 2**31, -(2**40)],
             "area": 12.5, "crowd": False, "none": None, "empty": []}]
    path = tmp_path / "refs(unc).p"
    write_py2_refs_pickle(refs, path)
    names = [op.name for op, _, _ in pickletools.genops(path.read_bytes())]
    assert "BINSTRING" in names and "SHORT_BINSTRING" in names and "BINUNICODE" not in names
    with open(path, "rb") as f:
        back = pickle.load(f, encoding="bytes")
    assert back == [{b"raw": b"x" * 300, b"latin1": b"caf\xe9", b"utf8": "café".encode(), b"area": 12.5,
                     b"ids": [0, 255, 256, -3, 2**31, -(2**40)], b"crowd": False, b"none": None, b"empty": []}]
    write_py2_refs_pickle([{"utf8": "café"}], path, encoding="latin-1")
    with open(path, "rb") as f:
        assert pickle.load(f, encoding="bytes") == [{b"utf8": b"caf\xe9"}]
    with pytest.raises(TypeError, match="tuple"):
        write_py2_refs_pickle([(1, 2)], path)


def test_deterministic_across_runs_and_workers(source, tmp_path):
    again = make_refer_source(tmp_path / "again", n_images=12, seed=0)
    parallel = make_refer_source(tmp_path / "parallel", n_images=12, seed=0, workers=2)
    assert tree_bytes(again) == tree_bytes(source) == tree_bytes(parallel)
    other = make_refer_source(tmp_path / "other", n_images=12, seed=1, datasets=("refcoco",))
    assert (other / "refcoco/refs(unc).p").read_bytes() != (source / "refcoco/refs(unc).p").read_bytes()
    assert {p.name for p in other.iterdir()} == {"images", "refcoco"}


@pytest.mark.parametrize("n_images, seed", [(12, 0), (12, 5), (13, 2), (40, 7)])
def test_split_semantics_hold_at_every_scale(n_images, seed, tmp_path):
    root = make_refer_source(tmp_path / "src", n_images=n_images, seed=seed)
    by_config = {}
    for cfg in REFS_CONFIGS.values():
        by_image = splits_by_image(root, cfg.dataset, cfg.split_by)
        by_config[cfg.name] = by_image
        present = set().union(*by_image.values())
        assert present == set(cfg.splits), cfg.name  # every split of every config is non-empty
        if cfg.partitions == "images":
            assert all(len(s) == 1 for s in by_image.values()), cfg.name
        else:  # google partitions objects: held-out images keep train refs
            assert any({"train", "val"} <= s for s in by_image.values()), cfg.name
    assert by_config["refcoco_unc"] == by_config["refcocoplus_unc"]
    unc_train = {i for i, s in by_config["refcoco_unc"].items() if s == {"train"}}
    umd_held_out = {i for i, s in by_config["refcocog_umd"].items() if s & {"val", "test"}}
    assert umd_held_out and umd_held_out <= unc_train  # train in RefCOCO, val/test in RefCOCOg
    for split, wants_people in (("testA", True), ("testB", False)):
        for ref in load_py2_refs(root / "refcoco/refs(unc).p"):
            if ref["split"] == split:
                assert (ref["category_id"] == 1) == wants_people


def test_real_proportions_at_moderate_scale(tmp_path):
    root = make_refer_source(tmp_path / "src", n_images=120, seed=0, datasets=("refcoco", "refcocog"))
    for dataset, split_by in (("refcoco", "unc"), ("refcoco", "google"), ("refcocog", "umd"), ("refcocog", "google")):
        refs = load_py2_refs(root / dataset / f"refs({split_by}).p")
        train = sum(r["split"] == "train" for r in refs) / len(refs)
        assert 0.75 < train < 0.93, (dataset, split_by, train)
    refs = load_py2_refs(root / "refcoco/refs(unc).p")
    assert 2.3 < len(refs) / 120 < 2.8  # RefCOCO: 50,000 refs on 19,994 images
    assert 2.6 < sum(len(r["sentences"]) for r in refs) / len(refs) < 3.0  # 142,210 expressions


def test_instances_hold_the_images_of_their_refs_and_all_their_objects(source, objects):
    images = {}
    for dataset, files in FILES.items():
        instances = json.loads((source / dataset / "instances.json").read_text())
        images[dataset] = {im["id"] for im in instances["images"]}
        for name in files - {"instances.json"}:
            assert {r["image_id"] for r in load_py2_refs(source / dataset / name)} == images[dataset]
        referred = {r["ann_id"] for r in load_py2_refs(source / dataset / sorted(files)[-1])}
        assert len(referred) < len(instances["annotations"])  # unreferred objects are annotated too
    assert images["refcoco"] == images["refcoco+"]
    assert images["refcocog"] < images["refcoco"]  # the datasets share most images, not all


def test_polygons_cover_the_drawn_object(source, objects):
    for ann in objects.values():
        assert np.abs(ann["mean"] - COLOURS[ann["colour"]]).max() < 30, ann["id"]
        assert abs(ann["mask_area"] - ann["area"]) <= 1
        x, y, w, h = ann["bbox"]
        xy = np.concatenate(ann["segmentation"]).reshape(-1, 2)
        assert np.allclose([x, y, x + w, y + h], [*xy.min(0), *xy.max(0)], atol=0.011)
    parts = Counter(len(a["segmentation"]) for a in objects.values())
    assert parts[1] and parts[2]
    assert any(a["max_overlap"] > 1 for a in objects.values())  # binarization matters
    assert any(len(a["segmentation"]) == 2 and a["max_overlap"] == 1 for a in objects.values())  # parts apart


def test_sentences_name_the_objects_colour_category_and_place(source, objects):
    by_image = defaultdict(list)
    for ann in objects.values():
        by_image[ann["image_id"]].append(ann)
    checked = Counter()
    for dataset in FILES:
        name = "refs(unc).p" if dataset != "refcocog" else "refs(umd).p"
        for ref in load_py2_refs(source / dataset / name):
            target = objects[ref["ann_id"]]
            cx, cy = target["centroid"]
            col = ("left", "middle", "right")[int(cx * 3)]
            row = ("top", "middle", "bottom")[int(cy * 3)]
            for s in ref["sentences"]:
                tokens = s["tokens"]
                colours = [t for t in tokens if t in COLOURS]
                assert colours[:1] in ([], [target["colour"]]), (dataset, s["raw"], target["colour"])
                checked["colour"] += bool(colours)
                assert CATEGORIES[target["category_id"]][0] in tokens or tokens[-1] == "one", s["raw"]
                places = PLACE_WORDS & set(tokens)
                if dataset == "refcoco+":  # appearance only, as RefCOCO+ was collected
                    assert not places | {"above", "below", "next"} & set(tokens), s["raw"]
                    areas = sorted(a["area"] for a in by_image[target["image_id"]])
                    assert ("big" not in tokens or target["area"] == areas[-1]) and ("small" not in tokens or target["area"] == areas[0])
                    continue
                for word in places:  # absolute place words say where the mask lies
                    assert word in (col, row) or (word == "middle" and col == row == "middle"), (s["raw"], cx, cy)
                    checked["place"] += 1
                relation = re.search(r"(above|below|next to) the (\w+) (\w+)", s["sent"])
                if relation:  # relations say where the mask lies against the named object
                    word, colour, category = relation.groups()
                    (other,) = [a for a in by_image[target["image_id"]]
                                if a["colour"] == colour and CATEGORIES[a["category_id"]][0] == category]
                    dy = cy - other["centroid"][1]
                    assert {"above": dy < 0, "below": dy > 0, "next to": abs(dy) < 1 / 3}[word], s["raw"]
                    checked["relation"] += 1
    assert checked["colour"] > 100 and checked["place"] > 20 and checked["relation"] > 3


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="n_images=3"):
        make_refer_source(tmp_path, n_images=3)
    with pytest.raises(ValueError, match="refclef"):
        make_refer_source(tmp_path, datasets=("refclef",))
