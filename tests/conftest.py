import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REALDATA = SHARED / "realdata"


def needs_shared(path: Path) -> Path:
    """Tests on real data use ../shared (beside the checkout in CI); say so when it is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: real-data tests need the shared/ folder beside the checkout")
    return path


@pytest.fixture(scope="session", autouse=True)
def _temp_files_under_pytest(tmp_path_factory):
    """Temporary folders of this process and of every process a test starts (a rank's scratch folder, which
    a killed rank cannot remove, torchrun's torchelastic_*) go under pytest's base folder, which pytest
    prunes, never left in /tmp."""
    import tempfile

    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    tempfile.tempdir = None  # computed again from TMPDIR
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own datasets cache, so no test sees another's builds."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(cache))


def write_tiny_source(root: Path, refs=None, images=None, annotations=None) -> Path:
    """A hand-made refcoco/unc source: 4 images, one ref per split plus a second train ref.

    Small enough to edit in a test to make one thing wrong.
    """
    root = Path(root)
    image_dir = root / "images/mscoco/images/train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    if images is None:
        images = [
            {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 64, "height": 48, "license": 3}
            for i in (11, 12, 13, 14)
        ]
    for im in images:
        arr = np.zeros((im["height"], im["width"], 3), np.uint8)
        arr[..., 0] = np.linspace(0, 255, im["width"], dtype=np.uint8)
        arr[10:30, 8:40] = (200, 30, 30)
        Image.fromarray(arr).save(image_dir / im["file_name"], quality=90)
    if annotations is None:
        annotations = [
            {"id": 100 + im["id"], "image_id": im["id"], "category_id": 47, "bbox": [8.0, 10.0, 32.0, 20.0],
             "segmentation": [[8, 10, 40, 10, 40, 30, 8, 30]], "area": 640.0, "iscrowd": 0}
            for im in images
        ] + [
            {"id": 200, "image_id": 11, "category_id": 47, "bbox": [0.0, 0.0, 10.0, 10.0],
             "segmentation": [[0, 0, 10, 0, 10, 10], [0, 0, 10, 10, 0, 10]], "area": 100.0, "iscrowd": 0}
        ]
    if refs is None:
        splits = {11: "train", 12: "val", 13: "testA", 14: "testB"}
        refs = [
            {"ref_id": n, "ann_id": 100 + i, "image_id": i, "category_id": 47, "split": splits[i],
             "file_name": f"COCO_train2014_{i:012d}_{100 + i}.jpg", "sent_ids": [10 * n],
             "sentences": [{"tokens": ["the", "red", "cup"], "raw": "The red cup", "sent_id": 10 * n, "sent": "the red cup"}]}
            for n, i in enumerate((11, 12, 13, 14))
        ] + [
            {"ref_id": 9, "ann_id": 200, "image_id": 11, "category_id": 47, "split": "train",
             "file_name": "COCO_train2014_000000000011_200.jpg", "sent_ids": [90, 91],
             "sentences": [{"tokens": ["top", "left", "cup"], "raw": "top left cup", "sent_id": 90, "sent": "top left cup"},
                           {"tokens": ["small", "one"], "raw": "small one", "sent_id": 91, "sent": "small one"}]}
        ]
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 47, "name": "cup", "supercategory": "kitchen"}]}
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    with open(root / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    return write_tiny_source(tmp_path / "src")
