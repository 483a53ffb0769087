"""Refer files -> hub-ready folder -> plain `load_dataset`, for every config."""

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import REALDATA, needs_shared, write_tiny_source
from nemo_hf import masks
from nemo_hf.source import refer
from nemo_hf.cli import main
from nemo_hf.folder import BuildReport, build_folder
from nemo_hf.schema import REFS_CONFIGS
from nemo_hf.source.synthetic import make_refer_source, write_py2_refs_pickle


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    source = make_refer_source(tmp / "src", n_images=24, seed=3)
    out = build_folder(source, tmp / "out", ["all"], mining=None)
    return source, out


LOAD_WITHOUT_NEMO_HF = """
import json, sys
sys.modules["nemo_hf"] = None          # importing nemo_hf (or its builder) now fails
sys.modules["nemo_hf_builders"] = None
from datasets import load_dataset
folder = sys.argv[1]
out = {}
for config in sys.argv[2:]:
    dd = load_dataset(folder, config)
    out[config] = {split: [{k: v for k, v in row.items() if k != "image"} for row in ds] for split, ds in dd.items()}
    if config == "images":
        out["_image_sizes"] = [list(row["image"].size) for row in dd["train"]]
out["_default"] = list(load_dataset(folder))
print(json.dumps(out))
"""


def load_in_clean_process(folder, configs, cwd):
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_NEMO_HF, str(folder), *configs],
        capture_output=True, text=True, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                     "HF_DATASETS_CACHE": str(Path(cwd) / "cache"), "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_config_round_trips_through_plain_datasets(synthetic_build, tmp_path):
    source, out = synthetic_build
    configs = list(REFS_CONFIGS)
    loaded = load_in_clean_process(out, [*configs, "images"], tmp_path)
    assert loaded["_default"] == ["train", "val", "testA", "testB"]  # refcoco_unc is the default config

    for name, cfg in REFS_CONFIGS.items():
        refs = refer.load_refs(source / cfg.dataset / f"refs({cfg.split_by}).p")
        instances = json.loads((source / cfg.dataset / "instances.json").read_text())
        anns = {a["id"]: a for a in instances["annotations"]}
        images = {im["id"]: im for im in instances["images"]}
        assert list(loaded[name]) == list(cfg.splits)
        assert {s: len(rows) for s, rows in loaded[name].items()} == Counter(r["split"] for r in refs)
        by_id = {r["ref_id"]: r for r in refs}
        for split, rows in loaded[name].items():
            assert [r["ref_id"] for r in rows] == sorted(r["ref_id"] for r in refs if r["split"] == split)
            for row in rows:
                ref, ann = by_id[row["ref_id"]], anns[by_id[row["ref_id"]]["ann_id"]]
                im = images[ref["image_id"]]
                assert row["split"] == split and row["image_id"] == ref["image_id"] and row["ann_id"] == ref["ann_id"]
                assert row["file_name"] == im["file_name"] != ref["file_name"]
                assert row["bbox"] == ann["bbox"]
                assert [s["sent"] for s in row["sentences"]] == [s["sent"] for s in ref["sentences"]]
                assert [s["sent_id"] for s in row["sentences"]] == ref["sent_ids"]
                expected = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"]))
                got = mask_utils.decode({"size": row["mask"]["size"], "counts": row["mask"]["counts"].encode()})
                np.testing.assert_array_equal(got, (expected.sum(axis=2) > 0).astype(np.uint8))
                assert len(row["negatives"]) == len(row["sentences"])

    used = {row["image_id"] for name in configs for rows in loaded[name].values() for row in rows}
    assert sorted(r["image_id"] for r in loaded["images"]["train"]) == sorted(used)
    for row, size in zip(loaded["images"]["train"], loaded["_image_sizes"]):
        assert size == [row["width"], row["height"]]


def test_folder_is_self_contained(synthetic_build, tmp_path):
    source, out = synthetic_build
    import shutil

    from datasets import load_dataset

    copy = tmp_path / "moved"
    shutil.copytree(out, copy)  # the source stays where it is, but the copy must not need it
    images = load_dataset(str(copy), "images", split="train").cast_column("image", __import__("datasets").Image(decode=False))
    for row in images:
        assert row["image"]["bytes"] == (source / "images/mscoco/images/train2014" / row["file_name"]).read_bytes()


def test_counts_and_card(synthetic_build):
    source, out = synthetic_build
    report = BuildReport.read(out)
    card = (out / "README.md").read_text()
    for name, cfg in REFS_CONFIGS.items():
        refs = refer.load_refs(source / cfg.dataset / f"refs({cfg.split_by}).p")
        for split in cfg.splits:
            in_split = [r for r in refs if r["split"] == split]
            entry = report.configs[name]["splits"][split]
            assert entry["rows"] == len(in_split)
            assert entry["sentences"] == sum(len(r["sentences"]) for r in in_split)
            assert entry["images"] == len({r["image_id"] for r in in_split})
            assert f"| {name} | {split} | {entry['rows']:,} | {entry['sentences']:,} | {entry['images']:,} |" in card
    for needle in ("Flickr licence", "CC BY 4.0", "@inproceedings{ha2024nemo", "@inproceedings{lin2014microsoft",
                   "@inproceedings{kazemzadeh2014referitgame", "@inproceedings{mao2016generation", "| `negatives` |"):
        assert needle in card


def test_google_splits_share_images_and_pools_exclude_every_eval_image(synthetic_build):
    source, out = synthetic_build
    import pyarrow.parquet as pq

    eval_images, train_images = set(), {}
    for name, cfg in REFS_CONFIGS.items():
        refs = refer.load_refs(source / cfg.dataset / f"refs({cfg.split_by}).p")
        eval_images |= {r["image_id"] for r in refs if r["split"] != "train"}
        train_images[name] = {r["image_id"] for r in refs if r["split"] == "train"}
    google = refer.load_refs(source / "refcocog/refs(google).p")
    assert {r["image_id"] for r in google if r["split"] == "train"} & {r["image_id"] for r in google if r["split"] == "val"}
    table = pq.read_table(next((out / "data/images").glob("train-*.parquet")), columns=["image_id", "negative_pool_of"])
    pools = {name: set() for name in REFS_CONFIGS}
    for image_id, pool_of in zip(table["image_id"].to_pylist(), table["negative_pool_of"].to_pylist()):
        for name in pool_of:
            pools[name].add(image_id)
    for name in REFS_CONFIGS:
        assert pools[name], name
        assert not pools[name] & eval_images
        assert pools[name] == train_images[name] - eval_images


def test_rebuild_replaces_atomically_and_failure_keeps_old_build(tmp_path):
    source = write_tiny_source(tmp_path / "src")
    out = build_folder(source, tmp_path / "out", ["refcoco_unc"], mining=None)
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # a second dataset whose refs file is malicious fails the build mid-way (after refcoco_unc is written)
    (source / "refcocog").mkdir()
    (source / "refcocog/instances.json").write_text((source / "refcoco/instances.json").read_text())
    (source / "refcocog/refs(umd).p").write_bytes(pickle.dumps([__import__("collections").OrderedDict()], protocol=2))
    with pytest.raises(refer.ReferFormatError, match=r"refcocog/refs\(umd\)\.p: refused to load"):
        build_folder(source, tmp_path / "out", ["refcoco_unc", "refcocog_umd"], mining=None)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no partial folder left behind

    (source / "refcocog").rename(tmp_path / "gone")
    out = build_folder(source, tmp_path / "out", ["all"], mining=None)
    assert BuildReport.read(out).configs.keys() == {"refcoco_unc", "images"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "out", "src"]


def test_real_refcoco_ref_written_by_python2(tmp_path):
    """RefCOCO (unc) ref 0 with its real sentences and polygon, in a py2-style pickle."""
    real = json.loads(needs_shared(REALDATA / "annotations/transcribed_from_public_code.json").read_text())["refcoco_unc_ref_0"]
    ref, image, ann = real["ref"], real["image"], real["annotation"]
    refs = [dict(ref)] + [dict(ref, ref_id=i, split=s, sent_ids=[10 + i], sentences=[dict(ref["sentences"][0], sent_id=10 + i)])
                          for i, s in ((1, "val"), (2, "testA"), (3, "testB"))]
    image_id = ref["image_id"]
    root = write_tiny_source(
        tmp_path / "src",
        images=[{"id": image_id, "file_name": image["file_name"], "width": image["width"], "height": image["height"], "license": 1}],
        annotations=[{"id": ref["ann_id"], "image_id": image_id, "category_id": 1, "bbox": ann["bbox"], "segmentation": ann["segmentation"],
                      "area": ann["area"], "iscrowd": 0}],
        refs=[],
    )
    inst = json.loads((root / "refcoco/instances.json").read_text())
    inst["categories"] = [{"id": 1, "name": "person", "supercategory": "person"}]
    (root / "refcoco/instances.json").write_text(json.dumps(inst))
    write_py2_refs_pickle(refs, root / "refcoco/refs(unc).p")
    out = build_folder(root, tmp_path / "out", ["refcoco_unc"], mining=None)
    from datasets import load_dataset

    row = load_dataset(str(out), "refcoco_unc", split="train")[0]
    assert row["ref_id"] == 0 and row["ann_id"] == 1719310 and row["image_id"] == 581857
    assert row["file_name"] == "COCO_train2014_000000581857.jpg" and row["category"] == "person"
    assert [s["raw"] for s in row["sentences"]] == ["THE LADY WITH THE BLUE SHIRT", "lady w back to us", "blue shirt"]
    assert row["bbox"] == [103.93, 299.99, 134.22, 177.42]
    mask = masks.decode_rle(row["mask"])
    assert mask.shape == (640, 427)
    assert abs(int(mask.sum()) - ann["area"]) / ann["area"] < 0.03
    ys, xs = np.nonzero(mask)
    x, y, w, h = ann["bbox"]  # the mask fills its box to within a pixel on every side
    assert x <= xs.min() <= x + 1 and y <= ys.min() <= y + 1
    assert x + w - 2 <= xs.max() <= x + w and y + h - 2 <= ys.max() <= y + h


def test_demo_cli_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["build", "--out", str(tmp_path / "demo"), "--no-mining", "--demo-images", "12"]) == 0
    assert "wrote" in capsys.readouterr().out
    from datasets import load_dataset

    dd = load_dataset(str(tmp_path / "demo"), "refcocog_umd")
    assert set(dd) == {"train", "val", "test"} and all(len(ds) for ds in dd.values())


def test_cli_reports_bad_source_without_traceback(tmp_path, capsys):
    assert main(["build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-mining"]) == 2
    assert "source folder not found" in capsys.readouterr().err
    write_tiny_source(tmp_path / "src")
    assert main(["build", "--source", str(tmp_path / "src"), "--dataset", "refcocog", "--out", str(tmp_path / "o"), "--no-mining"]) == 2
    assert "refs(umd).p: not found, so config 'refcocog_umd' cannot be built" in capsys.readouterr().err
