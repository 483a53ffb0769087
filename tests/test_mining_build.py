"""Mining inside the build, end to end: columns, provenance and zero leakage on every config."""

import json

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from nemo_hf.source import refer
from nemo_hf.cli import main
from nemo_hf.folder import BuildReport, MiningOptions, build_folder
from nemo_hf.schema import REFS_CONFIGS
from nemo_hf.source.synthetic import make_refer_source


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mined")
    source = make_refer_source(tmp / "src", n_images=28, seed=11)
    with pytest.warns(UserWarning, match="MEANINGLESS"):
        out = build_folder(source, tmp / "out", ["all"], mining=MiningOptions(model="demo-random", top_k=5,
                                                                              embed_cache_dir=str(tmp / "emb")))
    return source, out


def test_no_eval_image_is_ever_a_negative_in_any_config(mined):
    source, out = mined
    refs = {name: refer.load_refs(source / c.dataset / f"refs({c.split_by}).p") for name, c in REFS_CONFIGS.items()}
    eval_images = {r["image_id"] for rs in refs.values() for r in rs if r["split"] != "train"}
    images = load_dataset(str(out), "images", split="train")
    pools = {name: {i for i, of in zip(images["image_id"], images["negative_pool_of"]) if name in of} for name in REFS_CONFIGS}
    for name in REFS_CONFIGS:
        train_images = {r["image_id"] for r in refs[name] if r["split"] == "train"}
        assert pools[name] == train_images - eval_images and pools[name]
        dd = load_dataset(str(out), name)
        mined_sentences = 0
        for split, ds in dd.items():
            for row in ds:
                assert len(row["negatives"]) == len(row["negative_scores"]) == len(row["negative_fallback"]) == len(row["sentences"])
                if split != "train":
                    assert row["negatives"] == [[] for _ in row["sentences"]]
                    continue
                for negatives, scores in zip(row["negatives"], row["negative_scores"]):
                    assert 0 < len(negatives) <= 5 and len(scores) == len(negatives)
                    assert set(negatives) <= pools[name], (name, row["ref_id"])
                    assert row["image_id"] not in negatives and len(set(negatives)) == len(negatives)
                    assert scores == sorted(scores, reverse=True)
                    mined_sentences += 1
        assert mined_sentences == sum(len(r["sentences"]) for r in refs[name] if r["split"] == "train")
    # the google splits keep train refs on images that also hold val refs: trainable targets, never negatives
    google = [r for r in refs["refcocog_google"] if r["split"] == "train" and r["image_id"] in eval_images]
    assert google
    trained = set(load_dataset(str(out), "refcocog_google", split="train")["ref_id"])
    assert {r["ref_id"] for r in google} <= trained


def test_provenance_in_manifest_card_and_arrow_metadata(mined):
    _, out = mined
    report = BuildReport.read(out)
    card = (out / "README.md").read_text()
    images = load_dataset(str(out), "images", split="train")
    for name in REFS_CONFIGS:
        prov = report.configs[name]["mining"]
        assert prov["top_k"] == 5 and prov["mode"] == "i2i" and prov["tau"] == "p99"
        assert prov["model"]["model_id"] == "nemo_hf-demo-clip-seed0" and prov["model"]["checkpoint_sha256"]
        assert prov["pool_size"] == sum(name in of for of in images["negative_pool_of"]) > 0
        assert f"| {name} | `nemo_hf-demo-clip-seed0` |" in card and f"| i2i | flat | {prov['pool_size']} |" in card
        for split in report.configs[name]["splits"].values():
            for shard in split["shards"]:
                meta = pq.read_schema(out / shard).metadata
                assert json.loads(meta[b"nemo_hf"]) == prov
    assert "mined with a randomly initialised CLIP and are meaningless" in card
    assert "![NeMo mosaics" in card and (out / "preview.png").is_file()


def test_unreachable_model_fails_with_a_way_out(tmp_path, capsys):
    source = make_refer_source(tmp_path / "src", n_images=8, datasets=("refcoco",))
    code = main(["build", "--source", str(source), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-such-clip")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot load embedding model" in err and "--model /path/to/clip" in err
    assert not (tmp_path / "out").exists()


def test_stats_and_preview_commands(mined, tmp_path, capsys):
    _, out = mined
    assert main(["stats", str(out), "--config", "refcocog_umd", "-o", str(tmp_path / "s.png")]) == 0
    text = capsys.readouterr().out
    assert "fallback sentences" in text and "t2i cosine of chosen negatives" in text
    assert main(["preview", str(out), "--config", "refcocog_umd", "-n", "4", "--size", "96", "-o", str(tmp_path / "g.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "g.png") as grid, Image.open(tmp_path / "s.png") as plot:
        assert grid.width >= 2 * 96 and grid.height > 96 and plot.width > 100
