"""Source images: kept iff PIL decodes them (libjpeg warnings counted), a val/test ref never dropped
quietly, orientation tags neutralised losslessly, and images that disagree with their rows refused.

Real COCO photos (../shared/realdata) stand in for the source's images.
"""

import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import simplejpeg
from PIL import Image, ImageOps

from conftest import REALDATA, needs_shared, write_tiny_source
from nemo_hf.cli import main
from nemo_hf.folder.build import MiningOptions, build_folder
from nemo_hf.folder.manifest import BuildReport
from nemo_hf.mining.embed import Embedder, ImageFiles
from nemo_hf.source.images import check_image, neutral_orientation
from nemo_hf.source.reader import IncompleteEvalError, ReferSource, open_source
from nemo_hf.source.refer import ReferFormatError
from nemo_hf.transforms.images import EncodedImage

IMAGE_DIR = "images/mscoco/images/train2014"
# images 11 (train), 12 (val), 13 (testA), 14 (testB), 15 (train); the last two are progressive JPEGs
PHOTOS = ("COCO_train2014_000000519404.jpg", "img_44266.jpg", "img_80472.jpg", "000000397133.jpg", "000000037777.jpg")
ORIENTATION = 0x0112


def photo_source(root):
    """The tiny refcoco/unc source over five real COCO photos: refs 0 and 9 on image 11 (train), 1 on 12
    (val), 2 on 13 (testA), 3 on 14 (testB), 10 on 15 (train)."""
    photos = [needs_shared(REALDATA / "images" / name).read_bytes() for name in PHOTOS]
    sizes = [Image.open(io.BytesIO(data)).size for data in photos]
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h, "license": 3}
        for i, (w, h) in zip((11, 12, 13, 14, 15), sizes)
    ]
    root = write_tiny_source(root, images=images)
    for image, data in zip(images, photos):
        (root / IMAGE_DIR / image["file_name"]).write_bytes(data)
    refs = pickle.loads((root / "refcoco/refs(unc).p").read_bytes())
    sentence = {"tokens": ["the", "cup"], "raw": "The cup", "sent_id": 100, "sent": "the cup"}
    refs.append({**refs[0], "ref_id": 10, "ann_id": 115, "image_id": 15, "file_name": "COCO_train2014_000000000015_115.jpg",
                 "sent_ids": [100], "sentences": [sentence]})
    (root / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


def image_file(root, image_id: int):
    return root / IMAGE_DIR / f"COCO_train2014_{image_id:012d}.jpg"


def junk_before_end_marker(jpeg: bytes, n: int = 3) -> bytes:
    """``n`` extraneous bytes before the final FFD9: libjpeg warns, PIL decodes it without a word (a
    progressive JPEG's decoder swallows the first few, so those get more)."""
    assert jpeg.endswith(b"\xff\xd9")
    return jpeg[:-2] + b"\x00" * n + jpeg[-2:]


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """An APP1 Exif segment holding only an orientation, inserted after SOI: the scan is untouched."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    payload = exif.tobytes()  # b"Exif\0\0" + TIFF
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def rows_per_split(out, config="refcoco_unc"):
    return {split: v["rows"] for split, v in BuildReport.read(out).configs[config]["splits"].items()}


def stored_images(out) -> dict[int, dict]:
    table = pq.read_table(next((out / "data/images").glob("*.parquet")))
    return {row["image_id"]: row for row in table.to_pylist()}


# ---------------------------------------------------------------- never stricter than PIL


def test_jpegs_pil_decodes_with_libjpeg_warnings_build_every_ref(tmp_path):
    root = photo_source(tmp_path / "src")
    warned = {}
    for image_id in (11, 12, 13, 14, 15):
        path = image_file(root, image_id)
        data = junk_before_end_marker(path.read_bytes(), 3 if image_id < 14 else 8)
        path.write_bytes(data)
        Image.open(io.BytesIO(data)).load()  # PIL: no error
        with pytest.raises(ValueError, match="extraneous bytes before marker 0xd9"):
            simplejpeg.decode_jpeg(data, strict=True)
        warned[image_id] = data

    mining = MiningOptions(model="demo-random", top_k=2, embed_cache_dir=str(tmp_path / "emb"))
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=mining)  # the embedder decodes them too

    assert rows_per_split(out) == {"train": 3, "val": 1, "testA": 1, "testB": 1}  # every ref
    report = BuildReport.read(out)
    assert report.configs["refcoco_unc"]["skipped"] == {}
    notes = report.images["decoded_with_warnings"]
    assert [n["image_id"] for n in notes] == [11, 12, 13, 14, 15]
    assert all(n["warning"].startswith("Corrupt JPEG data:") and "before marker 0xd9" in n["warning"] for n in notes)
    assert "5 decode with a libjpeg warning (e.g. image 11: Corrupt JPEG data" in (out / "README.md").read_text()
    stored = stored_images(out)
    for image_id, data in warned.items():
        assert stored[image_id]["image"]["bytes"] == data  # kept as they are
        # the mosaic's decoder falls back from its strict fast path to PIL: the same pixels as PIL's
        np.testing.assert_array_equal(EncodedImage(data).decode(Image.open(io.BytesIO(data)).size), pil_pixels(data))


def test_embedder_decodes_a_warning_jpeg_as_pil_does():
    data = junk_before_end_marker(needs_shared(REALDATA / "images" / PHOTOS[0]).read_bytes())

    def processor(images, return_tensors):  # the CLIP processor is not what is tested here
        return {"pixel_values": np.asarray(images, np.float32)[None]}

    pixels = ImageFiles([(7, data)], processor, sizes={7: (640, 480)})[0].numpy()
    np.testing.assert_array_equal(pixels, pil_pixels(data))


def test_a_truncated_jpeg_is_refused_as_pil_refuses_it(tmp_path):
    """Never more lenient than PIL either: libjpeg alone would decode it (grey fill), PIL raises."""
    data = needs_shared(REALDATA / "images" / PHOTOS[0]).read_bytes()
    truncated = data[: len(data) * 2 // 3]
    simplejpeg.decode_jpeg(truncated, strict=False)
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(truncated)).load()
    with pytest.raises(OSError, match="truncated"):
        check_image(truncated)


# ---------------------------------------------------------------- an evaluation split is complete or the build stops


def test_a_damaged_val_image_stops_the_build_naming_it_and_nothing_is_written(tmp_path, capsys):
    root = photo_source(tmp_path / "src")
    earlier = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    before = files_of(earlier)
    path = image_file(root, 12)  # val (ref 1)
    path.write_bytes(path.read_bytes()[:30000])  # truncated: PIL cannot decode it

    with pytest.raises(IncompleteEvalError) as caught:
        build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    message = str(caught.value)
    assert "1 val/test refs need an image that cannot be used" in message
    assert "image 12 COCO_train2014_000000000012.jpg is unreadable or damaged (OSError: image file is truncated" in message
    assert "(needed by refcoco_unc/val ref 1)" in message
    assert "Nothing was written" in message and "--skip-broken-eval-images" in message
    assert "\n" not in message
    assert files_of(tmp_path / "out") == before  # the earlier build untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no partial folder, no lock left

    assert main(["build", "--source", str(root), "--out", str(tmp_path / "cli"), "--no-mining"]) == 2
    assert "image 12 COCO_train2014_000000000012.jpg is unreadable" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()

    args = ["build", "--source", str(root), "--out", str(tmp_path / "cli"), "--no-mining", "--skip-broken-eval-images"]
    assert main(args) == 0
    report = BuildReport.read(tmp_path / "cli")
    assert report.skip_broken_eval_images
    skipped = report.configs["refcoco_unc"]["skipped"]
    assert list(skipped) == ["val"] and skipped["val"][0].startswith("ref 1: image 12 is unreadable or damaged")
    assert rows_per_split(tmp_path / "cli") == {"train": 3, "val": 0, "testA": 1, "testB": 1}
    card = (tmp_path / "cli/README.md").read_text()
    assert "refcoco_unc/val: 1 refs skipped" in card and "**Incomplete evaluation splits**" in card


def test_an_undecodable_training_image_is_skipped_and_counted_without_a_flag(tmp_path):
    root = photo_source(tmp_path / "src")
    path = image_file(root, 11)  # train: refs 0 and 9
    path.write_bytes(path.read_bytes()[:30000])
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    report = BuildReport.read(out)
    assert [s.split(":")[0] for s in report.configs["refcoco_unc"]["skipped"]["train"]] == ["ref 0", "ref 9"]
    assert rows_per_split(out) == {"train": 1, "val": 1, "testA": 1, "testB": 1}
    assert not report.skip_broken_eval_images
    assert "**Incomplete evaluation splits**" not in (out / "README.md").read_text()


def test_every_training_image_undecodable_builds_without_a_preview(tmp_path):
    """Nothing left to draw: the folder is built (evaluation splits complete), the card without a picture."""
    root = photo_source(tmp_path / "src")
    for image_id in (11, 15):  # every train image
        path = image_file(root, image_id)
        path.write_bytes(path.read_bytes()[:30000])
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    assert "train" not in rows_per_split(out) or rows_per_split(out)["train"] == 0
    assert not (out / "preview.png").exists() and "preview.png" not in (out / "README.md").read_text()


# ---------------------------------------------------------------- orientation: one pixel order for every reader


def test_exif_orientation_is_neutralised_so_load_dataset_agrees_with_the_mask(tmp_path):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    root = photo_source(tmp_path / "src")
    path = image_file(root, 12)  # val, 640x480
    plain = path.read_bytes()
    tagged = with_exif_orientation(plain, 6)
    path.write_bytes(tagged)
    assert ImageFeature().decode_example({"bytes": tagged, "path": None}).size == (480, 640)  # datasets rotates it

    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    report = BuildReport.read(out)
    assert report.images["orientation_neutralised"] == [
        {"image_id": 12, "file_name": "COCO_train2014_000000000012.jpg", "orientation": 6}
    ]
    stored = stored_images(out)[12]["image"]["bytes"]
    assert len(stored) == len(tagged) and sum(a != b for a, b in zip(stored, tagged)) == 1  # one byte: 6 -> 1
    assert stored.endswith(plain[2:])  # the scan, bit for bit

    images = load_dataset(str(out), "images", split="train")
    row = next(r for r in images if r["image_id"] == 12)
    assert row["image"].size == (row["width"], row["height"]) == (640, 480)
    np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), pil_pixels(plain))
    val = load_dataset(str(out), "refcoco_unc", split="val")[0]
    assert val["image_id"] == 12 and val["mask"]["size"] == [480, 640]
    assert "1 carried an EXIF orientation tag" in (out / "README.md").read_text()


@pytest.mark.parametrize("variant", ["jpeg_exif_ii", "jpeg_exif_mm", "jpeg_xmp", "png_exif"])
def test_orientation_is_set_to_1_without_touching_the_pixels(variant):
    photo = Image.open(needs_shared(REALDATA / "images" / PHOTOS[2]))
    exif = Image.Exif()
    exif[ORIENTATION] = 8
    buf = io.BytesIO()
    if variant == "png_exif":
        photo.save(buf, "PNG", exif=exif)
        data = buf.getvalue()
    elif variant == "jpeg_xmp":
        photo.save(buf, "JPEG", quality=90)
        xmp = b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
        data = buf.getvalue()[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + buf.getvalue()[2:]
    else:
        photo.save(buf, "JPEG", quality=90)
        data = with_exif_orientation(buf.getvalue(), 8)
        if variant == "jpeg_exif_ii":  # the same entry, little-endian
            data = data.replace(b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08",
                                b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x08\x00")
    assert Image.open(io.BytesIO(data)).getexif().get(ORIENTATION) == 8
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == photo.size[::-1]
    assert check_image(data).orientation == 8

    fixed = neutral_orientation(data)
    assert len(fixed) == len(data) and fixed != data
    assert Image.open(io.BytesIO(fixed)).getexif().get(ORIENTATION, 1) == 1
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(fixed))).size == photo.size
    np.testing.assert_array_equal(pil_pixels(fixed), pil_pixels(data))
    assert neutral_orientation(fixed) is fixed  # nothing left to do


def test_an_orientation_that_cannot_be_neutralised_losslessly_makes_the_image_unusable():
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    Image.open(needs_shared(REALDATA / "images" / PHOTOS[1])).save(buf, "WEBP", exif=exif)
    with pytest.raises(ReferFormatError, match=r"orientation that nemo_hf cannot set to 1 without re-encoding \(a WEBP file"):
        check_image(buf.getvalue())


# ---------------------------------------------------------------- images that disagree with their rows


def test_an_image_declared_with_two_sizes_is_an_error_naming_both(tmp_path):
    root = photo_source(tmp_path / "src")
    (root / "refcocog").mkdir()
    instances = json.loads((root / "refcoco/instances.json").read_text())
    instances["images"][1]["width"] = 600  # image 12, 640 in refcoco's file
    (root / "refcocog/instances.json").write_text(json.dumps(instances))
    refs = pickle.loads((root / "refcoco/refs(unc).p").read_bytes())
    for ref in refs:
        ref["split"] = {"testA": "test", "testB": "test"}.get(ref["split"], ref["split"])
    (root / "refcocog/refs(umd).p").write_bytes(pickle.dumps(refs, protocol=2))

    with pytest.raises(ReferFormatError) as caught:
        build_folder(root, tmp_path / "out", ["refcoco_unc", "refcocog_umd"], mining=None)
    message = str(caught.value)
    assert message.startswith("image 12 is declared differently by two instances.json files: ")
    assert f"{root}/refcoco/instances.json says COCO_train2014_000000000012.jpg 640x480" in message
    assert f"{root}/refcocog/instances.json says COCO_train2014_000000000012.jpg 600x480" in message
    assert not (tmp_path / "out").exists()


def test_an_image_replaced_before_it_is_embedded_is_an_error(tmp_path, monkeypatch):
    root = photo_source(tmp_path / "src")
    real = Embedder.embed_images

    def replaced_first(self, images, *args, **kwargs):  # another process rewrites image 11 meanwhile
        Image.open(io.BytesIO(image_file(root, 11).read_bytes())).transpose(Image.Transpose.ROTATE_90).save(image_file(root, 11))
        monkeypatch.setattr(Embedder, "embed_images", real)
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(Embedder, "embed_images", replaced_first)
    mining = MiningOptions(model="demo-random", top_k=2, embed_cache_dir=str(tmp_path / "emb"))
    with pytest.raises(ValueError, match=r"image 11: .*COCO_train2014_000000000011.jpg is 480x640, but its rows were "
                                         r"made for 640x480: the file changed after it was checked"):
        build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=mining)
    assert not (tmp_path / "out").exists()


def test_an_image_replaced_before_it_is_stored_is_an_error_and_the_next_build_reads_it_again(tmp_path, monkeypatch):
    root = photo_source(tmp_path / "src")
    real = ReferSource.image_bytes

    def replaced_first(self, image):  # the same size is no defence: the content is not what was checked
        if image["id"] == 12:
            path = image_file(root, 12)
            Image.open(io.BytesIO(path.read_bytes())).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
            monkeypatch.setattr(ReferSource, "image_bytes", real)
        return real(self, image)

    monkeypatch.setattr(ReferSource, "image_bytes", replaced_first)
    source = open_source(root)
    with pytest.raises(ReferFormatError, match=r"image 12: .*COCO_train2014_000000000012.jpg changed after nemo_hf "
                                               r"checked it .* run the build again"):
        build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    assert not (tmp_path / "out").exists()
    assert open_source(root) is not source  # forgotten: the next build checks every image again
