"""The images config's ``objects``: every instance of every image, bit-exact with pycocotools."""

import json

import numpy as np
import pytest
from datasets import load_dataset
from pycocotools import mask as mask_utils

from conftest import REALDATA, needs_shared, write_tiny_source
from nemo_hf import masks
from nemo_hf.source import refer
from nemo_hf.folder import build_folder
from nemo_hf.source.synthetic import make_refer_source


def toolkit_mask(segmentation, h, w) -> np.ndarray:
    """What pycocotools gives: polygons summed then binarized, or a crowd RLE decoded."""
    decoded = mask_utils.decode(mask_utils.frPyObjects(segmentation, h, w))
    return (decoded.sum(axis=2) > 0 if decoded.ndim == 3 else decoded > 0).astype(np.uint8)


def test_synthetic_build_holds_every_instance_referred_or_not(tmp_path):
    source = make_refer_source(tmp_path / "src", n_images=10, seed=4)
    out = build_folder(source, tmp_path / "out", ["all"], mining=None)
    images = load_dataset(str(out), "images", split="train")
    annotations, categories, referred = {}, {}, set()
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        data = json.loads((source / dataset / "instances.json").read_text())
        sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        annotations.update((a["id"], (a, sizes[a["image_id"]])) for a in data["annotations"])
        categories.update((c["id"], (c["name"], c["supercategory"])) for c in data["categories"])
    ref_masks = {}
    for config in ("refcoco_unc", "refcocog_umd"):
        for split in load_dataset(str(out), config).values():
            ref_masks.update((row["ann_id"], row["mask"]) for row in split)
            referred |= set(split["ann_id"])
    seen = 0
    for row in images.select_columns(["image_id", "objects"]):
        expected = sorted(a_id for a_id, (a, _) in annotations.items() if a["image_id"] == row["image_id"])
        assert [o["ann_id"] for o in row["objects"]] == expected
        for obj in row["objects"]:
            ann, (h, w) = annotations[obj["ann_id"]]
            assert (obj["category"], obj["supercategory"]) == categories[ann["category_id"]]
            assert obj["category_id"] == ann["category_id"] and obj["bbox"] == ann["bbox"]
            assert obj["area"] == ann["area"] and obj["iscrowd"] is False and obj["mask"]["size"] == [h, w]
            np.testing.assert_array_equal(masks.decode_rle(obj["mask"]), toolkit_mask(ann["segmentation"], h, w))
            if obj["ann_id"] in ref_masks:
                assert obj["mask"] == ref_masks[obj["ann_id"]]  # the same RLE string as the refs row
            seen += 1
    assert seen == len(annotations) > len(referred)  # unreferred instances are in too


def test_real_polygons_and_a_crowd_rle(tmp_path):
    """RefCOCO's real instances.json opening, plus a COCO-style crowd annotation (uncompressed RLE)."""
    data = json.loads(needs_shared(REALDATA / "annotations/rela_pr_instances_sample.json").read_text())
    image = data["images"][0]
    h, w = image["height"], image["width"]
    crowd_mask = np.zeros((h, w), np.uint8)
    crowd_mask[100:140, 30:90] = 1
    crowd_mask[200:210, 300:400] = 1
    flat = crowd_mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()  # starts with a zero run
    crowd = {"id": 900100, "image_id": image["id"], "category_id": 1, "iscrowd": 1, "area": float(crowd_mask.sum()),
             "bbox": [30.0, 100.0, 370.0, 110.0], "segmentation": {"counts": counts, "size": [h, w]}}
    data["annotations"].append(crowd)
    # the sample's categories list stops at id 3: complete it with COCO's for its three instances
    data["categories"] += [{"id": 18, "name": "dog", "supercategory": "animal"},
                           {"id": 62, "name": "chair", "supercategory": "furniture"},
                           {"id": 63, "name": "couch", "supercategory": "furniture"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    objects = refer.image_objects([refer.load_instances(path)], image["id"])
    real = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    assert [o["ann_id"] for o in objects] == [3007, 99893, 108703, 900100]
    assert [(o["category"], o["supercategory"]) for o in objects[:3]] == [
        ("dog", "animal"), ("couch", "furniture"), ("chair", "furniture")]
    for obj in objects:
        ann = next(a for a in real if a["id"] == obj["ann_id"])
        np.testing.assert_array_equal(masks.decode_rle(obj["mask"]), toolkit_mask(ann["segmentation"], h, w))
        assert obj["iscrowd"] is bool(ann["iscrowd"]) and obj["bbox"] == ann["bbox"] and obj["area"] == ann["area"]
    (got,) = [o for o in objects if o["iscrowd"]]
    np.testing.assert_array_equal(masks.decode_rle(got["mask"]), crowd_mask)
    expected = mask_utils.frPyObjects(crowd["segmentation"], h, w)
    assert got["mask"]["counts"] == expected["counts"].decode()  # bit-exact: the crowd's own RLE, compressed
    assert got["category"] == "person" and got["supercategory"] == "person"


def test_tiny_build_keeps_crowd_and_names_a_bad_annotation(tmp_path):
    annotations = [
        {"id": 100 + i, "image_id": i, "category_id": 47, "bbox": [8.0, 10.0, 32.0, 20.0],
         "segmentation": [[8, 10, 40, 10, 40, 30, 8, 30]], "area": 640.0, "iscrowd": 0} for i in (11, 12, 13, 14)
    ] + [
        {"id": 200, "image_id": 11, "category_id": 47, "bbox": [0.0, 0.0, 10.0, 10.0],
         "segmentation": [[0, 0, 10, 0, 10, 10], [0, 0, 10, 10, 0, 10]], "area": 100.0, "iscrowd": 0},
        {"id": 300, "image_id": 11, "category_id": 47, "bbox": [0.0, 40.0, 64.0, 8.0], "area": 512.0, "iscrowd": 1,
         "segmentation": {"counts": [40, 8] * 64, "size": [48, 64]}},
    ]
    root = write_tiny_source(tmp_path / "src", annotations=annotations)
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    images = {row["image_id"]: row["objects"] for row in load_dataset(str(out), "images", split="train")}
    assert [o["ann_id"] for o in images[11]] == [111, 200, 300] and [o["ann_id"] for o in images[12]] == [112]
    crowd = images[11][2]
    assert crowd["iscrowd"] and crowd["supercategory"] == "kitchen"
    assert masks.decode_rle(crowd["mask"])[40:].all() and not masks.decode_rle(crowd["mask"])[:40].any()

    annotations[-1]["segmentation"] = [[1, 2, 3, 4]]
    root = write_tiny_source(tmp_path / "bad", annotations=annotations)
    with pytest.raises(refer.ReferFormatError, match=r"instances.json: annotation 300 \(image 11\)"):
        build_folder(root, tmp_path / "out2", ["refcoco_unc"], mining=None)
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out2").exists()
