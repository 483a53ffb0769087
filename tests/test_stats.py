"""Negative statistics on a refs dataset built with the real schema."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from nemo_hf.schema import REFS_FEATURES
from nemo_hf.inspection.stats import negative_stats, write_stats


def _ref(ref_id: int, split: str, negatives: list[list[int]], scores: list[list[float]], fallback: list[bool]):
    n_sentences = max(len(fallback), 1)
    return {
        "ref_id": ref_id,
        "ann_id": 1000 + ref_id,
        "image_id": 10 + ref_id,
        "file_name": f"COCO_train2014_{10 + ref_id:012d}.jpg",
        "category_id": 1,
        "category": "person",
        "split": split,
        "sentences": [
            {"sent_id": 100 * ref_id + i, "sent": "man", "raw": "man", "tokens": ["man"]}
            for i in range(n_sentences)
        ],
        "bbox": [0.0, 0.0, 10.0, 10.0],
        "mask": {"size": [20, 20], "counts": "PPYo0"},
        "negatives": negatives,
        "negative_scores": scores,
        "negative_fallback": fallback,
    }


@pytest.fixture
def refs() -> datasets.Dataset:
    rows = [
        _ref(1, "train", [[5, 6, 7], [6, 7, 8]], [[0.5, 0.4, 0.3], [0.45, 0.35, 0.25]], [False, False]),
        _ref(2, "train", [[5, 9], [7, 8, 9]], [[0.2, 0.1], [-0.1, -0.2, -0.3]], [False, True]),
        _ref(3, "val", [], [], []),
    ]
    return datasets.Dataset.from_list(rows, features=REFS_FEATURES)


def test_counts_and_distributions(refs):
    stats = negative_stats(refs)
    assert (stats["refs"], stats["refs_mined"], stats["sentences"], stats["sentences_mined"]) == (3, 2, 5, 4)
    assert stats["fallback"] == 1 and stats["fallback_rate"] == pytest.approx(0.25)
    assert stats["pool_size_counts"] == {2: 1, 3: 3}
    assert stats["pool_size"]["min"] == 2 and stats["pool_size"]["mean"] == pytest.approx(11 / 4)
    chosen = np.array([0.5, 0.4, 0.3, 0.45, 0.35, 0.25, 0.2, 0.1])
    assert stats["scores"]["count"] == 8
    assert stats["scores"]["median"] == pytest.approx(np.median(chosen), abs=1e-6)
    assert stats["scores_fallback"]["count"] == 3
    assert stats["scores_fallback"]["max"] == pytest.approx(-0.1, abs=1e-6)
    assert stats["best_score"]["count"] == 4
    assert stats["best_score"]["max"] == pytest.approx(0.5, abs=1e-6)
    assert stats["best_score"]["min"] == pytest.approx(-0.1, abs=1e-6)


def test_write_stats_report_and_plot(refs, tmp_path):
    out = tmp_path / "stats.png"
    report = write_stats(refs, out)
    assert "fallback sentences (nothing survived the filter): 1 (25.00%)" in report
    assert "sentences with fewer than 3: 1 with 2" in report
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 500


def test_unmined_dataset(tmp_path):
    refs = datasets.Dataset.from_list([_ref(3, "val", [], [], [])], features=REFS_FEATURES)
    assert negative_stats(refs)["sentences_mined"] == 0
    report = write_stats(refs, tmp_path / "empty.png")
    assert "no mined negatives" in report and (tmp_path / "empty.png").exists()


def test_misaligned_columns_are_refused():
    refs = datasets.Dataset.from_list(
        [_ref(1, "train", [[5, 6], [7]], [[0.5, 0.4], [0.3]], [False])], features=REFS_FEATURES
    )
    with pytest.raises(ValueError, match="not aligned"):
        negative_stats(refs)


def test_pool_size_axis_when_every_pool_has_the_same_size(tmp_path):
    refs = datasets.Dataset.from_list(
        [_ref(1, "train", [[5, 6, 7]], [[0.5, 0.4, 0.3]], [False]), _ref(2, "train", [[5, 8, 9]], [[0.3, 0.2, 0.1]], [False])],
        features=REFS_FEATURES,
    )
    out = tmp_path / "stats.png"
    assert "fewer than" not in write_stats(refs, out)
    with Image.open(out) as image:  # whole numbers around the one size, not matplotlib's 2.6 .. 3.4
        assert json.loads(image.text["nemo_hf"])["pool_xlim"] == [0, 6]


def test_stats_json_has_the_numbers_the_report_prints(tmp_path, capsys):
    """Issue 22.11: `stats --json` writes the numbers: counts, the negatives kept per sentence, the tau the
    build used and what a previewed tau drops (the same values as the printed report)."""
    import json

    from nemo_hf.cli import main
    from nemo_hf.source.synthetic import make_refer_source

    source = make_refer_source(tmp_path / "src", n_images=16, seed=0, datasets=("refcoco",))
    assert main(["build", "--source", str(source), "--out", str(tmp_path / "out"), "--model", "demo-random",
                 "--top-k", "20"]) == 0
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "out"), "--tau", "p98", "-o", str(tmp_path / "s.png"),
                 "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads((tmp_path / "s.json").read_text())
    assert numbers["config"] == "refcoco_unc" and numbers["top_k"] == 20
    assert f"sentences: {numbers['sentences']} ({numbers['sentences_mined']} mined)" in printed
    assert sum(numbers["pool_size_counts"].values()) == numbers["sentences_mined"]
    preview = numbers["similarity"]["preview_tau"]
    assert f"preview tau p98 = {preview['cosine']:.4f} drops {100 * preview['drops']:.2f}% of these pairs" in printed
    assert numbers["shortfall"] in printed and "--top-k 20 is larger than the pool" in numbers["shortfall"]
