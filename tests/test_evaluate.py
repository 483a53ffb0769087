"""`nemo-hf eval`: a hand-made split and predictions file against a hand computation, and the breakdowns."""

import json

import numpy as np
import pytest
from datasets import load_dataset

from conftest import write_tiny_source
from nemo_hf import masks
from nemo_hf.cli import main
from nemo_hf.evaluation.scoring import EvaluationError, Expressions, evaluate_predictions, split_tables
from nemo_hf.folder import build_folder
from nemo_hf.transforms.mosaic import EvalTransform, explode_sentences
from nemo_hf.evaluation.predictions import PredictionWriter, PredictionsFormatError, read_predictions, write_predictions
from nemo_hf.source.synthetic import make_refer_source
from nemo_hf.training import RISTrainer


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def sentence(sent_id, text):
    return {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()}


@pytest.fixture(scope="module")
def hand_folder(tmp_path_factory):
    """val: five expressions on three images, each placed in known buckets (see the test's table)."""
    tmp = tmp_path_factory.mktemp("hand")
    sizes = {11: (64, 48), 12: (64, 48), 13: (64, 48), 14: (64, 48), 15: (64, 48), 16: (128, 96)}
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h, "license": 1}
              for i, (w, h) in sizes.items()]

    def ann(ann_id, image_id, segmentation, category_id=47, iscrowd=0):
        return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [0.0, 0.0, 1.0, 1.0],
                "segmentation": segmentation, "area": 1.0, "iscrowd": iscrowd}

    annotations = [
        ann(111, 11, rect(8, 10, 40, 30)), ann(114, 14, rect(8, 10, 40, 30)), ann(115, 15, rect(8, 10, 40, 30)),
        ann(112, 12, rect(8, 10, 40, 30)),  # 640 px, a cup
        ann(212, 12, rect(0, 0, 10, 10)),  # 100 px, a second cup in image 12
        ann(312, 12, rect(44, 30, 60, 46), category_id=1),  # a person nobody refers to
        ann(412, 12, {"counts": [3072], "size": [48, 64]}, iscrowd=1),  # an (empty) crowd of cups: not counted
        ann(113, 13, rect(8, 4, 48, 44)),  # 1,600 px: medium
        ann(116, 16, rect(0, 0, 128, 96), category_id=1),  # 12,288 px: large
    ]

    def ref(ref_id, ann_id, image_id, split, sentences, category_id=47):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": category_id, "split": split,
                "file_name": "x.jpg", "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences}

    refs = [
        ref(0, 111, 11, "train", [sentence(0, "a cup")]),
        ref(1, 112, 12, "val", [sentence(10, "the red cup"), sentence(11, "cup")]),
        ref(2, 113, 13, "val", [sentence(20, "big red cup on the left of the table near the window")]),
        ref(3, 212, 12, "val", [sentence(30, "small cup top left")]),
        ref(4, 116, 16, "val", [sentence(40, "everything")], category_id=1),
        ref(5, 114, 14, "testA", [sentence(50, "cup")]),
        ref(6, 115, 15, "testB", [sentence(60, "cup")]),
    ]
    root = write_tiny_source(tmp / "src", refs=refs, images=images, annotations=annotations)
    instances = json.loads((root / "refcoco/instances.json").read_text())
    instances["categories"].append({"id": 1, "name": "person", "supercategory": "person"})
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    return build_folder(root, tmp / "out", ["refcoco_unc"], mining=None)


def ground_truth(folder) -> dict[int, np.ndarray]:
    refs = load_dataset(str(folder), "refcoco_unc", split="val")
    return {s["sent_id"]: masks.decode_rle(row["mask"]) for row in refs for s in row["sentences"]}


def shifted(mask, dy=0, dx=0):
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[dy:, dx:] = mask[: h - dy, : w - dx]
    return out


def hand_predictions(gt):
    """Perfect, empty, shifted by 10 px (IoU exactly 0.6), shifted by 5 px (1/3), perfect again."""
    return {10: gt[10], 11: np.zeros_like(gt[11]), 20: shifted(gt[20], dx=10), 30: shifted(gt[30], dy=5), 40: gt[40]}


def score(folder, path, **options):
    refs, images = split_tables(folder, "refcoco_unc", "val")
    return evaluate_predictions(Expressions.from_tables(refs, images), path, **options)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_scores_match_a_hand_computation(hand_folder, tmp_path, suffix):
    gt = ground_truth(hand_folder)
    assert {k: int(v.sum()) for k, v in gt.items()} == {10: 640, 11: 640, 20: 1600, 30: 100, 40: 12288}
    path = write_predictions(tmp_path / f"preds{suffix}", hand_predictions(gt))
    report = score(hand_folder, path)
    # (I, U): (640, 640) (0, 640) (1200, 2000) (50, 150) (12288, 12288)
    m = report["metrics"]
    assert m["n_expressions"] == 5
    assert m["oIoU"] == pytest.approx((640 + 0 + 1200 + 50 + 12288) / (640 + 640 + 2000 + 150 + 12288), abs=1e-12)
    assert m["mIoU"] == pytest.approx((1 + 0 + 0.6 + 1 / 3 + 1) / 5, abs=1e-12)
    assert [m[f"Prec@{x}"] for x in ("0.5", "0.6", "0.7", "0.8", "0.9")] == [0.6, 0.6, 0.4, 0.4, 0.4]
    strict = score(hand_folder, path, strict=True)["metrics"]
    assert strict["Prec@0.6"] == 0.4 and strict["Prec@0.5"] == 0.6  # IoU exactly 0.6 is no hit under >
    b = {key: {r["bucket"]: (r["n"], r["oIoU"], r["mIoU"]) for r in rows} for key, rows in report["breakdowns"].items()}
    assert b["same_category"] == {"1": (2, pytest.approx(13488 / 14288), pytest.approx(0.8)), "2": (3, 690 / 1430, pytest.approx(4 / 9)),
                                  "3-4": (0, None, None), "5+": (0, None, None)}
    assert {k: v[0] for k, v in b["length"].items()} == {"1-2": 2, "3-5": 2, "6-9": 0, "10+": 1}
    assert b["length"]["1-2"][1:] == (12288 / 12928, 0.5)
    assert b["spatial_words"] == {"yes": (2, 1250 / 2150, pytest.approx((0.6 + 1 / 3) / 2)), "no": (3, 12928 / 13568, pytest.approx(2 / 3))}
    assert {k: v[0] for k, v in b["supercategory"].items()} == {"kitchen": 4, "person": 1}
    assert {k: v[0] for k, v in b["area"].items()} == {"small": 3, "medium": 1, "large": 1}
    for rows in report["breakdowns"].values():
        assert sum(r["n"] for r in rows) == 5
    assert report["convention"]["precision"].startswith("Prec@X counts IoU >= X")


def test_missing_duplicate_unknown_and_wrong_size_are_named(hand_folder, tmp_path):
    gt = ground_truth(hand_folder)
    preds = hand_predictions(gt)
    with pytest.raises(EvaluationError, match=r"1 missing sent_id\(s\).*: 11"):
        score(hand_folder, write_predictions(tmp_path / "a.jsonl", {k: v for k, v in preds.items() if k != 11}))
    allowed = score(hand_folder, tmp_path / "a.jsonl", allow_missing=True)  # missing = empty: as the hand table
    assert allowed["metrics"] == score(hand_folder, write_predictions(tmp_path / "b.jsonl", preds))["metrics"]
    assert allowed["convention"]["missing_scored_empty"] == 1
    bad = [(10, preds[10]), (10, preds[10]), (999, preds[10]), (11, preds[11].T), *[(k, preds[k]) for k in (20, 30, 40)]]
    with pytest.raises(EvaluationError) as err:
        score(hand_folder, write_predictions(tmp_path / "c.jsonl", bad))
    message = str(err.value)
    assert "c.jsonl: the predictions do not match the split" in message
    assert "1 duplicate sent_id(s): 10 (" in message and "c.jsonl:2" in message
    assert "1 unknown sent_id(s), not in the split: 999" in message
    assert "sent_id 11 is 64x48 (h x w), its image 48x64" in message
    (tmp_path / "d.jsonl").write_text('{"sent_id": 10, "mask": {"size": [48, 64], "counts": "abc"}}\n')
    with pytest.raises(EvaluationError, match="sent_id 10 .*d.jsonl:1"):
        score(hand_folder, tmp_path / "d.jsonl", allow_missing=True)
    (tmp_path / "e.jsonl").write_text('{"sent_id": "10", "mask": null}\n')
    with pytest.raises(PredictionsFormatError, match=r"e.jsonl:1: sent_id '10' is not an integer"):
        list(read_predictions(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError, match=r"ends in .jsonl .* or .parquet"):
        PredictionWriter(tmp_path / "f.json")


def test_cli_prints_the_convention_and_writes_json_and_plot(hand_folder, tmp_path, capsys):
    path = write_predictions(tmp_path / "p.parquet", hand_predictions(ground_truth(hand_folder)))
    args = ["eval", str(hand_folder), "--config", "refcoco_unc", "--split", "val", "--predictions", str(path)]
    assert main([*args, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--empty-iou", "1"]) == 0
    out = capsys.readouterr().out
    assert "refcoco_unc/val" in out and "5 expressions" in out
    assert "convention: IoU at each image's original size; Prec@X counts IoU >= X (LAVT, CARIS)" in out
    assert "both empty scores IoU 1" in out and "by instances of the target's category in the image" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"] == "refcoco_unc" and report["metrics"]["n_expressions"] == 5
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*args[:-1], str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: predictions file not found" in capsys.readouterr().err
    assert main([*args[:4], "--split", "test", *args[6:]]) == 2
    assert "has no split 'test'" in capsys.readouterr().err


def test_writer_maps_eval_outputs_back_and_buckets_add_up(tmp_path):
    source = make_refer_source(tmp_path / "src", n_images=16, seed=2, datasets=("refcocog",))
    out = build_folder(source, tmp_path / "out", ["refcocog_umd"], mining=None)
    refs = load_dataset(str(out), "refcocog_umd", split="train")
    images = load_dataset(str(out), "images", split="train")
    rows = explode_sentences(refs).with_transform(EvalTransform(images, output_size=96, return_arrays=True))
    with PredictionWriter(tmp_path / "train.jsonl") as writer:
        for row in rows:
            writer.add(row, row["mask"].astype(np.float32))  # a probability map over the square
    expressions = Expressions.from_datasets(refs, images)
    report = evaluate_predictions(expressions, tmp_path / "train.jsonl")
    assert report["metrics"]["n_expressions"] == len(rows) == len(expressions) > 20
    assert report["metrics"]["oIoU"] > 0.9  # the ground truth through a 96-pixel square and back
    for key, buckets in report["breakdowns"].items():
        assert sum(r["n"] for r in buckets) == len(rows), key
    assert sum(r["n"] > 0 for r in report["breakdowns"]["same_category"]) >= 2


def test_trainer_saves_predictions_that_eval_scores_the_same_with_breakdowns(tmp_path):
    """RISTrainer's metrics and breakdowns equal `nemo-hf eval`'s on the predictions file it saved."""
    import warnings

    import pyarrow as pa
    import torch

    from nemo_hf.training import tiny_random_clipseg
    from test_training import SENTENCES, args, eval_dataset, scene

    sizes = [(16, 32), (32, 16), (24, 24), (8, 32), (32, 32), (16, 8)]
    refs = pa.Table.from_pylist([
        {"ann_id": i, "image_id": i, "category_id": 1 + i % 2, "mask": masks.encode_rle(scene(i, *sizes[i])[1]),
         "sentences": [sentence(100 + i, SENTENCES[i % 4])]} for i in range(6)
    ])  # fmt: skip
    objects = [[{"ann_id": i, "category_id": 1 + i % 2, "iscrowd": False, "supercategory": "abc"[i % 3]}]
               + [{"ann_id": 50 + i, "category_id": 1 + i % 2, "iscrowd": False, "supercategory": "x"}] * (i % 3)
               for i in range(6)]  # fmt: skip
    expressions = Expressions.from_tables(refs, pa.Table.from_pylist([{"image_id": i, "objects": o} for i, o in enumerate(objects)]))
    model, processor = tiny_random_clipseg(image_size=32, seed=0)
    torch.set_num_threads(1)
    results = []
    for streaming in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = RISTrainer(model=model, args=args(tmp_path, batch_eval_metrics=streaming), processing_class=processor,
                                 eval_dataset=eval_dataset(6), eval_expressions=expressions,
                                 predictions_path=tmp_path / f"preds{int(streaming)}.parquet")
        results.append(trainer.evaluate())
    timing = ("runtime", "per_second", "preparation_time")
    results = [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in results]
    assert results[0] == pytest.approx(results[1])
    metrics = results[0]
    assert metrics["eval_same_category/1/n"] == 2 and metrics["eval_same_category/2/n"] == 2
    assert metrics["eval_same_category/3-4/n"] == 2 and "eval_same_category/5+/oIoU" not in metrics  # empty bucket
    report = evaluate_predictions(expressions, tmp_path / "preds0.parquet")
    assert report["metrics"]["oIoU"] == pytest.approx(metrics["eval_oIoU"], abs=1e-12)
    assert report["metrics"]["mIoU"] == pytest.approx(metrics["eval_mIoU"], abs=1e-12)
    for key, rows in report["breakdowns"].items():
        assert sum(r["n"] for r in rows) == 6
        for row in rows:
            for name in ("n", "oIoU", "mIoU"):
                if row[name] is not None:
                    assert metrics[f"eval_{key}/{row['bucket']}/{name}"] == pytest.approx(row[name], abs=1e-12)
    assert (tmp_path / "preds1.parquet").read_bytes() == (tmp_path / "preds0.parquet").read_bytes()
    with pytest.raises(ValueError, match="ends in .jsonl"):
        RISTrainer(model=model, args=args(tmp_path), processing_class=processor, predictions_path=tmp_path / "p.txt")


def test_writer_leaves_nothing_behind_on_error_and_reads_back(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:7] = 1
    with pytest.raises(RuntimeError):
        with PredictionWriter(tmp_path / "p.parquet", batch_rows=1) as writer:
            writer.add_mask(1, mask)
            writer.add_mask(2, mask)  # flushed to the partial file
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="sent_id 3: a mask must be 2-D"):
        PredictionWriter(tmp_path / "q.jsonl").add_mask(3, mask[None])
    for suffix in (".jsonl", ".parquet"):
        path = write_predictions(tmp_path / f"r{suffix}", [(7, mask), (8, masks.encode_rle(mask[::-1]))])
        back = [(s, masks.decode_rle(m)) for s, m, _ in read_predictions(path)]
        assert [s for s, _ in back] == [7, 8]
        np.testing.assert_array_equal(back[0][1], mask)
        np.testing.assert_array_equal(back[1][1], mask[::-1])
    assert list(read_predictions(write_predictions(tmp_path / "empty.parquet", {}))) == []


def test_a_counts_string_pycocotools_misreads_is_refused_not_hung(hand_folder, tmp_path):
    """Runs [5, 30, 40, 10, 2987] (48*64 pixels) with the -20 delta of the fourth run written in 8 characters:
    pycocotools shifts each 5-bit group in a 32-bit int, reads another mask of more pixels, and merging it with
    the ground truth loops forever. Run in a subprocess: the old code hung here."""
    import subprocess
    import sys

    preds = tmp_path / "p.jsonl"
    preds.write_text('{"sent_id": 10, "mask": {"size": [48, 64], "counts": "5n0X1\\\\ooooooOSl2"}}\n')
    code = (
        "import sys; from nemo_hf.cli import main; sys.exit(main(['eval', sys.argv[1], '--config', 'refcoco_unc', "
        "'--split', 'val', '--predictions', sys.argv[2], '--allow-missing']))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(hand_folder), str(preds)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "sent_id 10 (" in done.stderr and "p.jsonl:1): RLE counts string holds a number of more than 6" in done.stderr
    assert "Traceback" not in done.stderr
    # the same runs written the usual way are read
    preds.write_text('{"sent_id": 10, "mask": {"size": [48, 64], "counts": "5n0X1\\\\OSl2"}}\n')
    report = score(hand_folder, preds, allow_missing=True)
    assert report["metrics"]["n_expressions"] == 5


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"sent_id": 1, "mask": {"size": [2, 2], "counts": "4"}}\n{"sent_id": 2, "mask": {"size": [2, 2], "counts": "\xe9"}}\n')
    rows = read_predictions(path)
    assert next(rows)[0] == 1
    with pytest.raises(PredictionsFormatError, match=r"p.jsonl:2: not JSON \('utf-8' codec can't decode"):
        next(rows)


def test_several_splits_print_the_papers_table(hand_folder, tmp_path, capsys):
    """Issue 22.10: `--split val,testA,testB` with a {split} pattern prints one row per split (n, oIoU, mIoU,
    Prec@X), each scored exactly as that split alone; --json keeps every split's full report."""
    gt = {split: {s["sent_id"]: masks.decode_rle(row["mask"])
                  for row in load_dataset(str(hand_folder), "refcoco_unc", split=split) for s in row["sentences"]}
          for split in ("testA", "testB")}
    write_predictions(tmp_path / "p_val.jsonl", hand_predictions(ground_truth(hand_folder)))
    write_predictions(tmp_path / "p_testA.jsonl", gt["testA"])  # perfect
    write_predictions(tmp_path / "p_testB.jsonl", {k: np.zeros_like(v) for k, v in gt["testB"].items()})  # empty
    args = ["eval", str(hand_folder), "--split", "val,testA,testB", "--predictions", str(tmp_path / "p_{split}.jsonl")]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert rows["split"] == ["n", "oIoU", "mIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9"]
    val = f"{(640 + 0 + 1200 + 50 + 12288) / (640 + 640 + 2000 + 150 + 12288) * 100:.2f}"
    assert rows["val"][:2] == ["5", val] and rows["val"][3:] == ["60.00", "60.00", "40.00", "40.00", "40.00"]
    assert rows["testA"] == ["1", "100.00", "100.00"] + ["100.00"] * 5
    assert rows["testB"] == ["1", "0.00", "0.00"] + ["0.00"] * 5
    assert out.count("convention:") == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["splits"]) == ["val", "testA", "testB"]
    assert report["splits"]["val"]["metrics"] == score(hand_folder, tmp_path / "p_val.jsonl")["metrics"]
    assert main([*args[:-1], str(tmp_path / "p_val.jsonl")]) == 2
    assert "give --predictions a {split} pattern" in capsys.readouterr().err
