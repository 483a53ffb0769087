"""``nemo-hf zeroshot`` end to end on the synthetic source, with a perfect CLIP stand-in and a tiny random CLIP."""

import json
import warnings

import numpy as np
import pytest
from datasets import load_dataset
from zeroshot_models import PerfectClip

from nemo_hf import cli
from nemo_hf.mining.embed import Embedder, demo_embedder
from nemo_hf.folder import MiningOptions, build_folder
from nemo_hf.transforms.images import ImageTable
from nemo_hf.masks import decode_rle
from nemo_hf.source.synthetic import make_refer_source
from nemo_hf.training import tiny_random_clipseg
from nemo_hf.zeroshot.crops import masked_crop
from nemo_hf.zeroshot.difficulty import sample_sentences
from nemo_hf.zeroshot.run import decode_full


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zeroshot")
    source = make_refer_source(tmp / "src", n_images=12, seed=3, datasets=("refcoco",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the demo miner's warning
        return build_folder(source, tmp / "folder", ["refcoco_unc"], mining=MiningOptions(model="demo-random", top_k=3))


def _split(folder, config, split):
    return load_dataset(str(folder), config, split=split)


def _perfect_embedder(folder, split="val"):
    """An Embedder whose model maps each val object's crop and the expressions that refer to it together."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo = demo_embedder(progress=False, num_workers=0)
    tokenizer = tiny_random_clipseg()[1].tokenizer  # character-level: every expression tokenizes apart
    refs = _split(folder, "refcoco_unc", split)
    table = ImageTable(_split(folder, "images", "train"))
    crops, texts = {}, {}
    for image_id in set(refs["image_id"]):
        pixels = decode_full(table, image_id)
        for obj in table.objects_of(image_id):
            crops[obj["ann_id"]] = masked_crop(pixels, decode_rle(obj["mask"]))
    for ref in refs:
        for sentence in ref["sentences"]:
            texts.setdefault(sentence["sent"], []).append(ref["ann_id"])
    model = PerfectClip(demo.image_processor, tokenizer, crops, texts)
    return Embedder(model, demo.image_processor, tokenizer, progress=False, num_workers=0)


def _eval(folder, predictions, tmp_path, split="val"):
    """``nemo-hf eval`` on the predictions; its JSON report."""
    report = tmp_path / f"eval-{split}.json"
    argv = ["eval", str(folder), "--config", "refcoco_unc", "--split", split, "--predictions", str(predictions)]
    assert cli.main(argv + ["--json", str(report)]) == 0
    return json.loads(report.read_text())


def test_zeroshot_instances_with_a_perfect_scorer_gives_oiou_1(folder, tmp_path, monkeypatch, capsys):
    embedder = _perfect_embedder(folder)
    monkeypatch.setattr(Embedder, "from_pretrained", classmethod(lambda cls, *a, **k: embedder))
    out = tmp_path / "pred.jsonl"
    argv = ["zeroshot", str(folder), "--config", "refcoco_unc", "--split", "val", "--model", "perfect",
            "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    report = capsys.readouterr().out
    assert "ORACLE" in report and "instances" in report
    report = _eval(folder, out, tmp_path)
    assert "ORACLE" in capsys.readouterr().out and "ORACLE" in report["oracle"]  # eval's report says so too
    n = sum(len(ref["sentences"]) for ref in _split(folder, "refcoco_unc", "val"))
    assert report["metrics"]["oIoU"] == 1.0 and report["metrics"]["mIoU"] == 1.0
    provenance = json.loads((tmp_path / "pred.jsonl.provenance.json").read_text())
    assert provenance["oracle_proposals"] is True and provenance["expressions"] == n > 0

    # resumable: a rerun takes every image from the cache and writes the same predictions
    first = out.read_bytes()
    out.unlink()
    calls = []
    original = embedder.model.get_image_features
    embedder.model.get_image_features = lambda pixel_values: calls.append(1) or original(pixel_values)
    assert cli.main(argv) == 0
    assert not calls and out.read_bytes() == first
    assert "images from the cache" in capsys.readouterr().out
    # scored through Parquet as well (from the same cache)
    assert cli.main(argv[:-1] + [str(tmp_path / "pred.parquet")]) == 0
    assert _eval(folder, tmp_path / "pred.parquet", tmp_path)["metrics"]["oIoU"] == 1.0
    assert json.loads((tmp_path / "pred.jsonl.provenance.json").read_text())["images_from_cache"] == provenance["images"]


def test_zeroshot_demo_model_warns_and_every_expression_gets_a_mask(folder, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    argv = ["zeroshot", str(folder), "--split", "testA", "--model", "demo-random", "-o", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "MEANINGLESS" in captured.err
    suggested = next(line for line in captured.out.splitlines() if line.startswith("score it"))
    assert suggested.endswith(f"--predictions {out} --strict")  # issue 22.11: TAS counts Prec@X as IoU > X
    refs = _split(folder, "refcoco_unc", "testA")
    sent_ids = sorted(s["sent_id"] for ref in refs for s in ref["sentences"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["sent_id"] for r in rows) == sent_ids
    table = ImageTable(_split(folder, "images", "train"))
    image_of = {s["sent_id"]: ref["image_id"] for ref in refs for s in ref["sentences"]}
    for row in rows:  # each prediction is one of its image's instance masks, at the image's size
        masks = [o["mask"] for o in table.objects_of(image_of[row["sent_id"]])]
        assert any(np.array_equal(decode_rle(row["mask"]), decode_rle(m)) for m in masks)
    report = _eval(folder, out, tmp_path, "testA")
    assert 0.0 <= report["metrics"]["oIoU"] <= 1.0


def test_zeroshot_rectifier_and_crop_box_options_reach_the_provenance(folder, tmp_path, capsys):
    """TAS's rule and box by default, rectifying on words alone without spaCy (and saying so); the options switch."""
    base = ["zeroshot", str(folder), "--split", "testA", "--model", "demo-random", "--phrases", "none",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert cli.main(base + ["-o", str(tmp_path / "tas.jsonl")]) == 0
    assert "spatial rectifier: tas (words only (no spaCy parse)" in capsys.readouterr().out
    tas = json.loads((tmp_path / "tas.jsonl.provenance.json").read_text())
    assert (tas["spatial_rectifier"], tas["crop_box"]) == ("tas", "tas") and tas["rectifier_gate"].startswith("words only")
    assert cli.main(base + ["--rectifier", "words", "--crop-box", "extent", "-o", str(tmp_path / "words.jsonl")]) == 0
    words = json.loads((tmp_path / "words.jsonl.provenance.json").read_text())
    assert (words["spatial_rectifier"], words["crop_box"]) == ("words", "extent")
    assert words["images_from_cache"] == 0 < words["images"]  # another crop box: other crops, not the cached ones


def test_zeroshot_errors_are_clear(folder, tmp_path, capsys):
    base = ["zeroshot", str(folder), "--model", "demo-random", "-o", str(tmp_path / "p.jsonl")]
    assert cli.main(base + ["--proposals", "boxes"]) == 2
    assert "expected 'instances' or 'sam:PATH_OR_ID'" in capsys.readouterr().err
    assert cli.main(base + ["--phrases", "spacy"]) == 2
    assert "pass --captioner" in capsys.readouterr().err
    assert cli.main(base + ["--proposals", f"sam:{tmp_path / 'no_such_sam'}"]) == 2
    assert "cannot load SAM for --proposals sam:" in capsys.readouterr().err


def test_difficulty_modes_counts_and_seed(folder, tmp_path, capsys):
    def run(seed, name):
        argv = ["difficulty", str(folder), "--model", "demo-random", "--samples", "3", "--seed", str(seed),
                "--size", "128", "--json", str(tmp_path / f"{name}.json"), "-o", str(tmp_path / f"{name}.png")]
        assert cli.main(argv) == 0
        return json.loads((tmp_path / f"{name}.json").read_text()), capsys.readouterr()

    report, captured = run(1, "a")
    assert "MEANINGLESS" in captured.out and "MEANINGLESS" in captured.err
    assert set(report["modes"]) == {"single", "random", "retrieval"} and report["samples"] == 3
    assert report["oracle_proposals"] is True
    assert (tmp_path / "a.png").stat().st_size > 0
    train = _split(folder, "refcoco_unc", "train")
    by_sent = {s["sent_id"]: (ref, i) for ref in train for i, s in enumerate(ref["sentences"])}
    table = ImageTable(_split(folder, "images", "train"))
    for mode, m in report["modes"].items():
        records = m["records"]
        assert m["scored"] + m["target_vanished"] == 3 == len(records) + m["target_vanished"]
        assert m["top1_accuracy"] == np.mean([r["correct"] for r in records])
        assert m["mean_objects"] == np.mean([r["objects"] for r in records])
        assert m["rendered_as_asked"] == sum(r["mode"] == mode for r in records)
        for r in records:
            ref, i = by_sent[r["sent_id"]]
            assert r["sentence"] == ref["sentences"][i]["sent"] and r["tile_image_ids"][r["target_tile"]] == ref["image_id"]
            if r["mode"] == "single":  # every object of the target's image, by hand
                objects = [o for o in table.objects_of(ref["image_id"])]
                assert r["objects"] == len(objects)
                same = sum(o["category_id"] == ref["category_id"] and not o["iscrowd"] for o in objects)
                assert r["same_category_distractors"] == same - 1
            if r["mode"] == "retrieval":  # the tiles are the sentence's mined negatives
                negatives = set(r["tile_image_ids"]) - {ref["image_id"]}
                assert negatives <= set(ref["negatives"][i])
    assert report["modes"]["retrieval"]["rendered_as_asked"] > 0
    for fn in report["suspected_false_negatives"]:
        assert fn["margin"] < 0 and fn["distractor_tile"] != fn["target_tile"]
    again, _ = run(1, "b")
    assert again == report
    drawn = [r["sent_id"] for r in report["modes"]["single"]["records"]]
    assert [r["sent_id"] for r in sample_sentences(train, 3, 1)] == drawn
    assert [r["sent_id"] for r in sample_sentences(train, 3, 2)] != drawn


def test_a_fifo_beside_the_predictions_does_not_block_eval(tmp_path):
    """`<predictions>.provenance.json` as a FIFO: reading it would wait forever for a writer (subprocess, timeout)."""
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "p.jsonl.provenance.json")
    code = "import sys; from nemo_hf.zeroshot.provenance import provenance_banner; print(provenance_banner(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.jsonl")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
