"""Reading refer files: the restricted unpickler, Python 2 strings, masks, and bad input."""

import io
import json
import pickle
import pickletools

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import REALDATA, needs_shared, write_tiny_source
from nemo_hf import masks
from nemo_hf.source import refer
from nemo_hf.source.reader import ReferSource


def py2_pickle(obj) -> bytes:
    """What Python 2's cPickle.dump(obj, f, 2) writes: str as SHORT_BINSTRING/BINSTRING byte strings."""
    out = io.BytesIO()

    def save(o):
        if isinstance(o, bytes):
            if len(o) < 256:
                out.write(pickle.SHORT_BINSTRING + bytes([len(o)]) + o)
            else:
                out.write(pickle.BINSTRING + len(o).to_bytes(4, "little") + o)
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.write(pickle.BINUNICODE + len(data).to_bytes(4, "little") + data)
        elif isinstance(o, bool):
            out.write(pickle.NEWTRUE if o else pickle.NEWFALSE)
        elif isinstance(o, int):
            out.write(pickle.BININT + o.to_bytes(4, "little", signed=True))
        elif isinstance(o, float):
            out.write(pickle.BINFLOAT + np.float64(o).byteswap().tobytes())
        elif isinstance(o, list):
            out.write(pickle.EMPTY_LIST + pickle.MARK)
            for v in o:
                save(v)
            out.write(pickle.APPENDS)
        elif isinstance(o, dict):
            out.write(pickle.EMPTY_DICT + pickle.MARK)
            for k, v in o.items():
                save(k)
                save(v)
            out.write(pickle.SETITEMS)
        else:
            raise TypeError(o)

    out.write(pickle.PROTO + b"\x02")
    save(obj)
    out.write(pickle.STOP)
    return out.getvalue()


PY2_REF = {
    b"ref_id": 0, b"ann_id": 1, b"image_id": 2, b"category_id": 47, b"split": b"train",
    b"file_name": b"COCO_train2014_000000000002_1.jpg", b"sent_ids": [5],
    b"sentences": [
        {b"tokens": [b"caf\xc3\xa9", b"cup"], b"raw": b"Caf\xc3\xa9 cup", b"sent_id": 5, b"sent": b"caf\xc3\xa9 cup"},
        {b"tokens": [b"na\xefve"], b"raw": b"na\xefve", b"sent_id": 6, b"sent": b"na\xefve"},  # latin-1, not UTF-8
        {b"tokens": ["unicode"], b"raw": "unicode \u00fcber", b"sent_id": 7, b"sent": "unicode \u00fcber"},
    ],
}


def test_python2_byte_strings_are_read_as_text(tmp_path):
    data = py2_pickle([PY2_REF])
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert {"SHORT_BINSTRING", "BINUNICODE"} <= ops
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    [ref] = refer.load_refs(path)
    assert ref["split"] == "train" and ref["ref_id"] == 0
    assert ref["sentences"][0]["sent"] == "café cup"
    assert ref["sentences"][1]["sent"] == "naïve"  # latin-1 fallback
    assert ref["sentences"][2]["raw"] == "unicode über"


class Boom:
    def __reduce__(self):
        return (open, ("/tmp/nemo_hf_pwned", "w"))


@pytest.mark.parametrize("payload", [[Boom()], {"x": Boom()}, np.arange(3)])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: refused to load: global"):
        refer.load_refs(path)
    assert not (tmp_path / "nemo_hf_pwned").exists()


def test_truncated_or_foreign_pickle(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2)[:-5])
    with pytest.raises(refer.ReferFormatError, match="not a readable refs pickle"):
        refer.load_refs(path)
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(refer.ReferFormatError, match="expected a list of ref dicts"):
        refer.load_refs(path)
    path.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    with pytest.raises(refer.ReferFormatError, match="ref_id 1.*lacks ann_id"):
        refer.load_refs(path)


def test_mask_is_binarized_union_of_polygons():
    h, w = 40, 50
    polys = [[5, 5, 30, 5, 30, 30, 5, 30], [20, 20, 45, 20, 45, 38, 20, 38]]  # overlapping parts
    rle = masks.segmentation_to_rle(polys, h, w, "test")
    summed = mask_utils.decode(mask_utils.frPyObjects(polys, h, w)).sum(axis=2)
    assert summed.max() == 2  # the toolkit's sum exceeds 1 where parts overlap
    np.testing.assert_array_equal(masks.decode_rle(rle), (summed > 0).astype(np.uint8))
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)


def test_encode_rle_is_the_mask_column_and_decodes_back():
    mask = np.zeros((7, 9), np.uint8)
    mask[1:5, 2:8] = 3  # any non-zero value is the object
    rle = masks.encode_rle(mask)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    assert rle == masks.segmentation_to_rle([[2, 1, 8, 1, 8, 5, 2, 5]], 7, 9, "test")  # the same column as a build's
    np.testing.assert_array_equal(masks.decode_rle(rle), (mask > 0).astype(np.uint8))
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(masks.decode_rle(as_bytes), (mask > 0).astype(np.uint8))


def test_real_refcoco_polygons_match_pycocotools():
    data = json.loads(needs_shared(REALDATA / "annotations/rela_pr_instances_sample.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        rle = masks.segmentation_to_rle(ann["segmentation"], im["height"], im["width"], "real")
        ref = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])).sum(axis=2) > 0
        got = masks.decode_rle(rle)
        np.testing.assert_array_equal(got, ref.astype(np.uint8))
        assert abs(int(got.sum()) - ann["area"]) / ann["area"] < 0.05  # COCO's area is the polygon area
        x, y, bw, bh = ann["bbox"]
        ys, xs = np.nonzero(got)
        assert xs.min() >= int(x) - 1 and xs.max() <= x + bw + 1 and ys.min() >= int(y) - 1 and ys.max() <= y + bh + 1


@pytest.mark.parametrize("poly", [[1, 1, 5, 5], [1, 1, 5, 5, 9], []])
def test_degenerate_polygon_names_ref_and_annotation(tmp_path, poly):
    root = write_tiny_source(tmp_path)
    inst = json.loads((root / "refcoco/instances.json").read_text())
    inst["annotations"][1]["segmentation"] = [poly] if poly else []
    (root / "refcoco/instances.json").write_text(json.dumps(inst))
    with pytest.raises(refer.ReferFormatError, match=r"refs\(unc\)\.p: ref 1 \(annotation 112\)"):
        ReferSource(root).rows("refcoco_unc")


def test_missing_files_and_ids_name_what_is_wrong(tmp_path):
    root = write_tiny_source(tmp_path)
    (root / "refcoco/instances.json").unlink()
    with pytest.raises(refer.ReferFormatError, match=r"instances.json: not found, so config 'refcoco_unc'"):
        ReferSource(root).rows("refcoco_unc")

    root = write_tiny_source(tmp_path / "b")
    refs = refer.load_refs(root / "refcoco/refs(unc).p")
    refs[2]["ann_id"] = 999
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(refer.ReferFormatError, match="ref 2: annotation 999 is not in .*instances.json"):
        ReferSource(root).rows("refcoco_unc")

    refs[2]["ann_id"], refs[2]["image_id"] = 113, 777
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(refer.ReferFormatError, match="ref 2: image 777 is not in"):
        ReferSource(root).rows("refcoco_unc")

    refs[2]["image_id"], refs[2]["split"] = 13, "training"
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(refer.ReferFormatError, match="ref 2 has split 'training'"):
        ReferSource(root).rows("refcoco_unc")


def test_empty_sentence_is_an_error(tmp_path):
    root = write_tiny_source(tmp_path)
    refs = refer.load_refs(root / "refcoco/refs(unc).p")
    refs[4]["sentences"][1]["sent"] = refs[4]["sentences"][1]["raw"] = "  "
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(refer.ReferFormatError, match="ref 9: sentence 91 is empty"):
        ReferSource(root).rows("refcoco_unc")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = write_tiny_source(tmp_path)
    image_dir = root / "images/mscoco/images/train2014"
    (image_dir / "COCO_train2014_000000000012.jpg").unlink()
    data = (image_dir / "COCO_train2014_000000000013.jpg").read_bytes()
    (image_dir / "COCO_train2014_000000000013.jpg").write_bytes(data[: len(data) // 2])
    rows, skipped = ReferSource(root).rows("refcoco_unc")
    assert [r["ref_id"] for r in rows["train"]] == [0, 9]
    assert rows["val"] == [] and rows["testA"] == []
    assert skipped["val"] == ["ref 1: image 12 is missing"]
    assert "ref 2: image 13 is unreadable" in skipped["testA"][0]


def test_split_semantics_and_pool(tiny_source):
    source = ReferSource(tiny_source)
    rows, _ = source.rows("refcoco_unc")
    assert {s: [r["ref_id"] for r in v] for s, v in rows.items()} == {"train": [0, 9], "val": [1], "testA": [2], "testB": [3]}
    assert source.eval_image_ids == {12, 13, 14}
    assert source.training_pool("refcoco_unc") == [11]
    assert rows["train"][1]["file_name"] == "COCO_train2014_000000000011.jpg"  # not the ref's suffixed name
    assert rows["train"][1]["negatives"] == [[], []] and rows["train"][1]["negative_fallback"] == [False, False]
