"""Issue 23 point 8: each bad input ends in one line naming the item and what to do, never a traceback
(the refs/instances values, a full disk during a build, transform and collator arguments, seeds)."""

import errno
import json
import pickle

import numpy as np
import pytest
from conftest import write_tiny_source

from nemo_hf import cli


def _build(root, out, capsys):
    code = cli.main(["build", "--source", str(root), "--out", str(out), "--no-mining"])
    return code, capsys.readouterr().err


def _edit(root, refs=None, instances=None):
    path = root / "refcoco/refs(unc).p"
    data = pickle.loads(path.read_bytes())
    if refs:
        refs(data)
    path.write_bytes(pickle.dumps(data, protocol=2))  # a Python 3 pickle: str kept as str, surrogates too
    path = root / "refcoco/instances.json"
    data = json.loads(path.read_text())
    if instances:
        instances(data)
    path.write_text(json.dumps(data))  # json escapes a lone surrogate as \ud800, and reads it back as one


def _set(obj, key, value):
    obj[key] = value


CASES = {
    "ref_id 2^70": (lambda r: _set(r[0], "ref_id", 2**70), None, r"ref_id 1180591620717411303424 is outside 0\.\.2\^63-1"),
    "negative ann_id": (lambda r: _set(r[0], "ann_id", -5), None, r"ann_id -5 is outside 0\.\.2\^63-1"),
    "sent_id 2^64": (lambda r: _set(r[1]["sentences"][0], "sent_id", 2**64), None, r"sentence #0: sent_id 18446744073709551616 is outside"),
    "lone surrogate in a sentence": (lambda r: _set(r[1]["sentences"][0], "sent", "the red \ud800 cup"), None,
                                     r"ref 1: sentence 10: sent 'the red \\ud800 cup' holds a lone surrogate \('\\ud800' at character 8\)"),
    "lone surrogate in a token": (lambda r: _set(r[1]["sentences"][0], "tokens", ["red", "\udcff"]), None,
                                  r"ref 1: sentence 10: token '\\udcff' holds a lone surrogate"),
    "duplicate sent_id in val": (lambda r: r[1]["sentences"].append(dict(r[1]["sentences"][0], sent="the cup")), None,
                                 r"ref 1: sent_id 10 appears twice \(first in ref 1\)"),
    "sent_id shared by two refs": (lambda r: _set(r[2]["sentences"][0], "sent_id", 10), None,
                                   r"ref 2: sent_id 10 appears twice \(first in ref 1\)"),
    "image id 2^70": (None, lambda d: _set(d["images"][0], "id", 2**70), r"instances\.json: image 1180591620717411303424: id .* is outside"),
    "license 2^40": (None, lambda d: _set(d["images"][0], "license", 2**40), r"image 11: license 1099511627776 is not an integer in 0\.\.2\^31-1"),
    "lone surrogate in a category": (None, lambda d: _set(d["categories"][0], "name", "cu\ud800p"), r"category 47: name 'cu\\ud800p' holds a lone surrogate"),
    "lone surrogate in a file name": (None, lambda d: _set(d["images"][1], "file_name", "a\ud800.jpg"), r"image 12: file_name 'a\\ud800\.jpg' holds a lone surrogate"),
    "bbox beyond any float": (None, lambda d: _set(d["annotations"][1], "bbox", [1, 2, 10**400, 3]), r"annotation 112\)?: bbox .* is not 4 finite numbers"),
    "area beyond any float": (None, lambda d: _set(d["annotations"][4], "area", 10**400), r"annotation 200 \(image 11\): OverflowError"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_value_in_the_source_is_one_line_naming_it(tmp_path, capsys, case):
    import re

    refs, instances, message = CASES[case]
    root = write_tiny_source(tmp_path / "src")
    _edit(root, refs, instances)
    code, err = _build(root, tmp_path / "out", capsys)
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["a shard", "the card"])
def test_a_full_disk_during_a_build_says_so_and_leaves_the_older_folder(tmp_path, capsys, monkeypatch, where):
    """`datasets` wrapped ENOSPC in a DatasetGenerationError that said nothing of space. Injected at the write
    boundary (Parquet's writer; the card's writer): one line about space, the older build untouched."""
    import pyarrow.parquet as pq

    from nemo_hf.folder import card

    root = write_tiny_source(tmp_path / "src")
    out = tmp_path / "out"
    assert _build(root, out, capsys)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out) + ".partial")

    if where == "a shard":
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    else:
        monkeypatch.setattr(card, "write_card", full)
    code, err = _build(root, out, capsys)
    assert code == 2 and "no space left on the device" in err and "an earlier build there is untouched" in err, err
    assert "Traceback" not in err and "DatasetGenerationError" not in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no partial copy, no lock left


@pytest.mark.parametrize("kwargs, message", [
    ({"image_ratio": "0.5"}, r"image_ratio must be a number in \[0, 1\], got '0\.5'"),
    ({"text_ratio": "0.15"}, r"text_ratio must be a number in \[0, 1\], got '0\.15'"),
    ({"mask_fraction": None}, r"mask_fraction must be a number in \[0, 1\], got None"),
    ({"random_fraction": True}, r"random_fraction must be a number in \[0, 1\], got True"),
    ({"clean_weight": "half"}, r"clean_weight must be a number in \[0, 1\], got 'half'"),
    ({"image_ratio": float("nan")}, r"image_ratio must be a number in \[0, 1\], got nan"),
    ({"patch_size": 16.0}, r"patch_size must be a positive int, got 16\.0"),
    ({"seed": 2.7}, r"seed must be a non-negative integer, got 2\.7"),
    ({"seed": "3"}, r"seed must be a non-negative integer, got '3'"),
    ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
])  # fmt: skip
def test_maskris_arguments_are_named_not_compared_or_truncated(kwargs, message):
    """MaskRIS(image_ratio="0.5") was a TypeError from a comparison; MaskRIS(seed=2.7) became seed 2."""
    from nemo_hf.transforms.maskris import MaskRIS

    with pytest.raises(ValueError, match=message):
        MaskRIS(**kwargs)


def test_an_epoch_or_seed_that_is_not_a_whole_number_is_refused_not_truncated():
    """set_epoch(1.5) became epoch 1 (MaskRIS, NeMoMosaic): the draws of another epoch, silently."""
    from nemo_hf.transforms.maskris import MaskRIS
    from nemo_hf.transforms.mosaic import NeMoMosaic
    from nemo_hf.zeroshot.difficulty import sample_sentences

    maskris = MaskRIS(seed=np.int64(3))
    assert maskris.seed == 3 and type(maskris.seed) is int  # numpy integers are whole numbers
    with pytest.raises(ValueError, match=r"epoch must be a non-negative integer, got 1\.5"):
        maskris.set_epoch(1.5)
    mosaic = NeMoMosaic({}, output_size=64)
    with pytest.raises(ValueError, match=r"epoch must be a non-negative integer, got 2\.0"):
        mosaic.set_epoch(2.0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got 0\.5"):
        NeMoMosaic({}, output_size=64, seed=0.5)
    refs = {"sentences": [[{"sent": "a", "sent_id": 1}]]}
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got 1\.5"):
        sample_sentences(refs, 1, 1.5)
    with pytest.raises(ValueError, match=r"number of samples must be a positive integer, got 2\.5"):
        sample_sentences(refs, 2.5, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": -1}, r"max_length must be None or a positive number of tokens, got -1"),
    ({"max_length": 0}, r"max_length must be None or a positive number of tokens, got 0"),
    ({"max_length": 7.5}, r"got 7\.5"),
    ({"max_length": "77"}, r"got '77'"),
    ({"max_length": 10_000}, r"max_length 10000 exceeds the tokenizer's model_max_length 77"),
    ({"maskris": 0.5}, r"maskris must be a nemo_hf MaskRIS \(or None\), got float"),
])  # fmt: skip
def test_collator_arguments_are_named_at_construction(kwargs, message):
    """RISCollator(max_length=-1) was accepted and failed (or truncated everything) at the first batch."""
    from nemo_hf.training import RISCollator, tiny_random_clipseg

    processor = tiny_random_clipseg(image_size=32)[1]
    assert processor.tokenizer.model_max_length == 77
    with pytest.raises(ValueError, match=message):
        RISCollator(processor, **kwargs)


def test_collator_given_a_tokenizer_as_its_processor_says_what_to_pass():
    from nemo_hf.training import RISCollator, tiny_random_clipseg

    tokenizer = tiny_random_clipseg(image_size=32)[1].tokenizer
    with pytest.raises(ValueError, match="has no tokenizer and image_processor .*pass tokenizer= and image_processor="):
        RISCollator(tokenizer)
